"""The ``selfrepair`` command: the whole self-repair study of a model in one run.

Subcommands:

* ``selfrepair analyze``: self-repair analysis (local and global effects),
  grad / TSG / GIM estimates against measured effects, the head ranking and
  the faithfulness table; tables (Parquet + CSV), ``summary.json`` and every
  figure (HTML + PNG) into a run folder. Its analysis options are generated
  from :func:`selfrepair.analyze_self_repair`'s signature (same names, same
  defaults), except ``--global/--no-global``, on by default here.
* ``selfrepair figures``: redraw the figures of a run folder (or run the
  default study first) into a folder; ``selfrepair figures`` from the
  repository root regenerates ``figures/``.
* ``selfrepair train-default-model``: :func:`selfrepair.training.train_default_model`
  with one flag per :class:`~selfrepair.training.Recipe` field.
* ``selfrepair notebooks``: execute ``notebooks/*.ipynb`` in place (refreshes
  their committed outputs).

A run folder holds ``run.json`` (the settings, written first), ``checkpoints/``
(the analysis' batch-by-batch partial results), ``tables/``, ``figures/`` and,
last, ``summary.json``: a folder with ``summary.json`` is finished and is not
overwritten without ``--force``; one without it continues with ``--resume``.
Every file is written under a temporary name and renamed when complete.

User errors (unknown model offline, unreadable JSONL line, CUDA asked for but
absent, bad option values) print one line on stderr and exit with status 2;
set ``SELFREPAIR_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import inspect
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ._io import atomic_write

EXIT_ERROR = 2

# --- defaults of the full study: 29 s on an idle 2-core machine, 141 s on a busy one (the budget is 5 minutes)
DEFAULT_TASK = "code-copy"
DEFAULT_N = 512  # code-copy windows: ~240 groups on the shipped model; see the README for the timing
DEFAULT_SEQ_LEN = None  # the task's own default length (code-copy: 128, induction: 61)
DEFAULT_HEAD_ABLATION = "mean"
DEFAULT_ATTRIBUTION_N = 64  # prompts for the head ranking, token attributions and faithfulness (their cost grows with n)
SWEEP_THRESHOLDS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)
SUMMARY_THRESHOLDS = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)

#: analyze_self_repair arguments whose CLI default differs from the Python API's (and why)
CLI_DEFAULTS = {"global_effects": True}  # the study compares local with global effects
#: flag spellings that differ from ``--<name>``
CLI_FLAGS = {"global_effects": ["--global", "--global-effects"]}

#: help text per analyze_self_repair argument (SPEC's wording)
ANALYSIS_HELP = {
    "k": "number of keys per group (the top-k contributors of a row), 2 to 8",
    "min_contribution": "a row is analysed when at least k keys have contribution w_j = p_j (g . v_j) above this "
                        "(metric units)",
    "select": "rank keys by signed contribution ('positive') or by |w_j| ('abs')",
    "exclude_bos": "drop key 0 (BOS) from selection and from the means",
    "threshold": "a group self-repairs when its interaction ratio r = (E_S - sum E_n) / E_S exceeds this",
    "min_effect": "r is NaN (not counted) when |E_S| < max(min_effect, 0.01 sum |w_j|) (metric units)",
    "ablation": "score ablation: 'mean' (a'_j = mean of the row's scores, the GIM paper's) or 'knockout' "
                "(keys removed, rest renormalised)",
    "value_ablation": "value ablation for the contrast: 'zero' or 'mean' (mean value over the row's keys)",
    "global_effects": "also measure every ablation in a real forward pass (global effects, downstream gap); "
                      "the study needs it, so it is on here (--no-global to skip)",
    "layers": "analyse only these layers (space- or comma-separated; default all)",
    "heads": "analyse only these heads (space- or comma-separated; default all)",
    "temperature": "TSG temperature T for the tsg/gim estimates",
    "batch_size": "prompts per batch; each batch is one checkpoint that --resume keeps (default: sized from the "
                  "memory a batch needs, at most 64 prompts)",
    "checkpoint_dir": "where partial results are kept batch by batch (default: <out>/checkpoints/self_repair)",
    "progress": "show progress bars",
    "dtype": "precision of the cached activations: float32, or float64 for exactness checks (row arithmetic is "
             "float64 either way)",
}

FIGURES = {
    "01_joint_vs_sum": "joint ablation effect vs the sum of individual effects (the GIM paper's figure)",
    "02_estimates_local": "grad / TSG / GIM estimates vs the measured local joint effect",
    "02_estimates_global": "grad / TSG / GIM estimates vs the measured global joint effect",
    "03_head_heatmaps": "layer x head: fraction self-repairing and median interaction",
    "04_threshold_sweep": "fraction self-repairing vs the threshold, with its interval",
    "05_local_vs_global": "local vs global interaction and the downstream gap",
    "06_head_ranking": "heads ranked by measured ablation effect, beside grad and GIM",
    "07_attention_row": "one self-repairing row: attention weights clean, per ablation, joint",
    "08_token_attributions": "token attributions, grad vs GIM, over one prompt",
}


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit status 2)."""

    def error(self, message):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, except None (the help text says what None means)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# ----------------------------------------------------------------------------- analysis options from the API


