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
One process owns a run folder at a time (an OS lock on ``<run>/.lock``, taken
before the model loads and released when the process ends in any way); clean-up
removes only the files a run writes. A write that fails (disk full) is one line
and the run stays resumable.

User errors (unknown model offline, unreadable JSONL line, CUDA asked for but
absent, bad option values) print one line on stderr and exit with status 2;
set ``SELFREPAIR_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import inspect
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from .._io import atomic_write
from .._version import __version__ as version
from ..analysis import rows as analysis_modes
from ..engine.cache import FORWARDS
from ..analysis.identity import task_hash
from ..analysis.context import MIN_LENGTH as CONTEXT_MIN_LENGTH
from ..analysis.self_repair import analyze_self_repair
from ..models.facts import model_dims
from ..models.loading import ModelLoadError, load_model
from ..report.page import REPORT_HELP, add_report_arguments, build_report, report_main
from .. import tasks
from ..training import Recipe, train_default_model
from . import distributed
from .pipeline import (EXIT_ERROR, first_line, is_dtype, format_summary, headline, make_figures,
                       model_info, redraw, run_study, write_figures, figure_index, Timings)
from .rundir import (CLIError, clear_run_dir, default_out, file_sha256, has_partial_results, jsonable,
                     attach_run_dir, open_run_dir, prepare_run_dir, read_run_json, remove_run_files, resume_mismatch, study_key,
                     versions, write_json)


# --- defaults of the full study: 29 s on an idle 2-core machine, 141 s on a busy one (the budget is 5 minutes)
DEFAULT_TASK = "code-copy"
DEFAULT_N = 512  # code-copy windows: ~240 groups on the shipped model; see the README for the timing
DEFAULT_SEQ_LEN = None  # the task's own default length (code-copy: 128, induction: 61)
DEFAULT_HEAD_ABLATION = "mean"
DEFAULT_ATTRIBUTION_N = 64  # prompts for the head ranking, token attributions and faithfulness (their cost grows with n)

#: analyze_self_repair arguments whose CLI default differs from the Python API's (and why)
CLI_DEFAULTS = {"global_effects": True}  # the study compares local with global effects
#: flag spellings that differ from ``--<name>``
CLI_FLAGS = {"global_effects": ["--global", "--global-effects"], "score_ablation": ["--score-ablation", "--ablation"]}
#: old flag spellings still accepted one release, with a one-line deprecation note on stderr: old -> new
DEPRECATED_FLAGS = {"--ablation": "--score-ablation"}
#: analyze_self_repair arguments served by a study option of the same name (``--seed`` seeds the task's
#: sampling, torch and the permutation test)
SHARED_OPTIONS = ("seed",)

