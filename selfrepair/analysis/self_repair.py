"""Softmax-redistribution self-repair: individual versus joint ablations of attention keys.

docs/quantities.md, sections "Local effects", "Individual versus joint", "Global effects"
and "Gradient estimates". For a head (l, h), a query i and the k keys S of largest
contribution ``w_j = p_j c_j`` (``c_j = g . v_j``, ``g = dm/dz_i``):

- local effect of a changed pattern row: ``E(p') = sum_j (p_j - p'_j) c_j``
  (positive = the ablation lowers the metric); individual ``E_n = E({j_n})``,
  joint ``E_S``, interaction ``r = (E_S - sum_n E_n) / E_S`` (NaN when
  ``|E_S| < max(min_effect, 0.01 sum_S |w_j|)``), ``self_repair = r > threshold``;
- score ablation (``score_ablation=``) ``"mean"`` (``a'_j`` = the mean unmasked score of the original
  row) or ``"knockout"`` (``a'_j = -inf``); value ablation ``"zero"``/``"mean"``;
- exact Shapley values within S from the ``2^k`` local subset effects;
- gradient estimates (plain and TSG, temperature T) of the joint score ablation;
- global effects (``global_effects=True``): the same ablations in real forward
  passes (``selfrepair.engine``, ``measure_z_edits``), ``m(clean) - m(ablated)``.

Local effects are computed in closed form from ONE cached forward and backward
pass per batch (``selfrepair.engine.cached_run``): no forward pass per ablation or subset.
All rows of a batch are processed at once, subsets as bitmasks, in float64
(the cached activations are float32 by default, ``dtype=`` for float64).

Columns of ``SelfRepairResult.groups`` (one row per analysed (prompt, layer, head, query); tuples are
per key of S, largest contribution first):

- ``prompt`` (index in the task), ``layer``, ``head``, ``query`` (position i);
- ``keys`` S (ties to the lower position), ``contributions`` ``w_j``, ``p`` ``p_j``, ``scores`` ``a_j``
  (``log p_j`` on backends whose score site is the pattern: shifted by a row constant), ``mass``
  ``sum_S p_j``, ``n_keys`` unmasked keys of the row, ``head_contribution`` ``g . z_i = sum_j w_j``,
  ``metric`` ``m(clean)`` of the prompt;
- ``effects`` ``E_n``, ``effect_sum``, ``effect_joint`` ``E_S``, ``interaction`` r, ``interaction_sym``,
  ``self_repair`` (r > threshold; False where r is NaN), ``shapley`` (sums to ``E_S``);
- ``value_similarity`` (mean pairwise cosine of the keys' value vectors), ``value_effects``,
  ``value_effect_joint``, ``value_interaction`` (0 up to rounding: value ablations do not renormalise);
- ``grad_estimate``, ``tsg_estimate`` (joint score ablation; NaN under knockout) and the per-key terms
  ``grad_estimates``, ``tsg_estimates`` (the estimates are linear, so they sum to the joint one);
- with ``global_effects=True``: ``global_effects`` ``G_n``, ``global_effect_joint`` ``G_S``,
  ``global_effect_sum``, ``global_interaction`` (same NaN floor as r, with the same ``w``),
  ``downstream_gap = (G_S - sum G_n) - (E_S - sum E_n)``, ``global_noise`` (the measured noise delta of
  one engine forward for the row's prompt; the global ratio is also NaN when ``|G_S| < 20 k delta``).
- what r is made of and group sizes (docs/quantities.md): ``mass_interaction``, ``excess_interaction``,
  ``concealment`` (per key), ``concealment_share``, ``permutation_p``, ``c_ratio``, ``value_similarity_out``,
  ``n_contributing``, ``n_clusters``.

Decisions where the definitions (docs/quantities.md) are silent (documented, tested):
- queries analysed: every real position ``i <= `` the prompt's metric position
  (later positions cannot influence ``m``; their ``g`` is exactly 0);
- ``exclude_bos=True`` drops key 0 from selection, from the score mean and from
  the value mean (``value_ablation="mean"``); key 0 stays in the row otherwise
  (it keeps its score and is renormalised like any other key, and it counts
  towards the "more than k unmasked keys" knockout condition);
- ``interaction_sym`` is reported for every row (NaN only when its denominator
  is 0); summary medians use rows with a defined ``interaction`` only;
- the summary's and sweep's intervals treat the rows of one prompt as one cluster (Wilson on n / design
  effect, ``stats.proportion_intervals``); ``cluster="group"`` makes every row its own cluster;
- the permutation test draws from one generator per row (``permutation_seed``), so it does not depend on
  the batching.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import time
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import pandas as pd
import torch

from tqdm.auto import tqdm

from .._deprecation import renamed_keyword
from .._devices import model_dtype
from .._typing import Tensor
from ..engine.cache import FORWARDS, StreamedRun, StreamMismatch, cached_run, can_stream, check_backend, streamed_run
from ..engine.edits import ZEdits, measure_z_edits, prepare_clean
from ..models.probe import resolve_backend
from ..tasks import Task, bos_id, validate_task
from .checkpoint import BatchCheckpoint
from .decomposition import (KeyChanges, c_ratio, concealment, mass_interaction, n_clusters_from_pairs, n_contributing,
                            output_basis, permutation_p, similar_pairs, value_similarity_out)
from .identity import model_hash, task_hash, versions
from .results import BASE_COLUMNS, BOOL_COLUMNS, INT_COLUMNS, TUPLE_COLUMNS, SelfRepairResult, empty_groups
from .rows import (ABLATIONS, MAX_K, SELECT_MODES, VALUE_ABLATIONS, check_mode, check_temperature, interaction_ratio,
                   row_effects, select_keys)

__all__ = ["analyze_self_repair", "permutation_seed", "head_output_weights"]


# =========================================================================== closed-form row arithmetic


# =========================================================================== result object


# =========================================================================== the analysis


def _auto_batch_size(task: Task, n_layers: int, n_heads: int, d_head: int, itemsize: int) -> int:
    n = int(task.lengths.max())
    per_prompt = itemsize * n_layers * (n_heads * n * n + 3 * n * n_heads * d_head) + itemsize * 6 * n_heads * n * n
    return int(max(1, min(len(task), 64, (2 ** 28) // max(per_prompt, 1))))


def _validate(model, task, backend, *, k, min_contribution, select, threshold, min_effect, score_ablation,
              value_ablation, layers, heads, temperature, batch_size, dtype, k_max, n_permutations, seed,
              cluster_similarity, alpha):
    validate_task(task, model)    # a Task that fits the model: ids in the vocabulary, prompts within the context
    if k != "auto" and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 2 <= int(k) <= MAX_K):
        raise ValueError(f"k must be an integer from 2 to {MAX_K} (keys per group) or 'auto' (all contributing "
                         f"keys, at most k_max); got {k!r}.")
    if isinstance(k_max, bool) or not isinstance(k_max, (int, np.integer)) or not 2 <= int(k_max) <= MAX_K:
        raise ValueError(f"k_max must be an integer from 2 to {MAX_K} (the largest group k='auto' analyses; exact "
                         f"Shapley values need 2^k subsets); got {k_max!r}.")
    if isinstance(n_permutations, bool) or not isinstance(n_permutations, (int, np.integer)) or n_permutations < 0:
        raise ValueError(f"n_permutations must be an integer >= 0 (permutations of the contributions per group, "
                         f"e.g. 200; 0 skips the permutation test); got {n_permutations!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0 (it seeds the permutation test); got {seed!r}.")
    if (isinstance(cluster_similarity, bool) or not isinstance(cluster_similarity, (int, float, np.floating, np.integer))
            or not -1.0 <= float(cluster_similarity) <= 1.0):
        raise ValueError(f"cluster_similarity is a cosine and must lie in [-1, 1] (e.g. 0.8); got {cluster_similarity!r}.")
    if (isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer))
            or not 0.0 < float(alpha) < 1.0):
        raise ValueError(f"alpha must lie strictly between 0 and 1 (the false-discovery rate of the permutation "
                         f"test, e.g. 0.05); got {alpha!r}.")
    for nm, v in (("threshold", threshold), ("min_effect", min_effect)):
        if not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{nm} must be a finite number >= 0; got {v!r}.")
    if not isinstance(min_contribution, (int, float, np.floating, np.integer)) or not math.isfinite(min_contribution):
        raise ValueError(f"min_contribution must be a finite number (metric units); got {min_contribution!r}.")
    check_temperature(temperature)
    check_mode("select mode", select, SELECT_MODES)
    check_mode("score_ablation", score_ablation, ABLATIONS)
    check_mode("value_ablation", value_ablation, VALUE_ABLATIONS)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None (automatic); got {batch_size!r}.")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64 (analysis precision); got {dtype}.")
    check_backend(backend)
    L, H = backend.n_layers, backend.n_heads

    def norm_list(x, n, what):
        if x is None:
            return list(range(n))
        xs = [x] if isinstance(x, (int, np.integer)) else list(x)
        if not xs:
            raise ValueError(f"{what}s is empty; give at least one {what} or None for all.")
        for v in xs:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) < n:
                raise ValueError(f"{what} {v!r} out of range: the model has {n} {what}s per "
                                 f"{'model' if what == 'layer' else 'layer'} (0..{n - 1}).")
        return sorted({int(v) for v in xs})

    layers = norm_list(layers, L, "layer")
    heads = norm_list(heads, H, "head")
    return layers, heads


def analyze_self_repair(
    model,
    task: Task,
    *,
    k: Union[int, str] = 2,
    min_contribution: float = 1.0,
    select: str = "positive",
    exclude_bos: Optional[bool] = False,
    threshold: float = 0.1,
    min_effect: float = 1e-4,
    score_ablation: str = "mean",
    value_ablation: str = "zero",
    global_effects: bool = False,
    layers: Optional[Iterable[int]] = None,
    heads: Optional[Iterable[int]] = None,
    temperature: float = 2.0,
    batch_size: Optional[int] = None,
    checkpoint_dir: Optional[Union[str, os.PathLike]] = None,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    shard: Optional[tuple] = None,
    k_max: int = 8,
    n_permutations: int = 200,
    seed: int = 0,
    cluster_similarity: float = 0.8,
    alpha: float = 0.05,
    forward: str = "auto",
    **deprecated,
) -> SelfRepairResult:
    """Individual versus joint ablations of the k keys of largest contribution, for every row
    ``(prompt, layer, head, query)`` with at least k keys above ``min_contribution`` (docs/quantities.md, "Individual versus joint").

    Local effects in closed form from one cached forward + backward per batch of
    ``batch_size`` prompts; global effects (``global_effects=True``) from batched real
    forward passes. ``checkpoint_dir``: each batch's rows are written there atomically and
    a re-run with the same settings, model and task resumes. ``dtype``: precision of the
    cached activations (float32, or float64 for exactness checks); row arithmetic is float64.
    ``score_ablation``: ``"mean"`` or ``"knockout"`` (the old keyword ``ablation=`` still works one release, with
    a DeprecationWarning; ``settings["score_ablation"]``); ``value_ablation``: ``"zero"`` or ``"mean"``.
    ``exclude_bos``: True / False, or None to detect it (True when every prompt starts with the model's
    BOS token), as in ``faithfulness``. ``batch_size``: prompts per batch. ``progress``: a progress bar.
    ``shard=(rank, world_size)``: only the batches ``i`` with ``i % world_size == rank`` (the batches of the
    whole task, so each row is computed exactly as in one process; prompt indices stay those of ``task``);
    the shards' groups concatenated and sorted are the whole result (``selfrepair.study.distributed``).
    ``k="auto"``: each row's group is all its contributing keys (largest w first, at most ``k_max``; rows
    with fewer than 2 are skipped), so groups of different sizes share the table (docs/quantities.md,
    "Group sizes"). ``n_permutations`` and ``seed``: the permutation test of each group (``permutation_p``; 0 skips
    it, leaving ``permutation_p`` NaN: it costs ``n_permutations x (query + 1)`` draws and a sort per row, the
    largest part of the analysis on long prompts with many rows;
    each row draws from its own generator, ``permutation_seed(seed, prompt, layer, head, query)``, so the
    result does not depend on ``batch_size`` or on the other rows). ``cluster_similarity``: the cosine that joins two keys in
    ``n_clusters``. ``alpha``: the false-discovery rate of the permutation test's Benjamini-Hochberg
    correction in ``summary()`` / ``sweep()`` (docs/quantities.md, "What r is made of", "Intervals").
    ``forward``: where q, k, v and ``dm/dz`` come from on models that stream (``engine.streamed_run``): ``"bridge"``
    (the model's own forward and backward), ``"own"`` (our forward with a fused attention kernel: no attention
    pattern is materialised, so long contexts fit) or ``"auto"`` (own where the bridge would hold at least
    ``engine.cache.OWN_FORWARD_MIN_BYTES`` of attention per batch); both are checked on every batch and agree to the
    model dtype's rounding; ``meta["own_forward_batches"]`` counts the batches of the own forward.
    Columns of ``result.groups``: see the module docstring of ``selfrepair.analysis.self_repair``.
    """

    score_ablation = renamed_keyword(deprecated, "ablation", "score_ablation", score_ablation, "analyze_self_repair",
                                     default="mean", stacklevel=3)
    validate_task(task, model)    # before any work: a prompt beyond the model's context is refused here
    backend = resolve_backend(model)
    layers, heads = _validate(model, task, backend, k=k, min_contribution=min_contribution, select=select,
                              threshold=threshold, min_effect=min_effect, score_ablation=score_ablation,
                              value_ablation=value_ablation, layers=layers, heads=heads, temperature=temperature,
                              batch_size=batch_size, dtype=dtype, k_max=k_max, n_permutations=n_permutations,
                              seed=seed, cluster_similarity=cluster_similarity, alpha=alpha)
    if forward not in FORWARDS:
        raise ValueError(f"unknown forward {forward!r}; valid: {', '.join(FORWARDS)}.")
    k = "auto" if k == "auto" else int(k)
    if exclude_bos is None:
        exclude_bos = bool((task.tokens[:, 0] == bos_id(model)).all())
    itemsize = torch.empty((), dtype=dtype).element_size()
    bs = int(batch_size) if batch_size else _auto_batch_size(task, len(layers), backend.n_heads, backend.d_head,
                                                             itemsize)
    settings = dict(k=k, min_contribution=float(min_contribution), select=select, exclude_bos=bool(exclude_bos),
                    threshold=float(threshold), min_effect=float(min_effect), score_ablation=score_ablation,
                    value_ablation=value_ablation, global_effects=bool(global_effects), layers=layers, heads=heads,
                    temperature=float(temperature), batch_size=bs, dtype=str(dtype).replace("torch.", ""),
                    k_max=int(k_max), n_permutations=int(n_permutations), seed=int(seed),
                    cluster_similarity=float(cluster_similarity), alpha=float(alpha))
    mhash, thash = model_hash(model), task_hash(task)
    cfg = getattr(model, "cfg", None)
    meta = dict(
        model_name=str(getattr(cfg, "model_name", type(model).__name__)), model_architecture=backend.architecture,
        backend=backend.kind, score_site=backend.score_site, model_hash=mhash,
        model_dtype=str(model_dtype(model)).replace("torch.", ""),
        n_layers=backend.n_layers, n_heads=backend.n_heads, n_kv_heads=backend.n_kv_heads, d_head=backend.d_head,
        task_name=str(task.name), task_size=len(task), task_seq_len=int(task.tokens.shape[1]), task_hash=thash,
        metric=task.metric if isinstance(task.metric, str) else getattr(task.metric, "__qualname__", "callable"),
        versions=versions(), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    ck = BatchCheckpoint(Path(checkpoint_dir), settings, mhash, thash) if checkpoint_dir is not None else None

    starts = list(range(0, len(task), bs))
    if shard is not None:
        rank, world = _check_shard(shard)
        starts = starts[rank::world]
    frames: List[pd.DataFrame] = []
    t_local = t_global = 0.0
    n_resumed = n_underflow = n_streamed = n_own = 0

    bar = tqdm(total=len(starts), desc="self-repair", unit="batch", disable=not progress)
    try:
        for s in starts:
            stop = min(s + bs, len(task))
            df = ck.load(s, stop) if ck is not None else None
            if df is None:
                sub = task.subset(slice(s, stop))
                df, tl, tg, nu = _analyze_batch(model, backend, sub, s, layers=layers, heads=heads, k=k,
                                            min_contribution=float(min_contribution), select=select,
                                            exclude_bos=bool(exclude_bos), threshold=float(threshold),
                                            min_effect=float(min_effect), score_ablation=score_ablation,
                                            value_ablation=value_ablation, global_effects=bool(global_effects),
                                            temperature=float(temperature), dtype=dtype, k_max=int(k_max),
                                            n_permutations=int(n_permutations), seed=int(seed),
                                            cluster_similarity=float(cluster_similarity), forward=forward)
                t_local += tl
                t_global += tg
                n_underflow += nu["n_underflow"]
                n_streamed += nu["streamed"]
                n_own += nu["own_forward"]
                if ck is not None:
                    ck.save(s, stop, df)
            else:
                n_resumed += 1
            frames.append(df)
            bar.update(1)
            bar.set_postfix(groups=sum(len(f) for f in frames))
    finally:
        bar.close()
    nonempty = [f for f in frames if len(f)]
    groups = pd.concat(nonempty, ignore_index=True) if nonempty else empty_groups(global_effects)
    groups = groups.sort_values(["prompt", "layer", "head", "query"], kind="stable").reset_index(drop=True)
    # n_underflow: unmasked pattern entries that underflowed to 0 and were clamped to the dtype's smallest
    # log on a pattern-site backend (docs/quantities.md, "Notation"), over the batches computed in this call
    meta.update(seconds_local=t_local, seconds_global=t_global, n_batches=len(starts), n_batches_resumed=n_resumed,
                n_underflow=int(n_underflow), streamed_batches=int(n_streamed),
                own_forward_batches=int(n_own))
    return SelfRepairResult(groups, settings, meta)


def _check_shard(shard) -> tuple:
    ok = isinstance(shard, (tuple, list)) and len(shard) == 2 and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in shard)
    if not ok or not 0 <= int(shard[0]) < int(shard[1]):
        raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size; got {shard!r}.")
    return int(shard[0]), int(shard[1])


def head_output_weights(model, layer: int) -> Tensor:
    """``W_O`` of one layer, ``[n_heads, d_head, d_model]``: row block h is the part of the attention output
    projection that reads head h (``model.blocks[l].attn.W_O`` of a TransformerLens model or bridge)."""
    attn = model.blocks[layer].attn
    W = getattr(attn, "W_O", None)
    if W is None:
        W = model.W_O[layer]
    return W.detach()


def _select_auto(w, keys_ok, row_ok, *, k_max: int, min_contribution: float, select: str, n_unmasked, knockout):
    """``k="auto"``: rows with at least 2 contributing keys, each with all of them (at most ``k_max``), in
    the order and tie rule of ``select_keys``. Returns ``[(idx [R, 3], keys [R, kk]) per group size kk]``."""
    key = w if select == "positive" else w.abs()
    key = key.masked_fill(~keys_ok[:, None], float("-inf"))
    n_c = (key > min_contribution).sum(-1)                                                    # [b, h, q]
    size = n_c.clamp_max(k_max)
    ok = (n_c >= 2) & row_ok
    if knockout:
        ok = ok & (n_unmasked[:, None] > size)         # as for fixed k: a row needs more than k unmasked keys
    out = []
    for kk in range(2, k_max + 1):
        idx = (ok & (size == kk)).nonzero()
        if idx.numel() == 0:
            continue
        bi, hi, qi = idx.unbind(1)
        order = torch.sort(-key[bi, hi, qi], dim=1, stable=True).indices
        out.append((idx, order[:, :kk]))
    return out


def permutation_seed(seed: int, prompt: int, layer: int, head: int, query: int) -> int:
    """The seed of one row's permutation test: ``numpy.random.SeedSequence([seed, prompt, layer, head, query])``'s
    first 32-bit word, so a row's draws do not depend on the batching, the padding or the other rows."""
    return int(np.random.SeedSequence([int(seed), int(prompt), int(layer), int(head), int(query)]).generate_state(1)[0])