def analysis_parameters() -> list[inspect.Parameter]:
    """The keyword arguments of :func:`selfrepair.analyze_self_repair` (everything after model, task)."""
    from .self_repair import analyze_self_repair

    return [p for p in inspect.signature(analyze_self_repair).parameters.values()
            if p.name not in ("model", "task") and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _annotation_text(p: inspect.Parameter) -> str:
    a = p.annotation
    return a if isinstance(a, str) else getattr(a, "__name__", None) or str(a)


#: option -> the analysis module's tuple of valid values (argparse lists them and rejects others)
CHOICES = {"select": "SELECT_MODES", "ablation": "ABLATIONS", "value_ablation": "VALUE_ABLATIONS"}


def _choices(name: str) -> Optional[list]:
    from . import self_repair

    return list(getattr(self_repair, CHOICES[name])) if name in CHOICES else None


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers (e.g. '0 1' or '0,1'), got {text!r}") from None


def add_analysis_options(parser: argparse.ArgumentParser) -> None:
    """One flag per analyze_self_repair argument, named and defaulted as in the Python API.

    ``--min-contribution`` is also accepted as ``--min_contribution`` (the Python
    name); booleans are ``--name/--no-name``.
    """
    g = parser.add_argument_group("analysis settings (selfrepair.analyze_self_repair's arguments, same names and defaults)")
    for p in analysis_parameters():
        name, default = p.name, CLI_DEFAULTS.get(p.name, p.default)
        flags = list(CLI_FLAGS.get(name) or [f"--{name.replace('_', '-')}"])
        aliases = [f for f in [f"--{name.replace('_', '-')}", f"--{name}"] if f not in flags]
        help_ = ANALYSIS_HELP.get(name, f"analyze_self_repair's {name!r}")
        if name in CLI_DEFAULTS:
            help_ += f" (Python API default: {p.default!r})"
        kw: dict[str, Any] = dict(dest=name, default=default, help=help_)
        ann = _annotation_text(p)
        if isinstance(default, bool):
            g.add_argument(*flags[:1], action=argparse.BooleanOptionalAction, **kw)
            for f in flags[1:] + aliases:  # hidden spellings of the same switch
                g.add_argument(f, dest=name, action="store_true", default=default, help=argparse.SUPPRESS)
                g.add_argument("--no-" + f[2:], dest=name, action="store_false", default=default, help=argparse.SUPPRESS)
            continue
        choices = _choices(name)
        if _is_dtype(default):
            kw.update(default=str(default).replace("torch.", ""), choices=["float32", "float64"])
        elif isinstance(default, int):
            kw["type"] = int
        elif isinstance(default, float):
            kw["type"] = float
        elif default is None and any(s in ann for s in ("Sequence", "Iterable", "list", "List", "tuple", "Tuple")):
            kw.update(nargs="+", type=_int_list, metavar="INT")
        elif default is None and "int" in ann:
            kw["type"] = int
        elif default is None and ("Path" in ann or "dir" in name):
            kw["metavar"] = "DIR"
        if choices:
            kw["choices"] = choices
        g.add_argument(*flags, *[a for a in aliases if "_" in a], **kw)


def _is_dtype(x) -> bool:
    return type(x).__name__ == "dtype" and type(x).__module__ == "torch"


def api_kwargs(settings: dict) -> dict:
    """CLI settings (JSON-able: dtype as a string) -> keyword arguments of analyze_self_repair."""
    import torch

    kw = dict(settings)
    if isinstance(kw.get("dtype"), str):
        kw["dtype"] = getattr(torch, kw["dtype"])
    return kw


def _flatten_lists(v):
    if isinstance(v, list) and v and all(isinstance(x, list) for x in v):
        return [int(i) for x in v for i in x]
    return v


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from . import __version__ as version

    p = _Parser(prog="selfrepair", formatter_class=_Formatter,
                description="Self-repair inside attention, measured by ablation and estimated with GIM gradients, "
                            "on TransformerLens models.",
                epilog="Run `selfrepair analyze` with no arguments for the default study of the shipped model "
                       "(offline; about 30 s on 2 idle CPU cores). `selfrepair COMMAND --help` explains each command.")
    p.add_argument("--version", action="version", version=f"selfrepair {version}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    a = sub.add_parser("analyze", formatter_class=_Formatter, help="run the full self-repair study of a model",
                       description=ANALYZE_DESCRIPTION)
    _add_study_options(a)
    add_analysis_options(a)
    a.set_defaults(func=cmd_analyze)

    f = sub.add_parser("figures", formatter_class=_Formatter, help="redraw the figures of a run (regenerates figures/)",
                       description="Draw every figure (HTML + PNG) from a run folder's tables into --out. Without "
                                   "RUN_DIR, first run the default study (`selfrepair analyze` with its defaults) into "
                                   "a new folder under runs/: `selfrepair figures` from the repository root "
                                   "regenerates the repository's figures/.")
    f.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a finished run folder (default: run the default study)")
    f.add_argument("--out", default="figures", help="folder to write the figures into")
    f.add_argument("--plotlyjs", choices=["cdn", "directory", "inline"], default="cdn",
                   help="how the HTML files get plotly.js: 'cdn' (small files; viewing needs network), "
                        "'directory' (one plotly.min.js beside them; offline), 'inline' (embedded in each)")
    f.add_argument("--png", action=argparse.BooleanOptionalAction, default=True, help="also write PNGs")
    f.set_defaults(func=cmd_figures)

    t = sub.add_parser("train-default-model", formatter_class=_Formatter,
                       help="train the shipped default model from its recipe",
                       description="Train the default model (selfrepair.training.train_default_model) with the "
                                   "recipe below (every field of selfrepair.training.Recipe is a flag) and write a "
                                   "Hugging Face checkpoint directory that `selfrepair analyze --model DIR` loads.")
    _add_recipe_options(t)
    t.set_defaults(func=cmd_train)

    nb = sub.add_parser("notebooks", formatter_class=_Formatter, help="execute the notebooks in place (developers)",
                        description="Execute every notebook in --dir end to end with nbclient and save it with its "
                                    "outputs (how the committed notebook outputs are regenerated).")
    nb.add_argument("--dir", default="notebooks", help="folder of .ipynb files")
    nb.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell")
    nb.add_argument("names", nargs="*", help="only these notebooks (file names); default all")
    nb.set_defaults(func=cmd_notebooks)
    return p


ANALYZE_DESCRIPTION = f"""\
Run the whole self-repair study of a model on a task and write it to a run folder:

  1. selfrepair.analyze_self_repair: groups of top-k keys per (prompt, layer, head, query),
     individual vs joint score ablations, local and (by default here) global effects;
  2. selfrepair.compare_estimates: grad / TSG / GIM estimates vs measured effects;
  3. selfrepair.head_attributions: heads ranked by measured ablation, grad and GIM;
  4. selfrepair.explain + selfrepair.faithfulness: token attributions and their
     comprehensiveness / sufficiency;
then every figure as HTML and PNG, and summary.json (versions, model and its hash,
task, every setting, seed, timings). With no arguments: the shipped model on
{DEFAULT_TASK} with n={DEFAULT_N} prompts of the task's default length (128 tokens), the
head ranking and faithfulness on the first {DEFAULT_ATTRIBUTION_N} of them, offline; about 30 s
on 2 idle CPU cores (on a machine busy with other jobs, --threads 1 keeps it fast).

Output (--out, default a new folder under runs/): tables/*.parquet and *.csv,
figures/*.html and *.png, summary.json. Partial results are kept batch by batch:
after an interruption, run the same command with --resume.
"""


def _add_study_options(a: argparse.ArgumentParser) -> None:
    g = a.add_argument_group("model and task")
    g.add_argument("--model", metavar="SPEC", default=None,
                   help="what selfrepair.load_model loads: a checkpoint directory, a llama2.c .bin file or a Hugging "
                        "Face name (offline: must be cached); default: the shipped model")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--task", metavar="NAME", default=DEFAULT_TASK,
                     help="a built-in task (selfrepair.tasks.load: " + ", ".join(_task_names()) + ")")
    src.add_argument("--prompts", metavar="FILE.jsonl", default=None,
                     help="your own prompts, one JSON object per line: {\"prompt\", \"answer\", \"wrong\"} as text or "
                          "{\"tokens\", \"answer_id\", \"wrong_id\"} as ids (selfrepair.tasks.from_jsonl)")
    g.add_argument("--n", type=_positive_int, default=DEFAULT_N, help="number of prompts of a built-in task")
    g.add_argument("--seq-len", "--seq_len", dest="seq_len", type=_positive_int, default=DEFAULT_SEQ_LEN,
                   help="tokens per prompt of a built-in task (default: the task's own, 128 for code-copy, "
                        "61 for induction)")
    g.add_argument("--seed", type=int, default=0, help="seed of the task's sampling and of torch")
    g.add_argument("--device", default="cpu", type=_device_arg,
                   help="'cpu', 'cuda' (or 'cuda:N'), or 'auto' (cuda when available)")
    g.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads for torch (default: torch's choice, one per core); on a machine shared with "
                        "other busy processes --threads 1 can be many times faster")
    o = a.add_argument_group("study and output")
    o.add_argument("--out", metavar="DIR", default=None,
                   help="run folder (default: a new folder runs/<time>-<task> in the current directory)")
    o.add_argument("--resume", action="store_true", help="continue an interrupted run in --out (same options)")
    o.add_argument("--force", action="store_true", help="overwrite a finished (or unfinished) run in --out")
    o.add_argument("--attribution-n", dest="attribution_n", type=_nonnegative_int, default=DEFAULT_ATTRIBUTION_N, metavar="N",
                   help="the head ranking, token attributions and faithfulness use the first N prompts of the task "
                        "(0: all); their cost grows with prompts x positions, the self-repair analysis uses all --n")
    o.add_argument("--head-ablation", dest="head_ablation", default=DEFAULT_HEAD_ABLATION, choices=["mean", "zero"],
                   help="how selfrepair.head_attributions ablates a head ('mean' over prompts, or 'zero')")
    o.add_argument("--png", action=argparse.BooleanOptionalAction, default=True,
                   help="write each figure as PNG too (needs Chrome/Chromium, found offline by kaleido)")
    o.add_argument("--figures-only", action="store_true",
                   help="redraw the figures of the finished run in --out from its tables (no analysis)")