#: help text per analyze_self_repair argument (the wording of docs/quantities.md)
ANALYSIS_HELP = {
    "k": "number of keys per group (the top-k contributors of a row), 2 to 8, or 'auto' (all contributing keys "
         "of the row, at most --k-max)",
    "k_max": "largest group --k auto analyses (2 to 8; exact Shapley values need 2^k subsets)",
    "n_permutations": "permutations of the contributions per group in the permutation test (permutation_p); 0 "
                      "skips the test (its cost, n_permutations x (query + 1) draws per row, dominates long prompts)",
    "forward": "where q, k, v and dm/dz come from: 'bridge' (the model's own forward and backward), 'own' (our "
               "forward with a fused attention kernel: no attention pattern held, for long contexts) or 'auto' "
               "(own where the bridge would hold >= 256 MiB of attention per batch); checked on every batch",
    "cluster_similarity": "two contributing keys join one cluster (n_clusters) when the cosine of their head "
                          "outputs v_j W_O is at least this",
    "alpha": "false-discovery rate of the permutation test (Benjamini-Hochberg over the analysed groups)",
    "min_contribution": "a row is analysed when at least k keys have contribution w_j = p_j (g . v_j) above this "
                        "(metric units)",
    "select": "rank keys by signed contribution ('positive') or by |w_j| ('abs')",
    "exclude_bos": "drop key 0 (BOS) from selection and from the means",
    "threshold": "a group self-repairs when its interaction ratio r = (E_S - sum E_n) / E_S exceeds this",
    "min_effect": "r is NaN (not counted) when |E_S| < max(min_effect, 0.01 sum |w_j|) (metric units)",
    "score_ablation": "score ablation: 'mean' (a'_j = mean of the row's scores, the GIM paper's) or 'knockout' "
                      "(keys removed, rest renormalised); --ablation is its deprecated old name",
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
    """The keyword arguments of :func:`selfrepair.analyze_self_repair` (everything after model, task; not
    ``shard``, which a torchrun rank sets itself: ``selfrepair.study.distributed``)."""
    return [p for p in inspect.signature(analyze_self_repair).parameters.values()
            if p.name not in ("model", "task", "shard") and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _annotation_text(p: inspect.Parameter) -> str:
    a = p.annotation
    return a if isinstance(a, str) else getattr(a, "__name__", None) or str(a)


#: option -> the analysis module's tuple of valid values (argparse lists them and rejects others)
CHOICES = {"select": "SELECT_MODES", "score_ablation": "ABLATIONS", "value_ablation": "VALUE_ABLATIONS"}


def _choices(name: str) -> Optional[list]:
    if name == "forward":
        return list(FORWARDS)
    return list(getattr(analysis_modes, CHOICES[name])) if name in CHOICES else None


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
        if p.name in SHARED_OPTIONS:
            continue
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
        if name == "k":
            kw.update(type=_k_arg, metavar="{2..8,auto}")
        elif is_dtype(default):
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
        if any(f in DEPRECATED_FLAGS for f in flags):
            kw["action"] = _StoreWithDeprecatedAlias
        g.add_argument(*flags, *[a for a in aliases if "_" in a], **kw)


class _StoreWithDeprecatedAlias(argparse._StoreAction):
    """``store``, with a one-line note on stderr when the option was given by a deprecated spelling."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in DEPRECATED_FLAGS:
            print(f"selfrepair: {option_string} is deprecated and will be removed in the next release; use "
                  f"{DEPRECATED_FLAGS[option_string]} (same meaning)", file=sys.stderr)
        super().__call__(parser, namespace, values, option_string)


def _k_arg(text: str):
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer from 2 to 8 or 'auto', got {text!r}") from None


def _flatten_lists(v):
    if isinstance(v, list) and v and all(isinstance(x, list) for x in v):
        return [int(i) for x in v for i in x]
    return v


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
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

    r = sub.add_parser("report", formatter_class=_Formatter, help=REPORT_HELP,
                       description="Build RUN_DIR/report.html from the run's summary.json and tables: one page that "
                                   "opens offline, headline first, a section per stage with interactive figures, "
                                   "sortable/filterable tables and a drill-down from a group to its attention row. "
                                   "`selfrepair analyze` builds it at the end of every run.")
    add_report_arguments(r)
    r.set_defaults(func=lambda a: report_main(a.run_dir, plotlyjs=a.plotlyjs))

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
    g.add_argument("--n", "--n-prompts", dest="n", type=_positive_int, default=DEFAULT_N,
                   help="number of prompts of a built-in task (--n-prompts under torchrun, whose own options "
                        "take --n as an abbreviation)")
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
    o.add_argument("--context-sweep", dest="context_sweep", type=_int_list, default=None, metavar="L1,L2,...",
                   help="also sweep the copy task over these window lengths (tokens, each at most the model's "
                        "context; code-copy, or continuation-copy for a model without a tokenizer): "
                        "tables/context_sweep and its figure")
    o.add_argument("--stability", action="store_true",
                   help="also measure stability under meaning-preserving edits on the --attribution-n prompts "
                        "(needs the model's tokenizer): tables/stability and its figure")


def _task_names() -> list[str]:
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


def _debug() -> bool:
    return os.environ.get("SELFREPAIR_DEBUG", "") not in ("", "0")


# ----------------------------------------------------------------------------- analyze


def resolve_device(device: str) -> str:
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


def settings_from_args(args) -> dict:
    settings = {}
    for p in analysis_parameters():
        v = getattr(args, p.name)
        settings[p.name] = _flatten_lists(v)
    return settings


def _load_model(spec, device):
    try:
        from transformers.utils import logging as hf_logging  # heavy: only where a Hugging Face model is built

        hf_logging.disable_progress_bar()  # the weights-loading bar; errors must stay one line
    except Exception:  # pragma: no cover
        pass
    try:
        return load_model(spec, device=device)
    except ModelLoadError as e:
        raise CLIError(first_line(e)) from e
    except FileNotFoundError as e:
        raise CLIError(f"--model {spec}: {first_line(e)}") from e
    except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - GPU only
        raise CLIError(f"out of GPU memory loading {spec}: {first_line(e)}") from e


def _build_task(model, args):
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise CLIError(f"--prompts {path}: no such file")
        try:
            return tasks.from_jsonl(path, model)
        except (ValueError, KeyError, TypeError) as e:
            msg = first_line(e)
            raise CLIError(msg if str(path) in msg else f"--prompts {path}: {msg}") from e
    name = args.task or DEFAULT_TASK
    try:
        return tasks.load(name, model, n=args.n, seq_len=args.seq_len, seed=args.seed)
    except (ValueError, KeyError) as e:
        raise CLIError(f"--task {name}: {first_line(e)}") from e


# ----------------------------------------------------------------------------- figures


# ----------------------------------------------------------------------------- summary


# ----------------------------------------------------------------------------- commands


def underflow_line(meta: dict) -> Optional[str]:
    """The summary line for ``n_underflow`` (pattern entries that underflowed to 0 and were clamped), or None."""
    n = int(meta.get("n_underflow") or 0)
    if not n:
        return None
    return (f"{n} attention-pattern entries underflowed to 0 and were clamped to the dtype's smallest log "
            f"(score site {meta.get('score_site', 'pattern')!r}: scores are read as log p; docs/quantities.md, "
            "\"Notation\")")


def cmd_analyze(args) -> int:
    timings = Timings()
    t_start, cpu_start = time.perf_counter(), time.process_time()
    if args.figures_only:
        if not args.out:
            raise CLIError("--figures-only needs --out RUN_DIR (a finished run)")
        return redraw(Path(args.out), Path(args.out) / "figures", png=args.png, plotlyjs="directory")
    if args.resume and not args.out:
        raise CLIError("--resume needs --out RUN_DIR: the folder of the interrupted run")
    settings = settings_from_args(args)
    device = resolve_device(args.device)
    task_label = Path(args.prompts).stem if args.prompts else (args.task or DEFAULT_TASK)
    ranks = distributed.init_process_group(device)  # torchrun: one rank of WORLD_SIZE (one process otherwise)
    if ranks.active and not args.out:
        raise CLIError("torchrun: give --out RUN_DIR (every rank must write into the same run folder)")
    # the folder is created (default names by an exclusive mkdir) and locked before the model loads: an
    # unwritable --out or a folder another process runs in is one line at once. Under torchrun rank 0 owns
    # (locks) the folder; the other ranks write only into their own shard folders inside it.
    if ranks.active and not ranks.is_main:
        rundir = attach_run_dir(Path(args.out))
    else:
        rundir = open_run_dir(Path(args.out) if args.out else None, task_label)
    out = rundir.path
    resume, force = args.resume, args.force
    if ranks.active and distributed.restart_count() > 0 and (out / "run.json").is_file():
        resume, force = True, False  # restarted by torchrun (--max-restarts): continue from the checkpoints
    try:
        mode = prepare_run_dir(out, resume=resume, force=force)
    except CLIError:
        rundir.refuse()  # a folder it may not use: as it was
        raise
    try:
        return _analyze_in(rundir, mode, args, settings, device, task_label, timings, t_start, cpu_start, ranks)
    except KeyboardInterrupt:
        print(f"selfrepair: interrupted; partial results are kept in {out}: run the same command with --resume "
              "to continue", file=sys.stderr)
        return 130
    except OSError as e:
        if not _is_write_error(e, out):
            if not ranks.active:
                _clean_after_failure(rundir, mode)
            raise
        # disk full, read-only, permissions: keep everything (the run stays resumable), one line naming the file
        where = getattr(e, "filename", None) or out
        then = ("run the same command with --resume to continue" if (out / "run.json").is_file()
                else "run the same command again")
        raise CLIError(f"cannot write {where}: {_cause(e)}; what was done is kept in {out}: free space (or fix the "
                       f"permissions) and {then}") from e
    except BaseException:
        # under torchrun a failed rank's shard checkpoints are kept for the restart; only a refusal before any
        # work (no run.json yet, e.g. ranks that disagree) is cleaned up, by rank 0, which owns the folder
        if not ranks.active or (ranks.is_main and not (out / "run.json").is_file()):
            _clean_after_failure(rundir, mode)
        raise
    finally:
        rundir.release()


def _is_write_error(e: OSError, out: Path) -> bool:
    """Disk full, read-only, no permission (:data:`WRITE_ERRNOS`), or any OSError about a path in the run folder."""
    f = getattr(e, "filename", None)
    return e.errno in WRITE_ERRNOS or (f is not None and str(out) in str(f))


def _clean_after_failure(rundir, mode: str) -> None:
    """A new run that failed before keeping any partial result leaves nothing behind: only our files, and the
    folders we created when empty (an option value the analysis rejects, found late)."""
    out = rundir.path
    if mode == "resume" or has_partial_results(out):
        return
    if rundir.created:
        rundir.cleanup()
    else:  # the folder was there (empty, or a run --force cleared): our files go, the folder stays
        remove_run_files(out, lock=mode == "new")


def _analyze_in(rundir, mode, args, settings, device, task_label, timings, t_start, cpu_start, ranks) -> int:
    out = rundir.path
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with timings("load model"):
        model = _load_model(args.model, distributed.rank_device(device, ranks))
    with timings("build task"):
        task = _build_task(model, args)
    lengths = getattr(args, "context_sweep", None)
    if lengths:
        _, n_ctx = model_dims(model)
        too_long = [x for x in lengths if x > n_ctx]
        if too_long or min(lengths) < CONTEXT_MIN_LENGTH:
            raise CLIError(f"--context-sweep: window lengths must lie in [{CONTEXT_MIN_LENGTH}, {n_ctx}] (the model's "
                           f"context); got {lengths}")
    if getattr(args, "stability", False) and tasks.get_tokenizer(model) is None:
        raise CLIError("--stability edits prompt text and needs the model's tokenizer; this model has none")

    task_info = {"name": task_label if args.prompts is None else "jsonl", "n": len(task),
                 "seq_len": int(task.tokens.shape[1]), "metric": task.metric if isinstance(task.metric, str) else "callable"}
    if args.prompts:
        task_info.update(prompts=str(args.prompts), prompts_sha256=file_sha256(Path(args.prompts)))
    else:
        task_info.update(requested_n=args.n, requested_seq_len=args.seq_len)
    run = {"command": "selfrepair analyze", "argv": getattr(args, "argv", None), "settings": settings, "task": task_info,
           "model": model_info(model, args.model), "seed": args.seed, "head_ablation": args.head_ablation,
           "attribution_n": min(args.attribution_n or len(task), len(task)),
           "context_sweep": lengths or None, "stability": bool(getattr(args, "stability", False)),
           "device": device, "threads": torch.get_num_threads(), "versions": versions(),
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if ranks.active:  # every rank the same model, task and settings, refused before any work
        run["world_size"] = ranks.world_size
        identity = dict(study_key(run), weights_sha256=run["model"]["weights_sha256"], task_sha256=task_hash(task))
        distributed.check_agreement(dict(identity, mode=mode), ranks)
    if mode == "resume":
        old = read_run_json(out / "run.json")
        detail = resume_mismatch(old, run)
        if detail:
            raise CLIError(f"--resume: the options differ from the interrupted run's in {out} ({detail}); "
                           "run the same command with --resume, or pass --force to start over")
        run["started"] = old.get("started")
        run["resumed_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    elif ranks.is_main:
        if mode == "overwrite":
            clear_run_dir(out)
        write_json(out / "run.json", run)
    distributed.barrier(ranks)  # rank 0 has prepared the folder

    progress = bool(settings.get("progress", True))
    key = dict(study_key(jsonable(run)), weights_sha256=run["model"].get("weights_sha256"))
    if ranks.active:
        res = distributed.run_sharded(model, task, settings, out=out, head_ablation=args.head_ablation,
                                      attribution_n=args.attribution_n, seed=args.seed, progress=progress,
                                      timings=timings, identity=identity, resume=mode == "resume", key=key)
        if res is None:
            return 0  # rank 0 merges and writes the figures and summary.json
    else:
        res = run_study(model, task, settings, out=out, head_ablation=args.head_ablation,
                        attribution_n=args.attribution_n, seed=args.seed, progress=progress, timings=timings,
                        resume=mode == "resume", key=key, context_lengths=lengths or None,
                        with_stability=bool(getattr(args, "stability", False)))
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
                   figures=figure_index(figs, out / "figures", png=args.png and not png_error),
                   png_error=png_error, files=files + ["summary.json"])
    write_json(out / "summary.json", summary)
    # the report reads the finished run (summary.json + tables); it is derived, so a failure to build it
    # is reported but does not fail the run (`selfrepair report RUN_DIR` rebuilds it)
    built = False
    with timings("report"):
        try:
            build_report(out)
            built = True
        except Exception as e:  # noqa: BLE001 - any failure: the run's tables and figures stand
            print(f"selfrepair: warning: report.html was not built ({first_line(e)}); rebuild it with "
                  f"`selfrepair report {out}`", file=sys.stderr)
    if built:
        summary["files"] = sorted(summary["files"] + ["report.html"])
        summary["timings_s"] = dict(timings.wall)
        write_json(out / "summary.json", summary)
    context = (f"selfrepair analyze: model {info['spec']} (sha256 {info['weights_sha256'][:12]}), task "
               f"{task_info['name']} n={task_info['n']} seq_len={task_info['seq_len']}, k={settings.get('k')}, "
               f"{settings.get('score_ablation')} ablation, {timings.wall['total']:.0f} s "
               f"({timings.cpu['total']:.0f} s of CPU)")
    print(format_summary(h, context))
    uline = underflow_line(res["analysis_meta"] or {})
    if uline:
        print(uline)
    print(f"wrote {len(summary['files'])} files to {out} (tables/, figures/, summary.json"
          f"{', report.html' if 'report.html' in summary['files'] else ''})")
    return 0


def cmd_figures(args) -> int:
    run_dir = args.run_dir
    if run_dir is None:
        out = default_out("default")  # a new folder of our own (exclusive mkdir)
        rc = main(["analyze", "--out", str(out)])
        if rc:
            try:
                out.rmdir()  # only when the failed run left it empty
            except OSError:
                pass
            return rc
        run_dir = out
    return redraw(Path(run_dir), Path(args.out), png=args.png, plotlyjs=args.plotlyjs)


def recipe_from_args(args):
    """The :class:`~selfrepair.training.Recipe` the train-default-model flags describe."""
    return Recipe(**{f.name: getattr(args, f"recipe_{f.name}") for f in dataclasses.fields(Recipe)})


def cmd_train(args) -> int:
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
    import nbformat  # optional: only for notebooks (test extra)
    from nbclient import NotebookClient  # optional: only for notebooks (test extra)

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
    except OSError as e:
        # a file the command had to write (or read) and could not: one line naming it and the cause
        if _debug() or (not isinstance(e, FileNotFoundError) and e.errno not in WRITE_ERRNOS):
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"selfrepair: error: {where}{_cause(e) if not isinstance(e, FileNotFoundError) else first_line(e)}",
              file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, RuntimeError) as e:
        # bad input found by the library itself (k out of range, unknown head, a model it cannot analyse):
        # one line, not a traceback; anything else is a bug and keeps its traceback
        if _debug() or not _is_user_error(e):
            raise
        print(f"selfrepair: error: {first_line(e)}", file=sys.stderr)
        return EXIT_ERROR


#: OSError numbers that mean "cannot write here" (one line, exit 2): full disk or quota, read-only, permissions
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _cause(e: BaseException) -> str:
    return getattr(e, "strerror", None) or first_line(e)


def _is_user_error(e: BaseException) -> bool:
    """ValueError / FileNotFoundError (the library's checks of its inputs), ModelLoadError, and the
    analysis' RuntimeError for a model whose backend offers no live attention site."""
    return isinstance(e, (ValueError, FileNotFoundError, ModelLoadError)) or "backend" in str(e)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
