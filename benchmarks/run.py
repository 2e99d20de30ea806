"""Benchmarks (issue 6): the global-ablation engine and GIM, measured against what users do today.

Run from the repository root::

    python benchmarks/run.py                 # full run, tables on stdout (~10 min on 2 CPU cores)
    python benchmarks/run.py --json          # ... and one JSON line last
    python benchmarks/run.py --quick --json  # tiny setting (the smoke test), well under a minute
    python benchmarks/run.py --device cuda   # GPU: GPT-2-small-sized model built from a config

Everything is measured side by side in ONE run, on the same model and inputs, in
interleaved rounds; the report gives medians and ratios (bare times depend on the
machine and, on a shared machine, on its load).

1. Global ablations. Workload: on a trained model (the shipped default), the groups
   ``analyze_self_repair`` selects on the code-copy task (k = 2; each group gives its k
   individual and its joint score ablation, docs/quantities.md "Local effects": mean ablation); on a model with
   random weights (selection finds little there) a fixed, seeded set of ``--n-random``
   (default 1,000) ablations of a key pair at a random (prompt, layer, head, query).
   Baseline: the loop a notebook user writes today, one ``model.run_with_hooks`` per
   ablation, full logits, with an edit at ``hook_pattern`` that replaces the ablated
   row by the softmax of the mean-ablated scores (scores read at the backend's scores
   hook in the same forward; ``log p`` where the backend has no live scores hook).
   Engine: the z edits ``delta = sum_j (p'_j - p_j) v_j`` from the clean scores and
   values, ``prepare_clean`` and ``measure_z_edits``; its time INCLUDES all three.
   ``batched_speedup = baseline time / engine time``. The clean scores and values
   (``cached_run``, forward only) come with the self-repair analysis that selected the
   workload (``analyze_self_repair`` computes the same z edits from its own cached
   run); that forward is timed too, and ``batched_speedup_with_cache`` counts it in
   the engine's time as well. The
   baseline is timed on a different seeded sample of the workload in each round and
   extrapolated per ablation (its cost per ablation is one full forward of the
   prompt, whatever the ablation); the clean forwards both need once per prompt are
   left out of the baseline (in its favour). ``max_abs_diff``: the largest
   |engine - baseline| over the ablations the baseline ran, in metric units.
   ``ideal_speedup`` = ``selfrepair.engine.flops``: FLOPs of the baseline (a full
   forward with full logits per ablation) over the minimum the engine must do (per
   ablation at layer l, query i: layers l..L-1 at positions i..P, one unembedding;
   P the metric position). A multiply-add is 2 FLOPs; per token and layer
   ``2 d (H dh) + 4 d (kvh dh) + 2 (H dh) d`` for q, k, v, o, ``4 H dh (i + 1)`` for
   scores and mixing at query i, ``2 d d_mlp x (3 gated / 2)`` for the MLP, ``2 d V``
   per unembedded token; norms and softmax ignored. Goal:
   ``batched_speedup >= min(20, 0.8 * ideal_speedup)``. ``prepare_clean`` checks its own forward
   against the bridge on every prompt once per model and settings, then on a seeded 1/16 of the
   prompts per call (``own_forward_checks``: the check of each round).
2. Local analysis: ``analyze_self_repair(global_effects=False)`` over all heads and query
   rows, one subprocess per size so that peak memory is the subprocess's own (on CPU
   the peak resident set during the analysis minus the resident set before it: Linux
   ``VmHWM`` after resetting it through ``/proc/self/clear_refs``, else ``ru_maxrss``;
   on GPU ``torch.cuda.max_memory_allocated`` above the memory held before): the main model at 128 and 256 tokens, and a GPT-2-small-sized model from
   a config (12 layers, 12 heads, d_model 768, n_ctx 1024, vocab 50257, random weights,
   2 prompts) at 128 to 1024 tokens. With random weights ``min_contribution = 0`` (every
   row with two positive contributions is analysed: the heaviest case); on a trained
   model the ``min_contribution`` the global workload settled on.
2b. Analysis vs one forward + backward (``--stream-lengths``, default 1,024, 2,048, 4,096 tokens): a
   GPT-2-small-shaped model from a config (n_ctx = max(1024, length), random weights), 1 random prompt,
   ``analyze_self_repair(min_contribution=0, select="abs")`` against one plain forward + backward of the
   metric through the same bridge (``fwd_bwd``), in one subprocess per length, in the order fwd_bwd,
   analysis, fwd_bwd: ``analysis_vs_fwd_bwd_time`` (process CPU seconds on the CPU, wall on a GPU; the
   analysis over the mean of the two) and ``analysis_vs_fwd_bwd_memory`` (peak memory growth of each).
   Goals: <= 1.5 and <= 1.25 at 1,024 and 2,048 tokens; the analysis completes at 4,096.
3. GIM cost: one forward + backward (gradient of ``sum m`` at the token embeddings,
   ``hook_embed``) inside ``selfrepair.gim`` versus the same with plain autograd
   (``gim_overhead``: median over interleaved rounds of the per-round ratio, each
   sample repeating calls to last >= ``--min-sample`` s; the headline is the max over
   the lengths of the main model and GPT-2 small, goal <= 1.2 at every length;
   ``gim_overhead_native`` the same on the native twin) and versus gim-explain's ``GIM``
   where it runs (a TL-native bridge of the main model's shape; on HF-wrapped bridges
   it crashes, which is recorded). Where the overhead passes 1.2 (or with
   ``--gim-components``), each GIM component is timed alone (``components``).
4. torchrun (``--skip torchrun`` to leave out; CPU only, needs the shipped model): the same
   ``selfrepair analyze`` study (induction prompts, one torch thread per process) run as one
   process and as ``torchrun --standalone --nproc-per-node 2`` (gloo), each timed wall-clock as a
   whole command (start-up, model load, every stage, figures); ``torchrun_identical``: every table
   of the two run folders equal exactly; ``torchrun_speedup`` = one-process seconds / 2-process
   seconds (at most 2 on 2 cores; start-up and the stages that run whole on one rank keep it lower).
5. ``--device cuda``: the same on a GPU, plus the engine's throughput (ablations/s) and
   its FLOP rate (the minimal work of ``flops()['minimum_tight']`` per second of
   ``measure_z_edits``, a lower bound on what the hardware executes) as a share of the
   GPU's peak for the precision used (float32; the FP32 CUDA-core peak, or the dense
   TF32 tensor-core peak with ``--tf32``).

5. Reduced precision (``bf16``; docs/quantities.md, "Reduced precision"): the shipped model loaded in
   float32 and in bfloat16, ``analyze_self_repair`` on the code-copy task (``--bf16-prompts``, default 32;
   ``min_contribution`` 0.3, about 70 groups, so that one group is ~1.4% of the overlap): ``bf16_group_overlap``
   (|common| / |union| of the (prompt, layer, head, query) groups), ``bf16_flag_agreement`` (same
   ``self_repair`` flag on the common groups), ``bf16_effect_rel_diff`` (median |E_S(bf16) - E_S(f32)| / |E_S(f32)|).
   Goals: >= 0.95, >= 0.95, <= 0.02 (issue 14).

Threads: ``--threads`` (default 1) intra-op threads on the CPU. On a 2-core machine
shared with other jobs, 2 OpenMP threads contend and a forward can run 40x slower
than on one; 1 thread keeps the ratios meaningful. ``--threads 2`` uses both cores
of an idle machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(REPO))

from selfrepair._devices import model_device, model_dtype  # noqa: E402  (after the path above)
from selfrepair.engine.kernels import ablated_pattern  # noqa: E402
from selfrepair.models.facts import model_dims, model_facts  # noqa: E402

#: shapes of the models built from configs (random weights, seeded)
SHAPES = {
    # the shipped default model's shape (GPT-2 arch, 4 layers, 4 heads, d_model 128, ctx 256, vocab 1024)
    "default-random": dict(n_layer=4, n_head=4, n_embd=128, n_positions=256, vocab_size=1024),
    # GPT-2 small
    "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257),
}

#: dense peak TFLOP/s by GPU name substring: (FP32 CUDA cores, TF32 tensor cores, BF16/FP16 tensor cores);
#: first match wins (more specific names first). Vendor datasheet figures, without sparsity.
GPU_PEAKS = [
    ("H100 PCIe", (51.2, 378.0, 756.0)),
    ("H100 NVL", (60.0, 418.0, 835.0)),
    ("H100", (66.9, 494.7, 989.4)),       # SXM
    ("H200", (66.9, 494.7, 989.4)),
    ("GH200", (66.9, 494.7, 989.4)),
    ("B200", (80.0, 1100.0, 2250.0)),
    ("A100", (19.5, 156.0, 312.0)),
    ("A800", (19.5, 156.0, 312.0)),
    ("L40S", (91.6, 183.0, 366.0)),
    ("L40", (90.5, 90.5, 181.0)),
    ("L4", (30.3, 60.0, 121.0)),
    ("A10G", (31.2, 62.5, 125.0)),
    ("A10", (31.2, 62.5, 125.0)),
    ("A6000", (38.7, 77.4, 154.8)),
    ("RTX 4090", (82.6, 82.6, 165.2)),
    ("RTX 3090", (35.6, 35.6, 71.0)),
    ("V100", (15.7, float("nan"), 125.0)),
    ("T4", (8.1, float("nan"), 65.0)),
]

GOAL_DIFF = 1e-4
GOAL_GIM = 1.2
GOAL_BF16 = dict(overlap=0.95, flag=0.95, rel=0.02)


# =========================================================================== small helpers


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


@contextmanager
def timer(device: str, out: list):
    sync(device)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        sync(device)
        out.append(time.perf_counter() - t0)


def median(xs):
    return float(statistics.median(xs)) if xs else float("nan")


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(float(x))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict:
    info = dict(cores=os.cpu_count(), torch_threads=torch.get_num_threads(), cpu_model=cpu_model(),
                device=device, torch=torch.__version__, python=platform.python_version())
    try:
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def gpu_peak_tflops(name: str, tf32: bool) -> tuple:
    """(peak TFLOP/s for float32 matmuls as run, which precision that is) for a GPU name; (nan, ...) if unknown."""
    for key, (fp32, tf32_peak, _bf16) in GPU_PEAKS:
        if key.lower() in name.lower():
            if tf32 and math.isfinite(tf32_peak):
                return tf32_peak, f"TF32 tensor cores (dense), {key}"
            return fp32, f"FP32 CUDA cores, {key}"
    return float("nan"), f"unknown GPU {name!r} (add it to GPU_PEAKS)"


# =========================================================================== models and tasks


def quiet():
    warnings.simplefilter("ignore")
    for name in ("transformers", "transformer_lens"):
        import logging

        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except Exception:
        pass


def default_model_exists() -> bool:
    from selfrepair.models.loading import DEFAULT_MODEL_DIR

    return (DEFAULT_MODEL_DIR / "config.json").is_file()


def build_model(spec: str, device: str, seed: int = 0, n_ctx: Optional[int] = None):
    """``(model, info)``. ``spec``: "default" (the shipped model; its random-weight twin if it is not there yet),
    "default-random", "gpt2-small" (built from configs, random weights, seeded), or anything
    ``selfrepair.load_model`` takes (a checkpoint directory, a llama2.c ``.bin``)."""
    import transformers

    import selfrepair

    notes = []
    if spec == "default" and not default_model_exists():
        notes.append("the shipped default model is not there (selfrepair/data/default_model); "
                     "using a random-weight GPT-2 of its shape instead")
        spec = "default-random"
    if spec in SHAPES:
        torch.manual_seed(seed)
        shape = dict(SHAPES[spec], **({} if n_ctx is None else dict(n_positions=int(n_ctx))))
        cfg = transformers.GPT2Config(**shape, bos_token_id=0, eos_token_id=0)
        model = selfrepair.load_model(cfg, device=device, dtype=torch.float32)
        random_weights = True
    else:
        model = selfrepair.load_model(None if spec == "default" else spec, device=device)
        random_weights = False
    model.eval()
    c = model.cfg
    info = dict(spec=spec, random_weights=random_weights, n_layers=int(c.n_layers), n_heads=int(c.n_heads),
                d_model=int(c.d_model), n_ctx=int(c.n_ctx), d_vocab=int(c.d_vocab),
                architecture=type(model.__dict__.get("original_model", model)).__name__, notes=notes)
    return model, info


def random_task(model, n: int, seq_len: int, seed: int = 0):
    """n prompts of ``seq_len`` uniform random tokens (seeded); metric at the last token, random answer/wrong."""
    from selfrepair.tasks import Task

    V, _ = model_dims(model)
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(1, V, (n, seq_len), generator=g)
    ans = torch.randint(1, V, (n,), generator=g)
    wrong = (ans + torch.randint(1, V - 1, (n,), generator=g) - 1) % (V - 1) + 1
    return Task(toks, ans, wrong, name=f"random-{seq_len}")


def make_task(model, info: dict, n: int, seq_len: int, seed: int = 0):
    """code-copy on a trained model with a tokenizer; induction (1 + 3L tokens) without one; random tokens
    on random weights."""
    from selfrepair import tasks

    seq_len = min(seq_len, info["n_ctx"])
    if info["random_weights"]:
        return random_task(model, n, seq_len, seed)
    if getattr(model, "tokenizer", None) is not None:
        return tasks.load("code-copy", model, n=n, seq_len=seq_len, seed=seed)
    L = (seq_len - 1) // 3
    return tasks.load("induction", model, n=n, seq_len=1 + 3 * L, seed=seed)


# =========================================================================== 1. global ablations


class Ablations:
    """n score ablations: (prompt, layer, head, query, keys [n, kmax] padded with -1)."""

    def __init__(self, prompt, layer, head, query, keys):
        self.prompt = torch.as_tensor(prompt, dtype=torch.long)
        self.layer = torch.as_tensor(layer, dtype=torch.long)
        self.head = torch.as_tensor(head, dtype=torch.long)
        self.query = torch.as_tensor(query, dtype=torch.long)
        self.keys = torch.as_tensor(keys, dtype=torch.long)

    def __len__(self):
        return int(self.prompt.shape[0])

    def row(self, r: int):
        ks = [int(k) for k in self.keys[r] if int(k) >= 0]
        return int(self.prompt[r]), int(self.layer[r]), int(self.head[r]), int(self.query[r]), ks


def random_ablations(model, task, n: int, seed: int = 0) -> Ablations:
    """A fixed, seeded set of n (prompt, layer, head, query, key pair) ablations: query uniform in 1..P (two
    keys needed), the pair two distinct keys among 0..query."""
    g = torch.Generator().manual_seed(seed)
    facts = model_facts(model)
    L, H = facts.n_layers, facts.n_heads
    b = torch.randint(0, len(task), (n,), generator=g)
    P = task.positions[b]
    q = 1 + (torch.rand(n, generator=g) * P.double()).long().clamp(max=P - 1)
    k1 = (torch.rand(n, generator=g) * (q + 1).double()).long()
    k2 = (k1 + 1 + (torch.rand(n, generator=g) * q.double()).long()) % (q + 1)
    return Ablations(b, torch.randint(0, L, (n,), generator=g), torch.randint(0, H, (n,), generator=g), q,
                     torch.stack([k1, k2], 1))


def groups_to_ablations(groups, k: int) -> Ablations:
    """The k individual and the joint ablation of each group (rows in that order)."""
    pr, ly, hd, qr, keys = [], [], [], [], []
    for row in groups.itertuples(index=False):
        ks = list(row.keys)
        for sub in [[x] for x in ks] + [ks]:
            pr.append(row.prompt)
            ly.append(row.layer)
            hd.append(row.head)
            qr.append(row.query)
            keys.append(sub + [-1] * (k - len(sub)))
    return Ablations(pr, ly, hd, qr, keys)


def select_workload(model, info, task, *, k: int, min_contribution: float, target_groups: int, max_groups: int,
                    seed: int, progress: bool):
    """Groups the self-repair analysis selects; min_contribution halved (stated) until >= target_groups."""
    from selfrepair import analyze_self_repair

    notes = []
    mc = float(min_contribution)
    tries = []
    while True:
        res = analyze_self_repair(model, task, k=k, min_contribution=mc, global_effects=False, progress=False)
        tries.append((mc, len(res.groups)))
        if len(res.groups) >= target_groups or mc <= 1.0 / 64:
            break
        mc /= 2
    if mc != float(min_contribution):
        notes.append(f"selection at min_contribution={min_contribution:g} found {tries[0][1]} groups "
                     f"(< {target_groups}); lowered to {mc:g} ({len(res.groups)} groups)")
    t0 = time.perf_counter()
    res = analyze_self_repair(model, task, k=k, min_contribution=mc, global_effects=True, progress=progress)
    t_analysis = time.perf_counter() - t0
    groups = res.groups
    if len(groups) > max_groups:
        groups = groups.sample(n=max_groups, random_state=seed).sort_index()
        notes.append(f"{len(res.groups)} groups selected; a seeded sample of {max_groups} is the workload")
    return groups, mc, dict(tries=tries, analysis_seconds=t_analysis,
                            analysis_seconds_local=res.meta.get("seconds_local"),
                            analysis_seconds_global=res.meta.get("seconds_global"),
                            groups_selected=len(res.groups)), notes


def score_ablation_deltas(run, abl: Ablations, chunk: int = 256) -> torch.Tensor:
    """``z_i' - z_i = sum_j (p'_j - p_j) v_j`` per ablation (docs/quantities.md, "Local effects": mean score ablation), float64 -> [n, d_head]."""
    n = len(abl)
    d = next(iter(run.values.values())).shape[-1]
    dev = run.mask.device
    out = torch.zeros(n, d, dtype=torch.float64, device=dev)
    for l in torch.unique(abl.layer).tolist():
        idx = (abl.layer == l).nonzero()[:, 0]
        for s in range(0, idx.numel(), chunk):
            r = idx[s:s + chunk]
            b, h, i = abl.prompt[r].to(dev), abl.head[r].to(dev), abl.query[r].to(dev)
            a = run.scores[l][b, h, i].double()                                   # [R, n]
            m = run.mask[b, i]                                                    # [R, n] causal & padding
            v = run.values[l][b, :, h].double()                                   # [R, n, d]
            keys = abl.keys[r].to(dev)
            sel = (torch.arange(m.shape[1], device=dev)[None, None, :] == keys[:, :, None]).any(1)  # -1 pads: none
            p = ablated_pattern(a, m, torch.zeros_like(sel))                      # the clean row
            p2 = ablated_pattern(a, m, sel, score_ablation="mean")                     # docs/quantities.md, "Local effects": mean score ablation
            out[r.to(dev)] = torch.einsum("rn,rnd->rd", p2 - p, v)
    return out


def engine_effects(model, task, abl: Ablations, *, progress: bool = False):
    """The engine end to end: clean scores/values, z edits, prepare_clean, measure_z_edits. -> (effects, parts)."""
    from selfrepair.engine import ZEdits, cached_run, prepare_clean, run_z_edits

    device = str(model_device(model).type)
    parts: Dict[str, list] = {"cache": [], "deltas": [], "prepare_clean": [], "measure": []}
    layers = sorted(set(abl.layer.tolist()))
    with timer(device, parts["cache"]):
        run = cached_run(model, task, layers=layers, backward=False, keep=("scores", "values"))
    with timer(device, parts["deltas"]):
        delta = score_ablation_deltas(run, abl)
        del run
        dt = model_dtype(model)
        edits = ZEdits(abl.prompt, abl.layer, abl.head, abl.query, delta.to(dt)[:, None, :].cpu())
    with timer(device, parts["prepare_clean"]):
        clean = prepare_clean(model, task)
    with timer(device, parts["measure"]):
        run = run_z_edits(model, task, edits, clean=clean, progress=progress)
        out = run.effects
    info = {k: v[0] for k, v in parts.items()}
    info.update(path=run.path, fast_kind=run.fast_kind, forwards=run.forwards, skipped=run.skipped,
                check_mode=clean.check_mode, check_prompts=clean.check_prompts)
    return out.double(), info, edits


def baseline_effect(model, backend, task, row, m_clean: float) -> float:
    """What a notebook user writes: one run_with_hooks per ablation, full logits, hook_pattern edit."""
    b, l, h, i, keys = row
    T = int(task.lengths[b])
    device = model_device(model)
    toks = task.tokens[b:b + 1, :T].to(device)
    keep = torch.arange(T, device=device) <= i                    # causal mask of row i (prompts are unpadded)
    ks = torch.tensor(keys, device=device)
    stash = {}

    def save_scores(a, hook):
        stash["a"] = a[0, h, i].detach().double()

    def edit_pattern(p, hook):
        a = stash["a"] if "a" in stash else torch.log(p[0, h, i].detach().double())
        a = a.masked_fill(~keep, float("-inf"))
        a2 = a.clone()
        a2[ks] = a[keep].mean()                                   # docs/quantities.md, "Local effects", mean: mean of the row's unmasked scores
        p = p.clone()
        p[0, h, i] = torch.softmax(a2, -1).to(p.dtype)
        return p

    hooks = [(backend.hook(backend.pattern_hook, l), edit_pattern)]
    if backend.score_site == "scores":
        hooks.insert(0, (backend.hook(backend.scores_hook, l), save_scores))
    with torch.no_grad():
        logits = model.run_with_hooks(toks, fwd_hooks=hooks)       # [1, T, vocab]
        m = task.metric_from_full_logits(logits, torch.tensor([b]))
    return m_clean - float(m[0])


def clean_metrics(model, task) -> Dict[int, float]:
    device = model_device(model)
    out = {}
    with torch.no_grad():
        for b in range(len(task)):
            T = int(task.lengths[b])
            logits = model(task.tokens[b:b + 1, :T].to(device))
            out[b] = float(task.metric_from_full_logits(logits, torch.tensor([b]))[0])
    return out


def bench_global(model, info, args, device: str) -> dict:
    import selfrepair
    from selfrepair.engine import flops

    notes: List[str] = []
    task = make_task(model, info, args.prompts, args.seq_len, seed=args.seed)
    res: Dict[str, Any] = dict(task=task.name, prompts=len(task), seq_len=int(task.tokens.shape[1]))
    if info["random_weights"]:
        abl = random_ablations(model, task, args.n_random, seed=args.seed)
        res.update(workload=f"seeded random: {len(abl)} (layer, head, query, key pair) mean ablations")
        analysis_G = None
    else:
        log(f"[global] selecting groups on {task.name} ({len(task)} prompts x {res['seq_len']} tokens)")
        groups, mc, sinfo, n2 = select_workload(model, info, task, k=args.k, min_contribution=args.min_contribution,
                                                target_groups=args.target_groups, max_groups=args.max_groups,
                                                seed=args.seed, progress=False)
        notes += n2
        if len(groups) == 0:
            notes.append("selection found no groups even at the lowest min_contribution; using the seeded random "
                         "workload instead")
            abl = random_ablations(model, task, args.n_random, seed=args.seed)
            res.update(workload=f"seeded random: {len(abl)} (layer, head, query, key pair) mean ablations")
            analysis_G = None
        else:
            abl = groups_to_ablations(groups, args.k)
            res.update(workload=f"self-repair groups: {len(groups)} groups x (k={args.k} individual + 1 joint) "
                                f"= {len(abl)} mean ablations", min_contribution=mc, groups=len(groups), **sinfo)
            G = [list(g) + [gs] for g, gs in zip(groups["global_effects"], groups["global_effect_joint"])]
            analysis_G = torch.tensor(G, dtype=torch.float64).reshape(-1)
    res["ablations"] = len(abl)
    backend = selfrepair.probe(model)

    # warm-up (lazy initialisation, allocator), untimed
    log(f"[global] {len(abl)} ablations; warm-up")
    small = Ablations(abl.prompt[:8], abl.layer[:8], abl.head[:8], abl.query[:8], abl.keys[:8])
    engine_effects(model, task, small)
    m_clean = clean_metrics(model, task)
    baseline_effect(model, backend, task, abl.row(0), m_clean[abl.row(0)[0]])

    rng = random.Random(args.seed)
    order = list(range(len(abl)))
    rng.shuffle(order)
    per = min(args.baseline_sample, max(1, len(abl) // args.rounds))
    t_base, t_eng, t_all, parts_all, diffs = [], [], [], [], []
    eng = None
    for r in range(args.rounds):
        sample = order[r * per:(r + 1) * per] or order[:per]
        tb = []
        with timer(device, tb):
            base = [baseline_effect(model, backend, task, abl.row(j), m_clean[abl.row(j)[0]]) for j in sample]
        t_base.append(tb[0] / len(sample))
        te = []
        with timer(device, te):
            out, parts, edits = engine_effects(model, task, abl)
        t_all.append(te[0])
        t_eng.append(parts["deltas"] + parts["prepare_clean"] + parts["measure"])
        parts_all.append(parts)
        if eng is not None and not torch.equal(eng, out):
            notes.append("engine results differ between rounds (nondeterministic kernels)")
        eng = out
        diffs += [abs(float(out[j]) - bj) for j, bj in zip(sample, base)]
        log(f"[global] round {r + 1}/{args.rounds}: baseline {tb[0] / len(sample) * 1e3:.1f} ms/ablation, "
            f"engine {t_eng[-1]:.2f} s ({te[0]:.2f} s with the scores/values cache) for {len(abl)}")
    fl = flops(model, task, edits)
    base_time = median(t_base) * len(abl)
    eng_time = median(t_eng)
    speed = median([tb * len(abl) / te for tb, te in zip(t_base, t_eng)])   # per-round ratios: load drifts
    speed_all = median([tb * len(abl) / te for tb, te in zip(t_base, t_all)])
    ideal = fl["ideal_speedup"]
    target = min(20.0, 0.8 * ideal)
    parts_med = {k: median([p[k] for p in parts_all]) for k in ("cache", "deltas", "prepare_clean", "measure")}
    res.update(
        baseline_seconds_per_ablation=median(t_base), baseline_seconds=base_time,
        baseline_ablations_timed=per * args.rounds, baseline_rounds=args.rounds,
        engine_seconds=eng_time, engine_seconds_with_cache=median(t_all), engine_parts_seconds=parts_med,
        engine_path=parts_all[-1]["path"],
        engine_fast_kind=parts_all[-1]["fast_kind"], engine_forwards=parts_all[-1]["forwards"],
        engine_skipped_exact_zero=parts_all[-1]["skipped"],
        own_forward_checks=[(p.get("check_mode", ""), p.get("check_prompts", 0)) for p in parts_all],
        batched_speedup=speed, batched_speedup_with_cache=speed_all, ideal_speedup=ideal,
        ideal_speedup_tight=fl["ideal_speedup_tight"],
        speedup_target=target, goal_met=bool(speed >= target),
        max_abs_diff=max(diffs), diff_checked_ablations=len(diffs),
        ablations_per_second=len(abl) / eng_time,
        ablations_per_second_measure_only=len(abl) / parts_med["measure"],
        flops_baseline=fl["baseline"], flops_minimum=fl["minimum"], flops_minimum_tight=fl["minimum_tight"],
        flop_rate_engine_tflops=fl["minimum_tight"] / parts_med["measure"] / 1e12,
        flop_rate_baseline_tflops=fl["baseline"] / base_time / 1e12,
    )
    if analysis_G is not None:
        res["analysis_vs_engine_max_abs_diff"] = float((analysis_G - eng).abs().max())
    if device == "cuda":
        peak, which = gpu_peak_tflops(torch.cuda.get_device_name(0), args.tf32)
        res.update(gpu_peak_tflops=peak, gpu_peak_precision=which,
                   engine_peak_share=res["flop_rate_engine_tflops"] / peak if finite(peak) else float("nan"),
                   baseline_peak_share=res["flop_rate_baseline_tflops"] / peak if finite(peak) else float("nan"))
    res["notes"] = notes
    return res


# =========================================================================== 2. local analysis (subprocess per size)


def _status_kib(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_rss() -> tuple:
    """(resident KiB now, method). Linux: reset the peak (VmHWM) via /proc/self/clear_refs so the peak read
    after the analysis is the analysis's own; elsewhere ru_maxrss (a process-lifetime peak: a lower bound)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        now = _status_kib("VmRSS")
        if now is not None and _status_kib("VmHWM") is not None:
            return now, "VmHWM"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"