def _task_names() -> list[str]:
    from . import tasks

    return list(tasks.available())


def _int_at_least(lo: int, what: str):
    """An argparse type: an integer >= ``lo``, with a one-line message naming ``what``."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v
    return parse


_nonnegative_int = _int_at_least(0, "an integer >= 0")
_positive_int = _int_at_least(1, "a positive integer")


def _device_arg(s: str) -> str:
    s = s.strip().lower()
    if s in ("cpu", "auto", "cuda") or (s.startswith("cuda:") and s[5:].isdigit()):
        return s
    raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or auto, got {s!r}")


def _add_recipe_options(t: argparse.ArgumentParser) -> None:
    from .training import Recipe

    t.add_argument("--out", metavar="DIR", default="runs/default_model",
                   help="checkpoint directory to write (the shipped model lives in selfrepair/data/default_model)")
    t.add_argument("--force", action="store_true", help="overwrite a checkpoint already in --out")
    t.add_argument("--snapshots", action="store_true", help="also save the weights at every evaluation (out/step_N)")
    t.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    g = t.add_argument_group("recipe (selfrepair.training.Recipe fields)")
    for f in dataclasses.fields(Recipe):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        kw: dict[str, Any] = dict(dest=f"recipe_{f.name}", default=default, help=f"Recipe.{f.name}")
        if isinstance(default, bool):
            g.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
            continue
        if isinstance(default, list):
            kw.update(nargs="*", help=f"Recipe.{f.name} (default: {len(default)} entries)")
        elif isinstance(default, (int, float)):
            kw["type"] = type(default)
        g.add_argument(*flags, **kw)


# ----------------------------------------------------------------------------- small utilities


def write_json(path: Path, obj) -> Path:
    return atomic_write(path, lambda t: t.write_text(json.dumps(_jsonable(obj), indent=1) + "\n"))


def _jsonable(o):
    import numpy as np

    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return f if np.isfinite(f) else None
    if isinstance(o, np.ndarray):
        return _jsonable(o.tolist())
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, Path):
        return str(o)
    if o is None or isinstance(o, (bool, int, str)):
        return o
    return str(o)


def _csv_safe(df):
    """Tuple / list / array cells as text for CSV (Parquet keeps them as lists)."""
    import numpy as np

    out = df.copy()
    for c in out.columns:
        if out[c].dtype == object and len(out) and isinstance(out[c].iloc[0], (tuple, list, np.ndarray)):
            out[c] = [json.dumps([_jsonable(x) for x in v]) if v is not None else "" for v in out[c]]
    return out


def write_table(tables_dir: Path, name: str, df) -> list[Path]:
    """``tables/name.parquet`` and ``tables/name.csv``, each written atomically."""
    pq = atomic_write(tables_dir / f"{name}.parquet", lambda t: df.to_parquet(t, index=False))
    csv = atomic_write(tables_dir / f"{name}.csv", lambda t: _csv_safe(df).to_csv(t, index=False))
    return [pq, csv]


def read_table(tables_dir: Path, name: str):
    import numpy as np
    import pandas as pd

    df = pd.read_parquet(tables_dir / f"{name}.parquet")
    for c in df.columns:  # list columns come back as numpy arrays: make them tuples again
        if df[c].dtype == object and len(df) and isinstance(df[c].iloc[0], np.ndarray):
            df[c] = [tuple(v.tolist()) for v in df[c]]
    return df


def versions() -> dict:
    import platform

    from .self_repair import _versions

    return {"python": platform.python_version(),
            **_versions(("selfrepair", "torch", "transformer_lens", "transformers", "plotly", "kaleido", "pandas",
                         "numpy", "pyarrow"))}


def _debug() -> bool:
    return os.environ.get("SELFREPAIR_DEBUG", "") not in ("", "0")


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    msg = str(e).strip().splitlines()
    return msg[0] if msg else type(e).__name__


# ----------------------------------------------------------------------------- analyze


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CLIError(f"--device {device} asked for CUDA, but torch {torch.__version__} sees no CUDA device "
                           "(torch.cuda.is_available() is False); use --device cpu")
        idx = int(device.split(":")[1]) if ":" in device else 0
        if idx >= torch.cuda.device_count():
            raise CLIError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def _default_out(task_label: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{stamp}-{task_label}"
    out, i = base, 1
    while out.exists():
        i += 1
        out = base.with_name(f"{base.name}-{i}")
    return out


def prepare_run_dir(out: Path, *, resume: bool, force: bool) -> str:
    """Decide what to do with ``out``: 'new', 'resume' or 'overwrite' (raises CLIError to refuse)."""
    if not out.exists():
        if resume:
            raise CLIError(f"--resume: there is no run to continue at {out}")
        return "new"
    if not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a folder")
    entries = [e for e in out.iterdir()]
    ours = (out / "run.json").is_file()
    finished = (out / "summary.json").is_file()
    if not entries:
        if resume:
            raise CLIError(f"--resume: {out} is empty; there is no run to continue")
        return "new"
    if not ours:
        raise CLIError(f"--out {out} is a non-empty folder that holds no selfrepair run (no run.json); "
                       "choose a new or empty folder")
    if force:
        return "overwrite"
    if finished:
        raise CLIError(f"{out} already holds a finished run (summary.json); pass --force to overwrite it or "
                       "choose another --out")
    if not resume:
        raise CLIError(f"{out} holds an unfinished run; pass --resume to continue it or --force to start over")
    return "resume"


def _clear_run_dir(out: Path) -> None:
    """Remove what a selfrepair run writes in ``out`` (only our own files and folders)."""
    for name in ("summary.json", "run.json"):
        (out / name).unlink(missing_ok=True)
    for name in ("tables", "figures", "checkpoints"):
        if (out / name).is_dir():
            shutil.rmtree(out / name)


def _settings_from_args(args) -> dict:
    settings = {}
    for p in analysis_parameters():
        v = getattr(args, p.name)
        settings[p.name] = _flatten_lists(v)
    return settings


def _study_key(run: dict) -> dict:
    """What must match for --resume to continue a run (settings that change the results)."""
    s = dict(run["settings"])
    s.pop("progress", None)
    s.pop("checkpoint_dir", None)
    return {"settings": s, "task": run["task"], "model": run["model"]["spec"], "seed": run["seed"],
            "head_ablation": run["head_ablation"], "attribution_n": run.get("attribution_n"), "device": run["device"]}


def _load_model(spec, device):
    import torch

    from . import load_model
    from .loading import ModelLoadError

    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the weights-loading bar; errors must stay one line
    except Exception:  # pragma: no cover
        pass
    try:
        return load_model(spec, device=device)
    except ModelLoadError as e:
        raise CLIError(_first_line(e)) from e
    except FileNotFoundError as e:
        raise CLIError(f"--model {spec}: {_first_line(e)}") from e
    except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - GPU only
        raise CLIError(f"out of GPU memory loading {spec}: {_first_line(e)}") from e


def _build_task(model, args):
    from . import tasks

    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise CLIError(f"--prompts {path}: no such file")
        try:
            return tasks.from_jsonl(path, model)
        except (ValueError, KeyError, TypeError) as e:
            msg = _first_line(e)
            raise CLIError(msg if str(path) in msg else f"--prompts {path}: {msg}") from e
    name = args.task or DEFAULT_TASK
    try:
        return tasks.load(name, model, n=args.n, seq_len=args.seq_len, seed=args.seed)
    except (ValueError, KeyError) as e:
        raise CLIError(f"--task {name}: {_first_line(e)}") from e


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _model_info(model, spec) -> dict:
    from .loading import DEFAULT_MODEL_DIR
    from .self_repair import model_hash

    cfg = getattr(model, "cfg", None)
    info = {"spec": spec if spec is not None else "default",
            "path": str(DEFAULT_MODEL_DIR) if spec is None else str(spec),
            "class": type(model).__name__,
            "weights_sha256": model_hash(model)}  # the analysis' own hash (selfrepair.self_repair.model_hash)
    for k in ("n_layers", "n_heads", "d_model", "d_head", "n_ctx", "d_vocab"):
        v = getattr(cfg, k, None)
        if v is not None:
            info[k] = int(v)
    try:
        from .probe import probe

        be = probe(model)
        info.update(architecture=be.architecture, backend=be.kind, n_kv_heads=be.n_kv_heads, score_site=be.score_site)
        info.setdefault("n_layers", be.n_layers)
        info.setdefault("n_heads", be.n_heads)
    except Exception:
        pass
    return info


class Timings:
    """Wall-clock and CPU seconds (all threads of this process) per step: ``with timings("step"): ...``."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, label: str):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[label] = round(time.perf_counter() - t0, 3)
            self.cpu[label] = round(time.process_time() - c0, 3)