def _permutation_p_rows(a_r, m_r, c_r, keys, mm_r, prompts, heads, queries, lengths, layer: int, *, score_ablation,
                        min_effect, n_permutations, seed, exclude_bos) -> Tensor:
    """``permutation_p`` of the rows, each row on its own generator (``permutation_seed``) over the keys its query
    sees, ``min(query + 1, length)`` (``lengths`` [R], the prompts' lengths; later keys are masked), all rows in
    one batched call."""
    seeds = [permutation_seed(seed, p, layer, h, q) for p, h, q in zip(prompts.tolist(), heads.tolist(),
                                                                         queries.tolist())]
    return permutation_p(a_r, m_r, c_r, keys, mm_r, score_ablation=score_ablation, min_effect=min_effect,
                         n_permutations=n_permutations, exclude_bos=exclude_bos, row_seeds=seeds,
                         row_lengths=lengths.tolist())["permutation_p"]


def _analyze_batch(model, backend, task: Task, offset: int, *, layers, heads, k, min_contribution, select,
                   exclude_bos, threshold, min_effect, score_ablation, value_ablation, global_effects, temperature,
                   dtype, k_max=8, n_permutations=200, seed=0, cluster_similarity=0.8, forward="auto"):
    """Rows of one batch of prompts: cached run, selection, closed-form effects (+ global effects)."""
    t0 = time.perf_counter()
    run = _batch_run(model, task, backend, layers, dtype, forward)
    dev = run.metric.device
    n = run.mask.shape[1]
    f64 = torch.float64
    qpos = torch.arange(n, device=dev)
    q_ok = (qpos[None] < run.lengths[:, None]) & (qpos[None] <= run.positions[:, None])          # [b, q]
    head_ok = torch.zeros(backend.n_heads, dtype=torch.bool, device=dev)
    head_ok[heads] = True
    sel_mask = run.mask.clone()                                                                  # [b, q, k]
    if exclude_bos:
        sel_mask[:, :, 0] = False
    n_unmasked = run.mask.sum(-1)                                                                # [b, q]
    parts, edits = [], []
    pairs_layer = None
    for l, q0, a in _score_blocks(run, layers):                                                  # a [b, h, qb, nk]
        nk = a.shape[-1]
        qb = slice(q0, q0 + a.shape[2])
        v = run.values[l][:, :nk]                                                                # [b, k, h, d]
        g = run.grad_z[l][:, qb]                                                                 # [b, qb, h, d]
        c = torch.einsum("bqhd,bkhd->bhqk", g, v)
        w = torch.softmax(a, -1).nan_to_num(0.0) * c
        row_ok = q_ok[:, None, qb] & head_ok[None, :, None]                                     # [b, h, qb]
        m_blk, sel_blk = run.mask[:, qb, :nk], sel_mask[:, qb, :nk]
        if k == "auto":
            groups = _select_auto(w, sel_blk, row_ok, k_max=k_max, min_contribution=min_contribution,
                                  select=select, n_unmasked=n_unmasked[:, qb], knockout=score_ablation == "knockout")
        else:
            if score_ablation == "knockout":
                row_ok = row_ok & (n_unmasked[:, qb] > k)[:, None]
            idx, keys = select_keys(w, sel_blk, row_ok, k=k, min_contribution=min_contribution, select=select)
            groups = [(idx, keys)] if idx.numel() else []
        if l != pairs_layer:
            W_O = head_output_weights(model, l).to(device=dev, dtype=f64)                        # [h, d, d_model]
            basis_of = _bases_of_layer(W_O)
            pairs_of, pairs_layer = _pairs_of_layer(run.values[l], basis_of, cluster_similarity), l
        for idx, keys in groups:
            bi, hi, qb_i = idx.unbind(1)                                                         # qb_i: in the block
            o = _group_rows(a, v, c, w, bi, hi, qb_i, keys, m_blk, sel_blk, W_O, basis_of, pairs_of,
                            score_ablation=score_ablation,
                            value_ablation=value_ablation, temperature=temperature, global_effects=global_effects,
                            min_contribution=min_contribution, select=select, exclude_bos=exclude_bos,
                            min_effect=min_effect, cluster_similarity=cluster_similarity)
            qi = qb_i + q0                                                                       # query position
            rows_ = [o.pop(x) for x in ("_a", "_m", "_c", "_mm")]
            if n_permutations:
                pa, pm, pc, pmm = (_pad_keys(x, n) for x in rows_)                                 # as without blocks
                o["permutation_p"] = _permutation_p_rows(
                    pa, pm, pc, keys, pmm, bi + offset, hi, qi, torch.minimum(run.lengths[bi], qi + 1), l,
                    score_ablation=score_ablation, min_effect=min_effect, n_permutations=n_permutations, seed=seed,
                    exclude_bos=exclude_bos)
            else:
                o["permutation_p"] = torch.full((len(bi),), float("nan"), dtype=f64, device=dev)
            del rows_
            o.update(prompt=bi + offset, layer=torch.full_like(bi, l), head=hi, query=qi, keys=keys,
                     metric=run.metric[bi].to(f64))
            if global_effects:
                edits.append((bi, hi, qi, l, o.pop("z_deltas")))                               # [R, k+1, d]
            parts.append(o)
        del w
    stats = dict(n_underflow=int(sum(run.n_underflow.values())), streamed=int(isinstance(run, StreamedRun)),
                 own_forward=int(getattr(run, "forward", "bridge") == "own"))
    metric = run.metric
    del run
    t_local = time.perf_counter() - t0
    with _no_gc():   # millions of small tuples: the cyclic GC would rescan the whole heap many times
        frames = [_to_frame(o, min_effect, threshold) for o in parts]
    t_global = 0.0
    if global_effects:
        t1 = time.perf_counter()
        Gs = _global(model, task, edits, metric)                                               # per edit block
        t_global = time.perf_counter() - t1
        frames = [_add_global(df, G, noise, min_effect) for df, (G, noise) in zip(frames, Gs)]
    frames = [f for f in frames if len(f)]
    df = pd.concat(frames, ignore_index=True) if frames else empty_groups(global_effects)
    return df, t_local, t_global, stats