def trim_heap() -> None:
    """glibc: return freed heap memory to the OS (malloc_trim), so that a later peak-growth measurement does not
    reuse pages an earlier one left resident; a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_kib(method: str) -> int:
    if method == "VmHWM":
        return _status_kib("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def local_worker(spec: dict) -> dict:
    """Runs in its own process: one analyze_self_repair at one size; time and peak memory growth."""
    quiet()
    torch.set_num_threads(spec["threads"])
    from selfrepair import analyze_self_repair

    device = spec["device"]
    model, info = build_model(spec["model"], device, seed=spec["seed"])
    mc = 0.0 if info["random_weights"] else spec["min_contribution"]
    warm = make_task(model, info, 1, min(32, info["n_ctx"]), seed=spec["seed"] + 1)
    analyze_self_repair(model, warm, k=spec["k"], min_contribution=mc, progress=False)
    task = make_task(model, info, spec["prompts"], spec["seq_len"], seed=spec["seed"])
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    rss0, how = reset_peak_rss()
    t0 = time.perf_counter()
    res = analyze_self_repair(model, task, k=spec["k"], min_contribution=mc, global_effects=False, progress=False)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    rss1 = peak_rss_kib(how)
    out = dict(model=info["spec"], random_weights=info["random_weights"], task=task.name, prompts=len(task),
               seq_len=int(task.tokens.shape[1]), min_contribution=mc, seconds=dt,
               seconds_per_prompt=dt / len(task), rows_selected=len(res.groups),
               rows_total=len(task) * info["n_layers"] * info["n_heads"] * int(task.tokens.shape[1]),
               peak_rss_growth_mib=(rss1 - rss0) / 1024.0, peak_rss_mib=rss1 / 1024.0, peak_rss_method=how)
    if device == "cuda":
        out["peak_cuda_mib"] = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
    return out


def bench_local(args, device: str, jobs: List[tuple]) -> List[dict]:
    rows = []
    for model_spec, prompts, T, mc in jobs:
        spec = dict(model=model_spec, prompts=prompts, seq_len=T, device=device, threads=args.threads,
                    seed=args.seed, k=args.k, min_contribution=mc)
        log(f"[local] {model_spec} {prompts} x {T} tokens (subprocess)")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_local-worker", json.dumps(spec)]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO))
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        if p.returncode != 0 or not line:
            tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
            rows.append(dict(model=model_spec, prompts=prompts, seq_len=T, error=" | ".join(tail)))
            log(f"[local]   failed: {rows[-1]['error']}")
            continue
        r = json.loads(line[-1])
        rows.append(r)
        mem = r.get("peak_cuda_mib", r["peak_rss_growth_mib"])
        log(f"[local]   {r['seconds']:.2f} s, {r['rows_selected']} rows, peak memory +{mem:.0f} MiB")
    return rows


def stream_worker(spec: dict) -> dict:
    """Runs in its own process: at one length, one plain forward + backward of the metric through the bridge
    (``fwd_bwd``) against ``analyze_self_repair`` (min_contribution=0, select="abs"), in the order fwd_bwd,
    analysis, fwd_bwd; time (the analysis against the mean of the two fwd_bwd) and peak memory growth of each."""
    quiet()
    torch.set_num_threads(spec["threads"])
    from selfrepair import analyze_self_repair

    device = spec["device"]
    T = int(spec["seq_len"])
    model, info = build_model("gpt2-small", device, seed=spec["seed"], n_ctx=max(1024, T))
    warm = random_task(model, 1, 32, seed=spec["seed"] + 1)
    analyze_self_repair(model, warm, k=spec["k"], min_contribution=0.0, select="abs", progress=False)
    fwd_bwd(model, warm, nullcontext)
    task = random_task(model, 1, T, seed=spec["seed"])

    npm = int(spec.get("n_permutations", 0))
    # the bridge's forward + backward materialises every layer's scores, pattern and pattern gradient in float32
    need = 3 * int(model.cfg.n_layers) * int(model.cfg.n_heads) * T * T * 4
    avail = (torch.cuda.mem_get_info()[0] if device == "cuda" else _mem_available())
    run_baseline = need < 0.8 * avail

    def measure(fn):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        gc.collect()
        trim_heap()            # freed memory of the previous measurement back to the OS: each peak is its own
        rss0, how = reset_peak_rss()
        t0, c0, o0 = time.perf_counter(), time.process_time(), os.times()
        r = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        wall, cpu, o1 = time.perf_counter() - t0, time.process_time() - c0, os.times()
        mem = ((torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda"
               else (peak_rss_kib(how) - rss0) / 1024.0)
        # CPU: process CPU time (what the work costs, whatever else runs on a shared machine); GPU: wall clock.
        # Its user part is kept too: the kernel part is mostly page faults of freshly allocated tensors
        self_user = o1.user - o0.user
        return (wall if device == "cuda" else cpu), mem, r, wall, self_user

    fb = [measure(lambda: fwd_bwd(model, task, nullcontext))] if run_baseline else []
    measured = measure(lambda: analyze_self_repair(model, task, k=spec["k"], min_contribution=0.0, select="abs",
                                                      progress=False, n_permutations=npm))
    ta, ma, res, wa = measured[:4]
    if run_baseline:
        fb.append(measure(lambda: fwd_bwd(model, task, nullcontext)))
    nan = float("nan")
    t_fb = statistics.mean(x[0] for x in fb) if fb else nan
    w_fb = statistics.mean(x[3] for x in fb) if fb else nan
    u_fb = statistics.mean(x[4] for x in fb) if fb else nan
    ua = measured[4]
    m_fb = max(x[1] for x in fb) if fb else nan
    return dict(model="gpt2-small", n_ctx=int(model.cfg.n_ctx), seq_len=T, prompts=1, analysis_seconds=ta,
                fwd_bwd_seconds=t_fb, analysis_peak_mib=ma, fwd_bwd_peak_mib=m_fb, n_permutations=npm,
                analysis_vs_fwd_bwd_time=ta / t_fb, analysis_vs_fwd_bwd_memory=ma / max(m_fb, 1e-9),
                analysis_vs_fwd_bwd_wall=wa / w_fb, time_measure="wall" if device == "cuda" else "process CPU",
                analysis_user_seconds=ua, fwd_bwd_user_seconds=u_fb, analysis_vs_fwd_bwd_user_time=ua / u_fb,
                rows_selected=len(res.groups), streamed=bool(res.meta.get("streamed_batches", 0)),
                own_forward=bool(res.meta.get("own_forward_batches", 0)),
                baseline=("measured" if run_baseline else
                          f"skipped: the bridge's forward + backward needs about {need / 2**30:.0f} GiB of attention "
                          f"alone, {avail / 2**30:.0f} GiB available"))


def _mem_available() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 when unreadable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def bench_stream(args, device: str) -> List[dict]:
    rows = []
    # the analysis at each length without the permutation test (the engine), then the permutation test's cost
    # at the --permutation-length (default 256 tokens) with the default 200 permutations
    runs = [(T, 0) for T in args.stream_lengths] + ([(args.permutation_length, 200)] if args.permutation_length else [])
    for T, npm in runs:
        spec = dict(seq_len=T, device=device, threads=args.threads, seed=args.seed, k=args.k, n_permutations=npm)
        log(f"[stream] gpt2-small 1 x {T} tokens, n_permutations={npm} (subprocess)")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_stream-worker", json.dumps(spec)]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO))
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        if p.returncode != 0 or not line:
            tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
            rows.append(dict(model="gpt2-small", prompts=1, seq_len=T, error=" | ".join(tail)))
            log(f"[stream]   failed: {rows[-1]['error']}")
            continue
        r = json.loads(line[-1])
        rows.append(r)
        if r.get("baseline", "measured") != "measured":
            log(f"[stream]   baseline {r['baseline']}")
        log(f"[stream]   analysis {r['analysis_seconds']:.1f} s / fwd+bwd {r['fwd_bwd_seconds']:.1f} s = "
            f"{r['analysis_vs_fwd_bwd_time']:.2f}x; memory +{r['analysis_peak_mib']:.0f} / +{r['fwd_bwd_peak_mib']:.0f} MiB"
            f" = {r['analysis_vs_fwd_bwd_memory']:.2f}x")
    return rows


# =========================================================================== 3. GIM cost


def fwd_bwd(model, task, ctx: Callable[[], Any]):
    """One forward + backward: gradient of sum_prompts m at the token embeddings (hook_embed)."""
    device = model_device(model)
    toks = task.tokens.to(device)
    leaf = {}

    def grab(x, hook):
        e = x.detach().requires_grad_(True)
        leaf["e"] = e
        return e

    with torch.enable_grad(), ctx(), model.hooks(fwd_hooks=[("hook_embed", grab)]):
        logits = model(toks)
        m = task.metric_from_full_logits(logits)
        (g,) = torch.autograd.grad(m.sum(), leaf["e"])
    return g


def native_twin(info: dict, device: str, seed: int = 0):
    """A TL-native bridge of the same shape (random weights): where gim-explain's GIM runs."""
    import transformer_lens.model_bridge.sources.native  # noqa: F401  (attaches boot_native)
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(d_model=info["d_model"], n_layers=info["n_layers"], n_heads=info["n_heads"],
                                  d_head=info["d_model"] // info["n_heads"], d_mlp=4 * info["d_model"],
                                  d_vocab=info["d_vocab"], n_ctx=info["n_ctx"], act_fn="gelu",
                                  normalization_type="LN", seed=seed)
    model = TransformerBridge.boot_native(cfg, dtype=torch.float32, device=device)
    return model.eval()