class Study:
    """One ``selfrepair analyze`` run: stages that each write their tables and are skipped on --resume."""

    def __init__(self, out: Path, progress: bool, timings: Timings):
        self.out = out
        self.tables = out / "tables"
        self.progress = progress
        self.timings = timings
        self.resumed: list[str] = []

    def has(self, name: str) -> bool:
        return (self.tables / f"{name}.parquet").is_file() and (self.tables / f"{name}.csv").is_file()

    def stage(self, label: str, names: list[str], compute: Callable[[], dict]):
        """Tables ``names`` from disk when all exist (resume), else ``compute()`` and write them."""
        if all(self.has(n) for n in names):
            self.resumed.append(label)
            self._say(f"[{label}] kept from the interrupted run")
            return {n: read_table(self.tables, n) for n in names}
        with self.timings(label):
            out = compute()
            for n in names:
                write_table(self.tables, n, out[n])
        self._say(f"[{label}] done in {self.timings.wall[label]:.1f} s")
        return out

    def _say(self, msg: str):
        if self.progress:
            print(msg, file=sys.stderr, flush=True)


def run_study(model, task, settings: dict, *, out: Path, head_ablation: str, attribution_n: int, seed: int,
              progress: bool, timings: Timings) -> dict:
    """Run every stage of the study into ``out``; returns the tables by name and the analysis meta.

    Stages (each writes its tables atomically; on --resume a stage whose tables
    exist is read back instead of recomputed):

    1. ``analyze_self_repair`` with ``checkpoint_dir`` (partial results batch by
       batch; the finished result is kept in ``checkpoints/self_repair_result.parquet``),
       then ``compare_estimates`` -> ``groups`` (with ``gim_estimate``),
       ``estimates``, ``head_summary`` (``result.summary()``), ``sweep``;
    2. ``head_attributions`` -> ``heads``;
    3. ``explain`` (grad, gim) and ``faithfulness`` -> ``token_attributions``, ``faithfulness``;
       (2 and 3 on the first ``attribution_n`` prompts, all when 0);
    4. ``plots.attention_row_data`` for the figure of one self-repairing row -> ``attention_row``.
    """
    import torch

    from . import attribution, plots, self_repair

    study = Study(out, progress, timings)
    ck = settings.get("checkpoint_dir") or str(out / "checkpoints" / "self_repair")
    res_path = out / "checkpoints" / "self_repair_result.parquet"
    torch.manual_seed(seed)

    def groups_stage():
        if res_path.is_file():
            res = self_repair.SelfRepairResult.read_parquet(res_path)
            study.resumed.append("self-repair analysis")
        else:
            with timings("self-repair analysis"):
                kw = api_kwargs(settings)
                kw["checkpoint_dir"] = ck
                res = self_repair.analyze_self_repair(model, task, **kw)
                res.to_parquet(res_path)  # atomic
        with timings("compare_estimates"):
            comp = attribution.compare_estimates(model, task, res)
        ths = sorted(set(SWEEP_THRESHOLDS) | {float(settings.get("threshold", 0.1))})
        return {"groups": comp.groups, "estimates": comp.report, "head_summary": res.summary(),
                "sweep": res.sweep(ths)}

    tabs = dict(study.stage("self-repair analysis + estimates", ["groups", "estimates", "head_summary", "sweep"],
                            groups_stage))
    sub = task if not attribution_n or attribution_n >= len(task) else task.subset(slice(0, attribution_n))
    tabs.update(study.stage("head attributions", ["heads"], lambda: {
        "heads": attribution.head_attributions(model, sub, ablation=head_ablation, progress=progress)}))

    def tokens_stage():
        attrs = {m: attribution.explain(model, sub, method=m, progress=progress) for m in ("grad", "gim")}
        return {"token_attributions": plots.token_attribution_table(model, sub, attrs),
                "faithfulness": attribution.faithfulness(model, sub, attrs, progress=progress)}

    tabs.update(study.stage("token attributions + faithfulness", ["token_attributions", "faithfulness"], tokens_stage))
    if len(tabs["groups"]):
        g = tabs["groups"]
        g.attrs["settings"] = settings
        tabs.update(study.stage("attention row", ["attention_row"],
                                lambda: {"attention_row": plots.attention_row_data(model, task, g)}))
    meta = self_repair.read_result_info(res_path).get("meta", {}) if res_path.is_file() else {}
    return {"tables": tabs, "resumed": study.resumed, "analysis_meta": meta}