def _pad_keys(x: Tensor, n: int) -> Tensor:
    """Rows of a block of queries hold the keys up to the block's last query; pad them to the batch's ``n`` keys
    (zeros, i.e. masked / False), so the permutation test draws exactly what it draws without blocks."""
    if x.shape[1] >= n:
        return x
    return torch.cat([x, torch.zeros(x.shape[0], n - x.shape[1], dtype=x.dtype, device=x.device)], 1)


@contextlib.contextmanager
def _no_gc():
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _batch_run(model, task: Task, backend, layers, dtype, forward="auto"):
    """The activations of one batch: streamed (``engine.streamed_run``: no layer's ``[head, q, k]`` scores kept,
    recomputed from q and k per block of queries) where the backend has a live scores site whose q / k hooks
    reproduce it; today's ``cached_run`` otherwise (pattern-site backends, or a recomputation that fails its check)."""
    if can_stream(backend):
        try:
            return streamed_run(model, task, layers=layers, dtype=dtype, backend=backend, forward=forward)
        except StreamMismatch as e:
            warnings.warn(f"{e} Falling back to the cached scores for this batch.", RuntimeWarning, stacklevel=3)
    return cached_run(model, task, layers=layers, dtype=dtype, backend=backend, keep=("scores", "values"))


def _score_blocks(run, layers):
    """``(layer, q0, scores [b, h, queries, keys])`` for every layer and block of queries of ``run``."""
    for l in layers:
        for q0, _q1, a in run.score_blocks(l):
            yield l, q0, a