def gim_variants(model, with_theirs: bool, components: bool):
    from selfrepair import gim  # the public context manager

    v = {"plain": nullcontext, "selfrepair.gim": lambda: gim(model)}
    if with_theirs:
        try:
            from gim import GIM
            v["gim-explain GIM"] = lambda: GIM(model)
        except ImportError:
            pass
    if components:
        off = dict(temperature=None, freeze_norm=False, q_scale=None, k_scale=None, v_scale=None, gate_scale=None,
                   up_scale=None)
        v["gim: TSG only"] = lambda: gim(model, **dict(off, temperature=2.0))
        v["gim: norm freeze only"] = lambda: gim(model, **dict(off, freeze_norm=True))
        v["gim: q/k/v scales only"] = lambda: gim(model, **dict(off, q_scale=0.25, k_scale=0.25, v_scale=0.5))
        v["gim: all off (hooks only)"] = lambda: gim(model, **off)
    return v


def time_variants(model, task, variants: dict, rounds: int, device: str, min_sample: float) -> dict:
    """Interleaved rounds (order rotated each round), each variant run ``reps`` times per sample so that a
    sample of the first variant lasts >= ``min_sample`` s. -> {name: median seconds per call, or
    'crashes: ...'}, plus '_ratios': {name: median over rounds of (time / time of the first variant)}."""
    status: Dict[str, Any] = {}
    for name, ctx in variants.items():                   # warm-up, and find which ones run
        try:
            fwd_bwd(model, task, ctx)
            status[name] = []
        except Exception as e:  # noqa: BLE001 -- recorded, not fatal: that is what is being measured
            status[name] = f"crashes: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    names = [n for n, v in status.items() if isinstance(v, list)]
    first = names[0]
    t = []
    with timer(device, t):
        fwd_bwd(model, task, variants[first])
    reps = max(1, math.ceil(min_sample / max(t[0], 1e-6)))
    if t[0] > 2.0:                                      # long calls (GPT-2 small at 512 tokens): fewer rounds
        rounds = min(rounds, 3)
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            samp = []
            with timer(device, samp):
                for _ in range(reps):
                    fwd_bwd(model, task, variants[name])
            status[name].append(samp[0] / reps)
    out = {k: (median(v) if isinstance(v, list) else v) for k, v in status.items()}
    out["_ratios"] = {n: median([a / b for a, b in zip(status[n], status[first])]) for n in names}
    out["_reps"] = reps
    out["_rounds"] = rounds
    return out