# ----------------------------------------------------------------------------- figures


def make_figures(tables: dict, settings: dict, n_layers: Optional[int] = None, n_heads: Optional[int] = None) -> dict:
    """Every figure of the study from its tables (no model needed)."""
    from . import plots

    g = tables["groups"].copy()
    g.attrs["settings"] = dict(settings, n_layers=n_layers, n_heads=n_heads)
    t = float(settings.get("threshold", 0.1))
    figs = {}
    has_global = "global_effect_joint" in g.columns
    if len(g):
        figs["01_joint_vs_sum"] = plots.plot_joint_vs_sum(g, threshold=t)
        figs["02_estimates_local"] = plots.plot_estimates(g, truth="local", threshold=t)
        if has_global:
            figs["02_estimates_global"] = plots.plot_estimates(g, truth="global", threshold=t)
        figs["03_head_heatmaps"] = plots.plot_head_heatmaps(g, threshold=t, n_layers=n_layers, n_heads=n_heads)
        figs["04_threshold_sweep"] = plots.plot_threshold_sweep(tables["sweep"], threshold=t)
        if has_global:
            figs["05_local_vs_global"] = plots.plot_local_vs_global(g, threshold=t)
    if "heads" in tables:
        figs["06_head_ranking"] = plots.plot_head_ranking(tables["heads"])
    if "attention_row" in tables:
        figs["07_attention_row"] = plots.plot_attention_row(tables["attention_row"])
    if "token_attributions" in tables:
        figs["08_token_attributions"] = plots.plot_token_attributions(tables["token_attributions"])
    return figs