def _bases_of_layer(W_O: Tensor):
    """``basis_of(head)``: ``output_basis(W_O[head])`` of one layer, computed when first asked (one QR per head)."""
    bases: Dict[int, Tensor] = {}

    def basis_of(h: int) -> Tensor:
        if h not in bases:
            bases[h] = output_basis(W_O[h])
        return bases[h]
    return basis_of


def _pairs_of_layer(values: Tensor, basis_of, cluster_similarity: float):
    """``pairs_of(prompt, head)``: the keys of that prompt and head joined in ``n_clusters`` (cosine of their output
    vectors ``v W_O^h`` at least ``cluster_similarity``), from the whole layer's values, computed when first asked."""
    cache: Dict[tuple, Tensor] = {}

    def pairs_of(b: int, h: int) -> Tensor:
        if (b, h) not in cache:
            u = values[b, :, h].to(torch.float64) @ basis_of(h)
            cache[(b, h)] = similar_pairs(u, cluster_similarity=cluster_similarity)
        return cache[(b, h)]
    return pairs_of


def _group_rows(a, v, c, w, bi, hi, qi, keys, mask, sel_mask, W_O, basis_of, pairs_of, *, score_ablation, value_ablation, temperature,
                global_effects, min_contribution, select, exclude_bos, min_effect, cluster_similarity):
    """The closed-form quantities of R rows of one layer whose groups all have ``keys.shape[1]`` keys."""
    f64 = torch.float64
    n = a.shape[-1]
    k = keys.shape[1]
    a_r = a[bi, hi, qi].to(f64)
    c_r = c[bi, hi, qi].to(f64)
    m_r = mask[bi, qi]
    mm_r = sel_mask[bi, qi]                                    # the mean runs over the selectable keys
    vK = v[bi[:, None], keys, hi[:, None]].to(f64)                                               # [R, k, d]
    v_rest = None
    if global_effects:
        # softmax over each row's rest (unmasked keys outside S), weighted value, via a dense einsum
        rest = m_r.clone().scatter_(1, keys, False)
        s_rest = torch.softmax(a_r.masked_fill(~rest, float("-inf")), 1).nan_to_num(0.0)
        step = max(1, 2 ** 21 // (n * v.shape[-1]))
        v_rest = torch.cat([torch.einsum("rn,rnd->rd", s_rest[i:i + step],
                                         v[bi[i:i + step], :, hi[i:i + step]].to(f64))
                            for i in range(0, len(bi), step)])
    R = len(bi)
    chunk = max(1, 2 ** 22 // ((2 ** k) * (k + 2) + n))
    res: Dict[str, List[Tensor]] = {}
    for i in range(0, R, chunk):
        sl = slice(i, i + chunk)
        o = row_effects(a_r[sl], m_r[sl], c_r[sl], keys[sl], mm_r[sl], score_ablation=score_ablation,
                        value_ablation=value_ablation, temperature=temperature, v_keys=vK[sl],
                        v_rest=None if v_rest is None else v_rest[sl])
        for key_, val in o.items():
            if key_ != "subset_effects":
                res.setdefault(key_, []).append(val)
    o = {key_: torch.cat(vals) for key_, vals in res.items()}
    # what r is made of (docs/quantities.md, "What r is made of") and group sizes ("Group sizes"): both read the
    # pattern changes at the keys of S, which the closed-form kernel has already computed
    changes = KeyChanges(o.pop("key_changes"), o["p"], o["effects"], o.pop("c_rest"))
    o["mass_interaction"] = mass_interaction(a_r, m_r, keys, mm_r, score_ablation=score_ablation,
                                             min_effect=min_effect, changes=changes)
    cc = concealment(a_r, m_r, c_r, keys, mm_r, score_ablation=score_ablation, min_effect=min_effect,
                     changes=changes)
    o["concealment"], o["concealment_share"] = cc["concealment"], cc["concealment_share"]
    o["c_ratio"] = c_ratio(c_r.gather(1, keys))
    w_r = w[bi, hi, qi]
    o["n_contributing"] = n_contributing(w_r, m_r, min_contribution=min_contribution, select=select,
                                         exclude_bos=exclude_bos)
    key = w_r if select == "positive" else w_r.abs()
    members = (key > min_contribution) & mm_r
    vso = torch.full((R,), float("nan"), dtype=f64, device=a_r.device)
    for h in torch.unique(hi).tolist():
        rows = (hi == h).nonzero().squeeze(1)
        vso[rows] = value_similarity_out(vK[rows], W_O[h][None], basis=basis_of(h))
    # n_clusters: the joined pairs of each (prompt, head) once per layer (pairs_of), then every row at once
    ncl = members.sum(1)                                       # no joined pair: every member its own cluster
    bh = torch.unique(bi * W_O.shape[0] + hi)
    for x in bh.tolist():
        b_, h_ = divmod(int(x), W_O.shape[0])
        pr = pairs_of(b_, h_)
        pr = pr[:, pr[1] < n]
        if pr.shape[1]:
            rows = ((bi == b_) & (hi == h_)).nonzero().squeeze(1)
            ncl[rows] = n_clusters_from_pairs(members[rows], pr)
    o["value_similarity_out"] = vso
    o["n_clusters"] = ncl
    o.update(_a=a_r, _m=m_r, _c=c_r, _mm=mm_r)
    return o


def _to_frame(cat: Dict[str, Tensor], min_effect: float, threshold: float) -> pd.DataFrame:
    """One frame from the quantities of rows whose groups share one size."""
    def np_(x):
        return x.detach().cpu().numpy()

    def tup(x, conv=float):
        # numpy's tolist gives Python floats (float64 arrays) / ints (int64 arrays) already; zip over the
        # columns builds the row tuples in C
        arr = x.detach().cpu().numpy().astype(np.int64 if conv is int else np.float64, copy=False)
        return list(zip(*arr.T.tolist())) if arr.shape[1] else [()] * arr.shape[0]

    E = cat["effects"]
    ES = cat["effect_joint"]
    esum = E.sum(1)
    inter, inter_sym = interaction_ratio(E, ES, cat["contributions"], min_effect)
    sr = ~torch.isnan(inter) & (inter > threshold)
    data = {
        "prompt": np_(cat["prompt"]).astype(np.int64), "layer": np_(cat["layer"]).astype(np.int64),
        "head": np_(cat["head"]).astype(np.int64), "query": np_(cat["query"]).astype(np.int64),
        "keys": tup(cat["keys"], int), "contributions": tup(cat["contributions"]), "effects": tup(E),
        "effect_sum": np_(esum), "effect_joint": np_(ES), "interaction": np_(inter),
        "interaction_sym": np_(inter_sym), "self_repair": np_(sr).astype(bool), "shapley": tup(cat["shapley"]),
        "value_similarity": np_(cat["value_similarity"]), "value_effects": tup(cat["value_effects"]),
        "value_effect_joint": np_(cat["value_effect_joint"]), "value_interaction": np_(cat["value_interaction"]),
        "grad_estimate": np_(cat["grad_estimate"]), "tsg_estimate": np_(cat["tsg_estimate"]),
        "grad_estimates": tup(cat["grad_estimates"]), "tsg_estimates": tup(cat["tsg_estimates"]),
        "p": tup(cat["p"]), "scores": tup(cat["scores"]), "mass": np_(cat["mass"]),
        "n_keys": np_(cat["n_keys"]).astype(np.int64), "head_contribution": np_(cat["head_contribution"]),
        "metric": np_(cat["metric"]),
        "mass_interaction": np_(cat["mass_interaction"]),
        "excess_interaction": np_(inter - cat["mass_interaction"]),
        "concealment": tup(cat["concealment"]), "concealment_share": np_(cat["concealment_share"]),
        "permutation_p": np_(cat["permutation_p"]), "c_ratio": np_(cat["c_ratio"]),
        "value_similarity_out": np_(cat["value_similarity_out"]),
        "n_contributing": np_(cat["n_contributing"]).astype(np.int64),
        "n_clusters": np_(cat["n_clusters"]).astype(np.int64),
    }
    def column(c):
        if c in TUPLE_COLUMNS:
            return pd.Series(data[c], dtype=object)
        if c in INT_COLUMNS or c in BOOL_COLUMNS:
            return data[c]
        return np.asarray(data[c], dtype=np.float64)
    return pd.DataFrame({c: column(c) for c in BASE_COLUMNS}, columns=BASE_COLUMNS)


def _global(model, task: Task, edits, metric: Tensor) -> List[tuple]:
    """Global effects of the individual and joint ablations of every row, one ``(G [rows, k+1], noise [rows])``
    per edit block; ``noise`` is the measured noise of the engine's forward per row: ``|m(clean via the
    engine) - m(clean)|`` of the row's prompt, the engine's result for a zero edit against the cached run's
    metric (float32 or better)."""
    if not edits:
        return []
    P, Hh, Q, Lr, D, sizes = [], [], [], [], [], []
    for bi, hi, qi, l, zd in edits:
        R, k1 = zd.shape[0], zd.shape[1]
        P.append(bi.repeat_interleave(k1))
        Hh.append(hi.repeat_interleave(k1))
        Q.append(qi.repeat_interleave(k1))
        Lr.append(torch.full((R * k1,), l, dtype=torch.long, device=bi.device))
        D.append(zd.reshape(R * k1, 1, zd.shape[-1]))
        sizes.append((R, k1))
    ze = ZEdits(torch.cat(P).cpu(), torch.cat(Lr).cpu(), torch.cat(Hh).cpu(), torch.cat(Q).cpu(), torch.cat(D).cpu())
    clean = prepare_clean(model, task)
    out = measure_z_edits(model, task, ze, progress=False, clean=clean).to(torch.float64)
    delta = (clean.metric.to(torch.float64) - metric.detach().cpu().to(torch.float64)).abs()      # [prompts]
    blocks = torch.split(out, [R * k1 for R, k1 in sizes])
    return [(b.reshape(R, k1), delta[e[0].cpu()]) for b, (R, k1), e in zip(blocks, sizes, edits)]


def _add_global(df: pd.DataFrame, G: Tensor, noise: Tensor, min_effect: float) -> pd.DataFrame:
    # rows of df are in the order the edits were built (nonzero order of one layer and group size): same as G
    if len(df) == 0:
        return empty_groups(True)
    k = G.shape[1] - 1
    w = torch.tensor([list(t) for t in df["contributions"]], dtype=torch.float64).reshape(len(df), k)
    gi = interaction_ratio(G[:, :k], G[:, k], w, min_effect, noise=noise)[0].numpy()
    Gn = G[:, :k].numpy()
    GS = G[:, k].numpy()
    gsum = Gn.sum(1)
    df = df.copy()
    df["global_effects"] = pd.Series([tuple(float(x) for x in r) for r in Gn.tolist()], dtype=object, index=df.index)
    df["global_effect_joint"] = GS.astype(np.float64)
    df["global_effect_sum"] = gsum.astype(np.float64)
    df["global_interaction"] = gi.astype(np.float64)
    df["downstream_gap"] = ((GS - gsum) - (df["effect_joint"].to_numpy() - df["effect_sum"].to_numpy()))
    df["global_noise"] = noise.numpy().astype(np.float64)
    return df