def bench_gim(model, info, jobs: List[tuple], args, device: str, label: str, with_theirs: bool = True) -> List[dict]:
    rows = []
    for prompts, T in jobs:
        T = min(T, info["n_ctx"])
        task = make_task(model, info, prompts, T, seed=args.seed)
        log(f"[gim] {label}: {prompts} x {T} tokens")
        t = time_variants(model, task, gim_variants(model, with_theirs, components=False), args.gim_rounds, device,
                          args.min_sample)
        row = dict(model=label, prompts=prompts, seq_len=int(task.tokens.shape[1]), seconds_plain=t["plain"],
                   seconds_gim=t["selfrepair.gim"], gim_overhead=t["_ratios"]["selfrepair.gim"],
                   rounds=t["_rounds"], calls_per_sample=t["_reps"])
        theirs = t.get("gim-explain GIM")
        if theirs is not None:
            row["gim_explain"] = theirs if isinstance(theirs, str) else dict(
                seconds=theirs, overhead=t["_ratios"]["gim-explain GIM"])
        if row["gim_overhead"] > GOAL_GIM or getattr(args, "gim_components", False):
            log(f"[gim]   overhead {row['gim_overhead']:.2f}: timing each component alone")
            comp = time_variants(model, task, gim_variants(model, False, components=True), args.gim_rounds, device,
                                 args.min_sample)
            row["components_overhead"] = {k: v for k, v in comp["_ratios"].items() if k.startswith("gim")}
        rows.append(row)
        ge = row.get("gim_explain")
        log(f"[gim]   overhead {row['gim_overhead']:.3f}"
            + ("" if ge is None else f"; gim-explain: {ge if isinstance(ge, str) else format(ge['overhead'], '.3f')}"))
    return rows