def write_figures(figs: dict, out: Path, *, png: bool, plotlyjs: str = "directory") -> tuple[list[Path], Optional[str]]:
    """Write every figure as HTML (+ PNG); returns the paths and the PNG error (None when fine)."""
    from . import plots

    inc = True if plotlyjs == "inline" else plotlyjs
    paths = plots.save_figures(figs, out, png=False, include_plotlyjs=inc)
    err = None
    if png:
        try:
            paths += plots.save_figures(figs, out, png=True, html=False)
        except plots.FigureExportError as e:
            err = _first_line(e)
            print(f"selfrepair: warning: {err}", file=sys.stderr)
    return paths, err


# ----------------------------------------------------------------------------- summary


def headline(tables: dict, settings: dict) -> dict:
    """The numbers the summary prints (and summary.json keeps)."""
    import numpy as np

    from . import plots
    from .attribution import agreement

    g = tables["groups"]
    t = float(settings.get("threshold", 0.1))
    r = g["interaction"].astype(float) if len(g) else None
    n_def = int(np.isfinite(r).sum()) if r is not None else 0
    h: dict[str, Any] = {"groups": int(len(g)), "groups_defined": n_def, "groups_undefined": int(len(g) - n_def),
                         "threshold": t}
    sw = plots._overall_sweep(tables["sweep"])

    def at(th):
        row = sw.iloc[(sw["threshold"].astype(float) - th).abs().argsort().iloc[0]]
        return {k: float(row[k]) for k in ("threshold", "fraction", "ci_low", "ci_high")}

    h["self_repairing"] = at(t) if len(sw) else None
    h["sweep"] = [at(th) for th in SUMMARY_THRESHOLDS] if len(sw) else []
    if len(g) and n_def:
        d = g[np.isfinite(r)]
        hs = tables["head_summary"]  # result.summary(): per head, fraction with its bootstrap interval
        min_n = max(5, int(0.01 * n_def))
        hs = hs[hs["n_defined"] >= min_n].sort_values(["frac_self_repair", "n_defined"], ascending=False).head(3)
        h["top_heads"] = [{"layer": int(x.layer), "head": int(x.head), "fraction": float(x.frac_self_repair),
                           "ci_low": float(x.ci_low), "ci_high": float(x.ci_high), "n": int(x.n_defined),
                           "median_r": float(x.median_interaction)} for x in hs.itertuples()]
        h["top_heads_min_groups"] = min_n
        rep = tables.get("estimates")
        if rep is not None and len(rep):  # compare_estimates' own statistics, all groups
            rep = rep[rep["subset"] == "all"]
            h["spearman_estimate_vs_measured"] = {
                truth: {str(r.estimate).replace("_estimate", ""): float(r.spearman)
                        for r in rep[rep["effect"] == truth].itertuples()}
                for truth in ("local", "global") if (rep["effect"] == truth).any()}
            h["sign_agreement_estimate_vs_measured"] = {
                truth: {str(r.estimate).replace("_estimate", ""): float(r.sign_agreement)
                        for r in rep[rep["effect"] == truth].itertuples()}
                for truth in ("local", "global") if (rep["effect"] == truth).any()}
        if "value_similarity" in g.columns:
            sr = d["self_repair"].astype(bool)
            h["value_similarity_median"] = {"self_repairing": float(d.loc[sr, "value_similarity"].median()),
                                            "other": float(d.loc[~sr, "value_similarity"].median())}
        if "downstream_gap" in g.columns:
            h["downstream_gap_median"] = float(g["downstream_gap"].median())
    if "heads" in tables:
        hd = tables["heads"]
        h["head_ranking_spearman"] = {name: agreement(hd[f"{name}_estimate"], hd["measured"])["spearman"]
                                      for name in ("grad", "gim")}
    return h


def format_summary(h: dict, context: str) -> str:
    lines = [context]
    lines.append(f"groups analysed: {h['groups']} ({h['groups_defined']} with a defined ratio r, "
                 f"{h['groups_undefined']} below the effect floor)")
    sr = h.get("self_repairing")
    if not h["groups_defined"]:
        lines.append("no group with a defined ratio, so none to flag: more prompts (--n) or a lower "
                     "--min-contribution find more groups")
    else:
        ci = f" [95% CI {sr['ci_low']:.1%}, {sr['ci_high']:.1%}]"
        lines.append(f"self-repairing (r > {h['threshold']:g}): {sr['fraction']:.1%}{ci}")
        lines.append("over the sweep: " + ", ".join(f"r > {s['threshold']:g}: {s['fraction']:.1%}" for s in h["sweep"]))
    if h.get("top_heads"):
        lines.append(f"top self-repairing heads (>= {h['top_heads_min_groups']} groups): " + ", ".join(
            f"L{x['layer']}H{x['head']} {x['fraction']:.0%} [{x['ci_low']:.0%}, {x['ci_high']:.0%}] of {x['n']}"
            f" (median r {x['median_r']:.2f})" for x in h["top_heads"]))
    if h.get("value_similarity_median"):
        v = h["value_similarity_median"]
        lines.append(f"value similarity (median): self-repairing {v['self_repairing']:.2f}, other {v['other']:.2f}")
    signs = h.get("sign_agreement_estimate_vs_measured") or {}
    for truth, c in (h.get("spearman_estimate_vs_measured") or {}).items():
        lines.append(f"estimate vs measured {truth} joint effect: Spearman " +
                     ", ".join(f"{k} {v:.2f}" for k, v in c.items()) + "; sign agreement " +
                     ", ".join(f"{k} {v:.0%}" for k, v in signs.get(truth, {}).items()))
    if "downstream_gap_median" in h:
        lines.append(f"downstream gap (global - local interaction), median: {h['downstream_gap_median']:.3g}")
    if h.get("head_ranking_spearman"):
        lines.append("head ranking vs measured ablation (Spearman): " +
                     ", ".join(f"{k} {v:.2f}" for k, v in h["head_ranking_spearman"].items()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- commands


def cmd_analyze(args) -> int:
    timings = Timings()
    t_start, cpu_start = time.perf_counter(), time.process_time()
    if args.figures_only:
        if not args.out:
            raise CLIError("--figures-only needs --out RUN_DIR (a finished run)")
        return _redraw(Path(args.out), Path(args.out) / "figures", png=args.png, plotlyjs="directory")
    if args.resume and not args.out:
        raise CLIError("--resume needs --out RUN_DIR: the folder of the interrupted run")
    settings = _settings_from_args(args)
    device = resolve_device(args.device)
    task_label = Path(args.prompts).stem if args.prompts else (args.task or DEFAULT_TASK)
    out = Path(args.out) if args.out else _default_out(task_label)
    mode = prepare_run_dir(out, resume=args.resume, force=args.force)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with timings("load model"):
        model = _load_model(args.model, device)
    with timings("build task"):
        task = _build_task(model, args)

    task_info = {"name": task_label if args.prompts is None else "jsonl", "n": len(task),
                 "seq_len": int(task.tokens.shape[1]), "metric": task.metric if isinstance(task.metric, str) else "callable"}
    if args.prompts:
        task_info.update(prompts=str(Path(args.prompts).resolve()), prompts_sha256=_file_sha256(Path(args.prompts)))
    else:
        task_info.update(requested_n=args.n, requested_seq_len=args.seq_len)
    run = {"command": "selfrepair analyze", "argv": getattr(args, "argv", None), "settings": settings, "task": task_info,
           "model": _model_info(model, args.model), "seed": args.seed, "head_ablation": args.head_ablation,
           "attribution_n": min(args.attribution_n or len(task), len(task)),
           "device": device, "threads": torch.get_num_threads(), "versions": versions(),
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if mode == "resume":
        old = json.loads((out / "run.json").read_text())
        a, b = _study_key(old), _study_key(_jsonable(run))
        if a != b:
            diff = [k for k in a if a[k] != b.get(k)]
            detail = ", ".join(f"{k}: {a[k]!r} -> {b.get(k)!r}" for k in diff if k != "settings")
            if "settings" in diff:
                detail = ", ".join([f"{k}: {a['settings'].get(k)!r} -> {b['settings'].get(k)!r}"
                                    for k in set(a["settings"]) | set(b["settings"])
                                    if a["settings"].get(k) != b["settings"].get(k)] + ([detail] if detail else []))
            raise CLIError(f"--resume: the options differ from the interrupted run's in {out} ({detail}); "
                           "run the same command with --resume, or pass --force to start over")
        run["started"] = old.get("started")
        run["resumed_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    else:
        if mode == "overwrite":
            _clear_run_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "run.json", run)

    progress = bool(settings.get("progress", True))
    try:
        res = run_study(model, task, settings, out=out, head_ablation=args.head_ablation,
                        attribution_n=args.attribution_n, seed=args.seed, progress=progress, timings=timings)
    except KeyboardInterrupt:
        print(f"selfrepair: interrupted; partial results are kept in {out}: run the same command with --resume "
              "to continue", file=sys.stderr)
        return 130
    except Exception:
        if mode != "resume" and not _has_partial_results(out):
            shutil.rmtree(out, ignore_errors=True)  # e.g. a bad option value found by the API: leave nothing behind
        raise
    tables = res["tables"]
    info = run["model"]
    with timings("figures"):
        figs = make_figures(tables, settings, info.get("n_layers"), info.get("n_heads"))
        paths, png_error = write_figures(figs, out / "figures", png=args.png)
    timings.wall["total"] = round(time.perf_counter() - t_start, 3)
    timings.cpu["total"] = round(time.process_time() - cpu_start, 3)

    h = headline(tables, settings)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                   if p.is_file() and not p.name.startswith(".") and "checkpoints" not in p.parts)
    summary = dict(run, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), timings_s=timings.wall, cpu_s=timings.cpu,
                   resumed_stages=res["resumed"], analysis_meta=res["analysis_meta"], headline=h,
                   figures=_figure_index(figs, out / "figures", png=args.png and not png_error),
                   png_error=png_error, files=files + ["summary.json"])
    write_json(out / "summary.json", summary)
    context = (f"selfrepair analyze: model {info['spec']} (sha256 {info['weights_sha256'][:12]}), task "
               f"{task_info['name']} n={task_info['n']} seq_len={task_info['seq_len']}, k={settings.get('k')}, "
               f"{settings.get('ablation')} ablation, {timings.wall['total']:.0f} s "
               f"({timings.cpu['total']:.0f} s of CPU)")
    print(format_summary(h, context))
    print(f"wrote {len(summary['files'])} files to {out} (tables/, figures/, summary.json)")
    return 0


def _has_partial_results(out: Path) -> bool:
    ck = out / "checkpoints"
    return (ck.is_dir() and any(ck.rglob("*.parquet"))) or ((out / "tables").is_dir() and any((out / "tables").iterdir()))


def _figure_index(figs: dict, fig_dir: Path, *, png: bool) -> dict:
    """What summary.json says about each figure: what it shows, its files and the PNG's pixel size."""
    from . import plots

    out = {}
    for name, fig in figs.items():
        w, h = plots._png_sizes(fig)
        out[name] = {"shows": FIGURES.get(name, name), "html": f"figures/{name}.html",
                     "png": f"figures/{name}.png" if png else None, "png_size": [w, h] if png else None}
    return out


def _redraw(run_dir: Path, out: Path, *, png: bool, plotlyjs: str) -> int:
    if not (run_dir / "summary.json").is_file():
        raise CLIError(f"{run_dir} is not a finished selfrepair run (no summary.json)")
    summary = json.loads((run_dir / "summary.json").read_text())
    tables_dir = run_dir / "tables"
    tables = {p.stem: read_table(tables_dir, p.stem) for p in sorted(tables_dir.glob("*.parquet"))}
    info = summary.get("model", {})
    figs = make_figures(tables, summary["settings"], info.get("n_layers"), info.get("n_heads"))
    paths, err = write_figures(figs, out, png=png, plotlyjs=plotlyjs)
    for p in out.iterdir():  # figures of an earlier run that this one does not have (only our own file names)
        if re.fullmatch(r"\d\d_[a-z_]+\.(html|png)", p.name) and p not in paths:
            p.unlink()
    print(f"wrote {len(paths)} figure files to {out}" + (f" (PNG failed: {err})" if err else ""))
    return 0 if not err else EXIT_ERROR


def cmd_figures(args) -> int:
    run_dir = args.run_dir
    if run_dir is None:
        out = _default_out("default")
        rc = main(["analyze", "--out", str(out)])
        if rc:
            return rc
        run_dir = out
    return _redraw(Path(run_dir), Path(args.out), png=args.png, plotlyjs=args.plotlyjs)


def recipe_from_args(args):
    """The :class:`~selfrepair.training.Recipe` the train-default-model flags describe."""
    from .training import Recipe

    return Recipe(**{f.name: getattr(args, f"recipe_{f.name}") for f in dataclasses.fields(Recipe)})


def cmd_train(args) -> int:
    from .training import train_default_model

    out = Path(args.out)
    if (out / "config.json").exists() and not args.force:
        raise CLIError(f"{out} already holds a checkpoint (config.json); pass --force to overwrite it or choose "
                       "another --out")
    recipe = recipe_from_args(args)
    log = train_default_model(out, recipe, progress=args.progress, snapshots=args.snapshots)
    last = log["curve"][-1] if log.get("curve") else {}
    print(f"trained {recipe.steps} steps in {log.get('train_time_s', 0):.0f} s "
          f"({log.get('tokens_seen', 0):,} tokens); final: " + ", ".join(f"{k} {v:.3g}" for k, v in last.items()
                                                                          if isinstance(v, float)))
    print(f"wrote {out}; analyse it with: selfrepair analyze --model {out}")
    return 0


def cmd_notebooks(args) -> int:
    d = Path(args.dir)
    paths = sorted(d.glob("*.ipynb"))
    if args.names:
        paths = [p for p in paths if p.name in set(args.names)]
        missing = set(args.names) - {p.name for p in paths}
        if missing:
            raise CLIError(f"no notebook(s) {', '.join(sorted(missing))} in {d}")
    if not paths:
        raise CLIError(f"no notebooks in {d}")
    for p in paths:
        t0 = time.perf_counter()
        execute_notebook(p, p, timeout=args.timeout)
        print(f"{p}: executed in {time.perf_counter() - t0:.1f} s")
    return 0


def execute_notebook(src: Path, dst: Path, *, timeout: int = 600, cwd: Optional[Path] = None) -> None:
    """Execute notebook ``src`` end to end (working directory ``cwd``, default its folder) and save it to ``dst``."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(src, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd or Path(src).resolve().parent)}})
    client.execute()
    atomic_write(Path(dst), lambda t: nbformat.write(nb, t))


# ----------------------------------------------------------------------------- entry point


def main(argv: Optional[list[str]] = None) -> int:
    """Console entry point (``selfrepair``); returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        if _debug():
            raise
        print(f"selfrepair: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # bad input found by the library itself (k out of range, unknown head, a model it cannot analyse):
        # one line, not a traceback; anything else is a bug and keeps its traceback
        if _debug() or not _is_user_error(e):
            raise
        print(f"selfrepair: error: {_first_line(e)}", file=sys.stderr)
        return EXIT_ERROR


def _is_user_error(e: BaseException) -> bool:
    """ValueError / FileNotFoundError (the library's checks of its inputs), ModelLoadError, and the
    analysis' RuntimeError for a model whose backend offers no live attention site."""
    from .loading import ModelLoadError

    return isinstance(e, (ValueError, FileNotFoundError, ModelLoadError)) or "backend" in str(e)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