# =========================================================================== driver


def bench_bf16(args, device: str) -> dict:
    """Section 5: the shipped model in bfloat16 against float32 (module docstring)."""
    import selfrepair
    from selfrepair import tasks

    if not default_model_exists():
        return dict(error="the shipped default model is not there")
    key = ["prompt", "layer", "head", "query"]
    m32 = selfrepair.load_model(device=device, dtype=torch.float32)
    m16 = selfrepair.load_model(device=device, dtype=torch.bfloat16)
    task = tasks.load("code-copy", m32, n=args.bf16_prompts, seed=args.seed)
    kw = dict(min_contribution=0.3, progress=False)
    res, secs = {}, {}
    for name, m in (("float32", m32), ("bfloat16", m16)):
        t0 = time.perf_counter()
        res[name] = selfrepair.analyze_self_repair(m, task, **kw).groups.set_index(key)
        secs[name] = time.perf_counter() - t0
    a, b = res["float32"], res["bfloat16"]
    common = a.index.intersection(b.index)
    ej, ej16 = a.loc[common, "effect_joint"], b.loc[common, "effect_joint"]
    return dict(task="code-copy", prompts=len(task), min_contribution=0.3, groups_float32=len(a), groups_bfloat16=len(b),
                groups_common=len(common), overlap=len(common) / max(1, len(a.index.union(b.index))),
                flag_agreement=float((a.loc[common, "self_repair"] == b.loc[common, "self_repair"]).mean()),
                effect_rel_diff=float(((ej16 - ej).abs() / ej.abs()).median()),
                seconds_float32=secs["float32"], seconds_bfloat16=secs["bfloat16"])


def _tables_equal(a: Path, b: Path) -> list:
    """Names of the tables that differ (or exist in one run folder only) between two run folders."""
    import pandas as pd
    from selfrepair.study.rundir import read_table

    names = sorted({p.stem for p in (a / "tables").glob("*.parquet")} | {p.stem for p in (b / "tables").glob("*.parquet")})
    bad = []
    for n in names:
        try:
            pd.testing.assert_frame_equal(read_table(a / "tables", n), read_table(b / "tables", n), check_exact=True)
        except (AssertionError, FileNotFoundError, OSError):
            bad.append(n)
    return bad


def bench_torchrun(a) -> dict:
    """One ``selfrepair analyze`` study as one process and under ``torchrun --nproc-per-node 2`` (gloo)."""
    import tempfile

    if not default_model_exists():
        return {"skipped": "the shipped default model is not there (the study's model)"}
    n, T, bs, an = (4, 31, 1, 4) if a.quick else (64, 61, 8, 16)
    study = ["analyze", "--task", "induction", "--n-prompts", str(n), "--seq-len", str(T), "--batch-size", str(bs),
             "--min-contribution", "0.5", "--threads", "1", "--attribution-n", str(an), "--no-png", "--no-progress"]
    if a.quick:
        study += ["--layers", "0", "3"]
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    out: Dict[str, Any] = dict(world_size=2, backend="gloo", study="selfrepair " + " ".join(study))
    with tempfile.TemporaryDirectory(prefix="selfrepair-torchrun-") as d:
        runs = {"single": [sys.executable, "-m", "selfrepair", *study, "--out", f"{d}/single"],
                "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "selfrepair", *study, "--out", f"{d}/torchrun"]}
        for name, cmd in runs.items():
            log(f"[torchrun] {name}: {' '.join(cmd[1:4])} ...")
            t0 = time.perf_counter()
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=d, timeout=3600)
            out[f"seconds_{name}"] = time.perf_counter() - t0
            if p.returncode != 0:
                out["error"] = f"{name} failed (exit {p.returncode}): {p.stderr.strip().splitlines()[-1:]}"
                out["identical"] = False
                return out
        for name in runs:  # wall seconds per stage (the torchrun run's: rank 0's, which also merges)
            out[f"stages_{name}"] = json.loads((Path(d) / name / "summary.json").read_text()).get("timings_s", {})
        out["load_average_1m"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        diff = _tables_equal(Path(d) / "single", Path(d) / "torchrun")
        out["tables"] = sorted(p.stem for p in (Path(d) / "single" / "tables").glob("*.parquet"))
        out["tables_differing"] = diff
        out["identical"] = not diff
        out["speedup"] = out["seconds_single"] / out["seconds_torchrun"]
    return out


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON line last")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default=None,
                    help="default (shipped model; the CPU default), default-random, gpt2-small (the CUDA default), "
                         "or a checkpoint directory / llama2.c .bin for selfrepair.load_model")
    ap.add_argument("--quick", action="store_true", help="tiny setting for the smoke test (well under a minute)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=2)
    g = ap.add_argument_group("global ablations")
    g.add_argument("--prompts", type=int, default=None, help="prompts of the global workload")
    g.add_argument("--seq-len", type=int, default=None, help="tokens per prompt (default 256)")
    g.add_argument("--n-random", type=int, default=None, help="ablations of the random-weights workload (1000)")
    g.add_argument("--min-contribution", type=float, default=1.0, help="selection threshold (trained models)")
    g.add_argument("--target-groups", type=int, default=None, help="lower min_contribution until this many groups")
    g.add_argument("--max-groups", type=int, default=2000, help="sample at most this many groups")
    g.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (3)")
    g.add_argument("--baseline-sample", type=int, default=None, help="baseline ablations timed per round")
    g.add_argument("--tf32", action="store_true", help="CUDA: allow TF32 matmuls (peak share vs the TF32 peak)")
    s = ap.add_argument_group("sections and sizes")
    s.add_argument("--skip", default="", help="comma list of sections to skip: global, local, gim, bf16, torchrun, stream")
    s.add_argument("--bf16-prompts", type=int, default=None, help="code-copy prompts of the bf16 section (32)")
    s.add_argument("--local-lengths", default=None, help="main model lengths for the local analysis (128,256)")
    s.add_argument("--local-prompts", type=int, default=None)
    s.add_argument("--gpt2-lengths", default=None,
                   help="GPT-2-small local-analysis lengths (128,256,512,1024); empty to skip")
    s.add_argument("--gpt2-prompts", type=int, default=2)
    s.add_argument("--gim-lengths", default=None, help="main model GIM lengths (64,128,256)")
    s.add_argument("--gim-prompts", type=int, default=None)
    s.add_argument("--gim-gpt2-lengths", default=None, help="GPT-2-small GIM lengths (128,512); empty to skip")
    s.add_argument("--gim-rounds", type=int, default=None)
    s.add_argument("--min-sample", type=float, default=None,
                   help="GIM: repeat calls so that one timing sample lasts at least this many seconds (0.5)")
    s.add_argument("--gim-components", action="store_true",
                   help="GIM: time each component alone at every length (by default only where the overhead > 1.2)")
    s.add_argument("--permutation-length", type=int, default=256,
                   help="tokens of the extra stream run with the default 200 permutations (0: none)")
    s.add_argument("--stream-lengths", default=None,
                   help="GPT-2-small lengths of the analysis-vs-forward+backward section (1024,2048,4096)")
    ap.add_argument("--_local-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_stream-worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    cuda = a.device == "cuda"
    q = a.quick
    dflt = dict(
        model="default-random" if q else ("gpt2-small" if cuda else "default"),
        prompts=4 if q else (8 if cuda else 16), seq_len=64 if q else 256, n_random=100 if q else 1000,
        target_groups=10 if q else 100, rounds=2 if q else 3, baseline_sample=10 if q else (50 if cuda else 40),
        local_lengths="64" if q else "128,256", local_prompts=2 if q else (16 if cuda else 8),
        gpt2_lengths="" if q else "128,256,512,1024", gim_lengths="32,64" if q else "64,128,256",
        gim_prompts=2 if q else 8, gim_gpt2_lengths="" if q else "128,512", gim_rounds=3 if q else 5,
        min_sample=0.05 if q else 0.5, bf16_prompts=8 if q else 32, stream_lengths="" if q else "1024,2048,4096",
    )
    for key, v in dflt.items():
        if getattr(a, key) is None:
            setattr(a, key, v)
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    a.local_lengths, a.gpt2_lengths = ints(a.local_lengths), ints(a.gpt2_lengths)
    a.gim_lengths, a.gim_gpt2_lengths = ints(a.gim_lengths), ints(a.gim_gpt2_lengths)
    a.stream_lengths = ints(a.stream_lengths)
    a.skip = {x.strip() for x in a.skip.split(",") if x.strip()}
    bad = a.skip - {"global", "local", "gim", "bf16", "torchrun", "stream"}
    if bad:
        ap.error(f"--skip: unknown sections {sorted(bad)}; valid: global, local, gim, bf16, torchrun, stream")
    if a.threads < 1:
        ap.error("--threads must be >= 1")
    return a


def fmt(x, spec=".2f"):
    return format(x, spec) if finite(x) else str(x)


def report(out: dict) -> str:
    """Human-readable tables (ratios first)."""
    L = []
    m = out["machine"]
    dev = m.get("gpu") or f"{m['cores']} CPU cores ({m['cpu_model']}), {m['torch_threads']} torch thread(s)"
    L.append(f"machine: {dev}; torch {m['torch']}; load average {m.get('load_average_1m', '?')}")
    g = out.get("global")
    if g:
        L.append("")
        L.append(f"## Global ablations ({out['model']['spec']}, {g['task']}, {g['prompts']} prompts x {g['seq_len']} "
                 f"tokens): {g['workload']}")
        L.append("| quantity | value |")
        L.append("|---|---|")
        L.append(f"| batched_speedup (baseline / engine; engine = z edits + prepare_clean + measure_z_edits) | "
                 f"{fmt(g['batched_speedup'], '.1f')}x |")
        L.append(f"| ... engine also running its own scores/values cache (cached_run, forward only) | "
                 f"{fmt(g['batched_speedup_with_cache'], '.1f')}x |")
        L.append(f"| ideal_speedup (FLOPs baseline / minimum) | {fmt(g['ideal_speedup'], '.1f')}x |")
        L.append(f"| goal min(20, 0.8 ideal) | {fmt(g['speedup_target'], '.1f')}x: {'met' if g['goal_met'] else 'NOT met'} |")
        if g.get("own_forward_checks") and g.get("engine_path") == "fast":
            L.append("| own-forward check (prepare_clean vs the bridge's logits at the metric positions) | full on every "
                     "prompt once per model and settings (cached), then a seeded spot check of 1/16 of the prompts "
                     "per call; per round: " + ", ".join(f"{m} ({n} of {g['prompts']})" for m, n in g["own_forward_checks"])
                     + " |")
        L.append(f"| max_abs_diff engine vs baseline ({g['diff_checked_ablations']} ablations) | {g['max_abs_diff']:.2e} |")
        if "analysis_vs_engine_max_abs_diff" in g:
            L.append(f"| analyze_self_repair global effects vs engine (all) | {g['analysis_vs_engine_max_abs_diff']:.2e} |")
        p = g["engine_parts_seconds"]
        tot = sum(p.values())
        L.append("| engine time split: cache / deltas / prepare_clean / measure | "
                 + " / ".join(f"{100 * p[k] / tot:.0f}%" for k in ("cache", "deltas", "prepare_clean", "measure")) + " |")
        L.append(f"| engine throughput | {g['ablations_per_second']:.0f} ablations/s "
                 f"({g['ablations_per_second_measure_only']:.0f}/s measure only) |")
        if "engine_peak_share" in g:
            L.append(f"| engine FLOP rate (minimal work / measure time) | {g['flop_rate_engine_tflops']:.2f} TFLOP/s = "
                     f"{100 * g['engine_peak_share']:.1f}% of {g['gpu_peak_tflops']} ({g['gpu_peak_precision']}) |")
            L.append(f"| baseline FLOP rate | {g['flop_rate_baseline_tflops']:.2f} TFLOP/s = "
                     f"{100 * g['baseline_peak_share']:.1f}% of peak |")
        for n in g.get("notes", []):
            L.append(f"note: {n}")
    if out.get("local"):
        L.append("")
        L.append("## Local analysis (analyze_self_repair, global_effects=False, all heads and query rows)")
        L.append("| model | prompts x tokens | seconds / prompt | time vs first size | rows analysed | peak memory growth (MiB) |")
        L.append("|---|---|---|---|---|---|")
        first: Dict[str, float] = {}
        for r in out["local"]:
            if "error" in r:
                L.append(f"| {r['model']} | {r['prompts']} x {r['seq_len']} | failed: {r['error']} | | | |")
                continue
            f0 = first.setdefault(r["model"], r["seconds_per_prompt"])
            mem = r.get("peak_cuda_mib", r["peak_rss_growth_mib"])
            L.append(f"| {r['model']} | {r['prompts']} x {r['seq_len']} | {r['seconds_per_prompt']:.2f} | "
                     f"{r['seconds_per_prompt'] / f0:.1f}x | {r['rows_selected']} / {r['rows_total']} | {mem:.0f} |")
    t = out.get("torchrun")
    if t:
        L.append("")
        L.append("## torchrun: one study, 1 process vs 2 processes (gloo, one thread each)")
        if "skipped" in t:
            L.append(f"skipped: {t['skipped']}")
        else:
            L.append(f"study: {t['study']}")
            L.append("| quantity | value |")
            L.append("|---|---|")
            L.append(f"| one process (wall, whole command) | {t['seconds_single']:.1f} s |")
            if "seconds_torchrun" in t:
                L.append(f"| torchrun --nproc-per-node 2 (wall, whole command) | {t['seconds_torchrun']:.1f} s |")
            if "speedup" in t:
                L.append(f"| torchrun_speedup | {t['speedup']:.2f}x (load average {t.get('load_average_1m')}) |")
            a1, a2 = t.get("stages_single", {}), t.get("stages_torchrun", {})
            for st in ("load model", "self-repair analysis + estimates", "head attributions",
                       "token attributions + faithfulness", "total"):
                if st in a1 or st in a2:
                    L.append(f"| stage {st}: 1 process / rank 0 of 2 | {a1.get(st, '-')} s / {a2.get(st, '-')} s |")
            L.append(f"| torchrun_identical (every table exactly) | {t['identical']} |")
            if t.get("error"):
                L.append(f"error: {t['error']}")
    if out.get("stream"):
        L.append("")
        L.append("## Analysis vs one forward + backward (gpt2-small shape, random weights, 1 prompt, "
                 "min_contribution=0, select=abs)")
        L.append("| tokens | n_permutations | forward | analysis s | fwd+bwd s | analysis_vs_fwd_bwd_time | (wall) | "
                 "(user) | analysis MiB | fwd+bwd MiB | analysis_vs_fwd_bwd_memory | rows |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in out["stream"]:
            if "error" in r:
                L.append(f"| {r['seq_len']} | | | failed: {r['error']} | | | | | | | | |")
                continue
            L.append(f"| {r['seq_len']} | {r.get('n_permutations', 0)} | {'own' if r.get('own_forward') else 'bridge'} | "
                     f"{r['analysis_seconds']:.1f} | {r['fwd_bwd_seconds']:.1f} | "
                     f"{r['analysis_vs_fwd_bwd_time']:.2f}x | {r['analysis_vs_fwd_bwd_wall']:.2f}x | "
                     f"{r.get('analysis_vs_fwd_bwd_user_time', float('nan')):.2f}x | "
                     f"+{r['analysis_peak_mib']:.0f} | +{r['fwd_bwd_peak_mib']:.0f} | "
                     f"{r['analysis_vs_fwd_bwd_memory']:.2f}x | {r['rows_selected']} |")
        L.append("(time: process CPU seconds on the CPU, robust to other jobs on a shared machine; wall-clock ratio "
                 "and the ratio of user CPU time alone beside it (the kernel part is mostly page faults of fresh "
                 "allocations: the bridge's attention tensors); memory: peak resident growth, or CUDA peak allocation)")
        for r in out["stream"]:
            if r.get("baseline", "measured") != "measured" and "error" not in r:
                L.append(f"{r['seq_len']} tokens: baseline {r['baseline']}")
    if out.get("gim"):
        L.append("")
        L.append("## GIM cost (one forward + backward to the token embeddings; time / plain autograd)")
        L.append("| model | prompts x tokens | selfrepair.gim | gim-explain GIM |")
        L.append("|---|---|---|---|")
        for r in out["gim"]:
            ge = r.get("gim_explain")
            ge = "n/a" if ge is None else (ge.replace("_patch_softmax_backward_T_only.<locals>.", "")
                                           if isinstance(ge, str) else f"{ge['overhead']:.2f}x")
            L.append(f"| {r['model']} | {r['prompts']} x {r['seq_len']} | {r['gim_overhead']:.2f}x | {ge} |")
            if "components_overhead" in r:
                L.append("|  components alone | | " + ", ".join(
                    f"{k[5:]}: {fmt(v) if not isinstance(v, str) else v}" for k, v in r["components_overhead"].items())
                         + " | |")
    b = out.get("bf16")
    if b and "error" not in b:
        L.append("")
        L.append(f"## bfloat16 vs float32 (shipped model, {b['task']}, {b['prompts']} prompts, min_contribution "
                 f"{b['min_contribution']})")
        L.append("| quantity | value |")
        L.append("|---|---|")
        L.append(f"| groups float32 / bfloat16 / common | {b['groups_float32']} / {b['groups_bfloat16']} / {b['groups_common']} |")
        L.append(f"| bf16_group_overlap | {b['overlap']:.3f} |")
        L.append(f"| bf16_flag_agreement | {b['flag_agreement']:.3f} |")
        L.append(f"| bf16_effect_rel_diff (median, joint effect) | {b['effect_rel_diff']:.4f} |")
        L.append(f"| seconds float32 / bfloat16 | {b['seconds_float32']:.1f} / {b['seconds_bfloat16']:.1f} |")
    L.append("")
    L.append("goals: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in out["goals"].items()))
    for n in out.get("notes", []):
        L.append(f"note: {n}")
    return "\n".join(L)


def main(argv=None) -> int:
    a = parse(argv)
    if a._local_worker:
        print(json.dumps(local_worker(json.loads(a._local_worker))))
        return 0
    if a._stream_worker:
        print(json.dumps(stream_worker(json.loads(a._stream_worker))))
        return 0
    if a.device == "cuda" and not torch.cuda.is_available():
        print(f"error: --device cuda, but CUDA is not available here (torch {torch.__version__}, "
              f"built with CUDA {torch.version.cuda}); run without --device for the CPU benchmark.", file=sys.stderr)
        return 2
    quiet()
    torch.set_num_threads(a.threads)
    if a.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(a.tf32)
        torch.backends.cudnn.allow_tf32 = bool(a.tf32)
    t_start = time.perf_counter()
    out: Dict[str, Any] = dict(machine=machine_info(a.device), notes=[])
    out["settings"] = {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(a).items()
                       if not k.startswith("_")}
    if a.device == "cuda":
        out["machine"]["precision"] = "float32" + (" (TF32 matmuls)" if a.tf32 else " (TF32 off)")
    log(f"[setup] model {a.model} on {a.device}")
    model, info = build_model(a.model, a.device, seed=a.seed)
    out["model"] = info
    out["notes"] += info["notes"]

    if "global" not in a.skip:
        out["global"] = bench_global(model, info, a, a.device)
    if "gim" not in a.skip:
        rows = bench_gim(model, info, [(a.gim_prompts, T) for T in a.gim_lengths], a, a.device, info["spec"])
        twin_lengths = [T for T in a.gim_lengths if T >= 64][-2:] or a.gim_lengths[-1:]
        if info["architecture"] != "NativeModel" and twin_lengths:
            twin = native_twin(info, a.device, seed=a.seed)
            twin_info = dict(info, spec=f"native bridge, {info['spec']} shape", random_weights=True)
            rows += bench_gim(twin, twin_info, [(a.gim_prompts, T) for T in twin_lengths], a, a.device,
                              twin_info["spec"])
            del twin
        if a.gim_gpt2_lengths:
            g2, g2info = (model, info) if info["spec"] == "gpt2-small" else build_model("gpt2-small", a.device, a.seed)
            rows += bench_gim(g2, g2info, [(1, T) for T in a.gim_gpt2_lengths], a, a.device, "gpt2-small")
            del g2
        out["gim"] = rows
    if "local" not in a.skip:
        # trained model: the min_contribution the global workload settled on; random weights: 0 (in the worker)
        mc = out.get("global", {}).get("min_contribution", a.min_contribution)
        jobs = [] if info["spec"] == "gpt2-small" else \
            [(info["spec"], a.local_prompts, T, mc) for T in a.local_lengths if T <= info["n_ctx"]]
        jobs += [("gpt2-small", a.gpt2_prompts, T, 0.0) for T in a.gpt2_lengths]
        out["local"] = bench_local(a, a.device, jobs)
    if "bf16" not in a.skip:
        out["bf16"] = bench_bf16(a, a.device)
    if "torchrun" not in a.skip:
        if a.device == "cpu":
            out["torchrun"] = bench_torchrun(a)
        else:
            out["notes"].append("torchrun section: CPU only here (NCCL runs take --device cuda in the study command)")

    if "stream" not in a.skip and a.stream_lengths:
        out["stream"] = bench_stream(a, a.device)
        for r in out["stream"]:
            if "error" not in r and not r.get("n_permutations"):
                out[f"analysis_vs_fwd_bwd_time_{r['seq_len']}"] = r["analysis_vs_fwd_bwd_time"]
                out[f"analysis_vs_fwd_bwd_memory_{r['seq_len']}"] = r["analysis_vs_fwd_bwd_memory"]
            elif "error" not in r:
                out[f"permutation_test_analysis_vs_fwd_bwd_time_{r['seq_len']}"] = r["analysis_vs_fwd_bwd_time"]

    # headline fields
    g = out.get("global", {})
    # headline: the HF-wrapped models the issue names (main model, GPT-2 small); the native twin apart
    gims = [r["gim_overhead"] for r in out.get("gim", []) if not r["model"].startswith("native")]
    native = [r["gim_overhead"] for r in out.get("gim", []) if r["model"].startswith("native")]
    out["gim_overhead_native"] = max(native) if native else float("nan")
    out.update(batched_speedup=g.get("batched_speedup", float("nan")), ideal_speedup=g.get("ideal_speedup", float("nan")),
               max_abs_diff=g.get("max_abs_diff", float("nan")),
               gim_overhead=max(gims) if gims else float("nan"))
    t = out.get("torchrun") or {}
    if "identical" in t:
        out.update(torchrun_identical=bool(t["identical"]), torchrun_speedup=t.get("speedup", float("nan")))
    goals = {}
    if "identical" in t:
        goals["torchrun_identical"] = bool(t["identical"])
    if g:
        goals["batched_speedup >= min(20, 0.8 * ideal_speedup)"] = bool(g["goal_met"])
        goals["max_abs_diff <= 1e-4"] = bool(g["max_abs_diff"] <= GOAL_DIFF)
    if gims:
        goals["gim_overhead <= 1.2 at every length"] = bool(out["gim_overhead"] <= GOAL_GIM)
    b = out.get("bf16", {})
    out.update(bf16_flag_agreement=b.get("flag_agreement", float("nan")),
               bf16_group_overlap=b.get("overlap", float("nan")),
               bf16_effect_rel_diff=b.get("effect_rel_diff", float("nan")))
    if b and "error" not in b:
        goals["bf16_group_overlap >= 0.95"] = bool(b["overlap"] >= GOAL_BF16["overlap"])
        goals["bf16_flag_agreement >= 0.95"] = bool(b["flag_agreement"] >= GOAL_BF16["flag"])
        goals["bf16_effect_rel_diff <= 0.02"] = bool(b["effect_rel_diff"] <= GOAL_BF16["rel"])
    for r in out.get("stream", []):
        T = r["seq_len"]
        if r.get("n_permutations"):
            continue
        if T in (1024, 2048):
            ok = "error" not in r
            goals[f"analysis_vs_fwd_bwd_time <= 1.5 at {T}"] = ok and r["analysis_vs_fwd_bwd_time"] <= 1.5
            goals[f"analysis_vs_fwd_bwd_memory <= 1.25 at {T}"] = ok and r["analysis_vs_fwd_bwd_memory"] <= 1.25
        elif T == 4096:
            goals["analysis completes at 4096"] = "error" not in r
    out["goals"] = goals
    out["goal_met"] = bool(goals) and all(goals.values())
    out["seconds_total"] = time.perf_counter() - t_start
    print(report(out))
    print(f"\ntotal {out['seconds_total']:.0f} s")
    if a.json:
        print(json.dumps(out, default=lambda o: str(o), allow_nan=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
