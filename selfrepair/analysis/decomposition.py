"""What the interaction ratio r is made of, and how large the groups are (SPEC "What r is made of:
geometry versus redundancy" and "Group sizes").

Closed form, batched over rows, float64, on the row representation of the self-repair kernel
(``row_effects``): per row (one prompt, head and query) ``a [R, n]`` the scores, ``mask [R, n]`` the
unmasked keys, ``c [R, n] = g . v_j``, ``keys [R, k]`` the group S, ``mean_mask [R, n]`` the keys that
enter the score mean (the unmasked keys, key 0 left out under ``exclude_bos``), ``score_ablation``
``"mean"`` or ``"knockout"`` (the old keyword ``ablation=`` still works, with a DeprecationWarning; rows with no
more than k unmasked keys must not be passed under knockout, as in the analysis). Local effects are ``E(p') = sum_j (p_j - p'_j) c_j``; the floor of a
ratio is ``max(min_effect, 0.01 sum_S |w_j|)`` with ``w_j = p_j c_j`` (SPEC "Individual versus joint").

- ``mass_interaction``: r with ``c = 1_S`` (pure softmax geometry; floor with w = p, min_effect in mass units).
- ``concealment``: per key, the part of its individual effect the other keys of S hide by carrying
  what it carries; ``concealment_share`` per group.
- ``permutation_p``: a permutation test of "the interaction needs these contributions".
- ``c_ratio``, ``value_similarity_out``, ``n_contributing``, ``n_clusters``.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from einops import rearrange, repeat

from .._deprecation import renamed_keyword
from .._typing import Bool, Float, Int, Tensor
from ..engine.kernels import ablated_pattern
from .rows import interaction_ratio, row_effects

__all__ = ["KeyChanges", "key_changes", "pattern_changes", "similar_pairs", "n_clusters_from_pairs", "output_basis", "mass_interaction", "concealment", "permutation_p", "c_ratio", "value_similarity_out",
           "n_contributing", "n_clusters", "TIE_RTOL"]

ABLATIONS = ("mean", "knockout")
SELECT_MODES = ("positive", "abs")
#: permutation test: r_b counts as ">= r" when ``r_b >= r - TIE_RTOL * max(1, |r|)`` (see ``permutation_p``)
TIE_RTOL = 1e-9
_F64 = torch.float64
_BUDGET = 2 ** 22        # elements of the kernel's largest intermediate per chunk of rows
_PAIR_MARGIN = 1e-3      # similar_pairs: float32 cosines this close to the threshold are decided in float64


def _score_ablation(deprecated: dict, score_ablation: str, where: str) -> str:
    """``score_ablation``, or the deprecated ``ablation=`` of the call (with a DeprecationWarning), checked."""
    score_ablation = renamed_keyword(deprecated, "ablation", "score_ablation", score_ablation, where, default="mean",
                                     stacklevel=4)
    if score_ablation not in ABLATIONS:
        raise ValueError(f"unknown score_ablation {score_ablation!r}; valid: {', '.join(ABLATIONS)}.")
    return score_ablation


def _rows(a, mask, c, keys, mean_mask):
    a = torch.as_tensor(a).to(_F64)
    out = [a, torch.as_tensor(mask).bool().to(a.device)]
    out.append(None if c is None else torch.as_tensor(c).to(device=a.device, dtype=_F64))
    out += [torch.as_tensor(keys).long().to(a.device), torch.as_tensor(mean_mask).bool().to(a.device)]
    return out


def _chunk(k: int, n: int) -> int:
    """Rows per kernel call: the subset tensors are [rows, 2^k, k + 2] beside [rows, n]."""
    return max(1, _BUDGET // ((2 ** k) * (k + 2) + n))


def _kernel(a, mask, c, keys, mean_mask, score_ablation: str, names: Sequence[str]) -> list:
    """The ``names`` outputs of the closed-form kernel (``row_effects``) for R rows, run in chunks of rows (one
    call on the empty rows when R = 0, which gives the empty shapes)."""
    R, n = a.shape
    step = _chunk(keys.shape[1], n)
    parts: list = [[] for _ in names]
    for s in range(0, max(R, 1), step):
        sl = slice(s, s + step)
        o = row_effects(a[sl], mask[sl], c[sl], keys[sl], mean_mask[sl], score_ablation=score_ablation,
                        value_ablation="zero", temperature=1.0)
        for got, name in zip(parts, names):
            got.append(o[name])
    return [torch.cat(x) for x in parts]


def _effects(a, mask, c, keys, mean_mask, score_ablation: str):
    """Individual effects [R, k], joint effect [R] and contributions w_S [R, k] from the kernel, in chunks."""
    return tuple(_kernel(a, mask, c, keys, mean_mask, score_ablation, ("effects", "effect_joint", "contributions")))


class KeyChanges(NamedTuple):
    """The pattern changes at the keys of S that ``mass_interaction`` and ``concealment`` need, per row:
    ``at_keys`` [R, k+1, k] ``p_i - p'_i`` at the keys of S (in the order of ``keys``) under each individual
    ablation, then the joint one; ``p_keys`` [R, k] the clean ``p_S``; ``effects`` [R, k] the individual
    local effects ``E_j = sum_i (p_i - p'^(j)_i) c_i`` over the whole row (with the rows' ``c``); ``c_rest``
    [R] (optional) the p-weighted mean of c over the keys outside S that enter the mean (``concealment``'s
    ``c_rest``). All are outputs of ``row_effects`` (``key_changes``, ``p``, ``effects``, ``c_rest``): the
    analysis passes them on."""
    at_keys: Tensor
    p_keys: Tensor
    effects: Tensor
    c_rest: Optional[Tensor] = None


def key_changes(
    a: Float[Tensor, "R n"],
    mask: Bool[Tensor, "R n"],
    keys: Int[Tensor, "R k"],
    mean_mask: Bool[Tensor, "R n"],
    score_ablation: str = "mean",
    c: Optional[Float[Tensor, "R n"]] = None,
) -> KeyChanges:
    """``KeyChanges`` of R rows from the closed-form kernel (``row_effects``, log space), in chunks of rows;
    ``c`` (default 0: effects 0) only enters ``effects``."""
    a, mask, c, keys, mean_mask = _rows(a, mask, c, keys, mean_mask)
    if c is None:
        c = torch.zeros_like(a)
    return KeyChanges(*_kernel(a, mask, c, keys, mean_mask, score_ablation, ("key_changes", "p", "effects", "c_rest")))


def mass_interaction(
    a: Float[Tensor, "R n"],
    mask: Bool[Tensor, "R n"],
    keys: Int[Tensor, "R k"],
    mean_mask: Bool[Tensor, "R n"],
    *,
    score_ablation: str = "mean",
    min_effect: float = 1e-4,
    changes: Optional[KeyChanges] = None,
    **deprecated,
) -> Float[Tensor, "R"]:
    """``changes``: the ``KeyChanges`` of these rows when already computed (e.g. from ``row_effects``).

    r computed with ``c = 1_S`` (the keys of S as perfect copies, every other key silent):
    ``E_mass(S') = sum_{j in S} (p_j - p'_j)``, NaN when ``|E_mass(S)| < max(min_effect, 0.01 sum_S p_j)``
    (``min_effect`` in mass units). Depends on the scores only."""
    score_ablation = _score_ablation(deprecated, score_ablation, "mass_interaction")
    a, mask, _, keys, mean_mask = _rows(a, mask, None, keys, mean_mask)
    # every effect is linear in c: E(S') = sum_j (p_j - p'_j(S')) c_j with the pattern changes of the kernel;
    # with c = 1_S only the changes at the keys of S count
    ch = changes if changes is not None else key_changes(a, mask, keys, mean_mask, score_ablation)
    k = keys.shape[1]
    Em = ch.at_keys.sum(2)                                                         # [R, k+1]: c = 1_S
    return interaction_ratio(Em[:, :k], Em[:, k], ch.p_keys, min_effect)[0]


def concealment(
    a: Float[Tensor, "R n"],
    mask: Bool[Tensor, "R n"],
    c: Float[Tensor, "R n"],
    keys: Int[Tensor, "R k"],
    mean_mask: Bool[Tensor, "R n"],
    *,
    score_ablation: str = "mean",
    min_effect: float = 1e-4,
    changes: Optional[KeyChanges] = None,
    **deprecated,
) -> Dict[str, Tensor]:
    """How much of each key's individual effect the other keys of S hide by carrying what it carries
    (``changes``: the ``KeyChanges`` of these rows, with these ``c``, when already computed).

    ``c_rest`` [R]: the p-weighted mean of c over the row's keys outside S that enter the score mean
    (``mean_mask``: unmasked, key 0 left out under ``exclude_bos``) in the clean row; NaN without such
    keys. ``E0`` [R, k]: key j's individual effect had the other keys of S carried ``c_rest`` (the
    kernel re-run with those contributions). ``concealment`` [R, k] ``= E0_j - E_j
    = sum_{i in S, i != j} (p'^(j)_i - p_i)(c_i - c_rest)``. ``concealment_share`` [R]
    ``= sum_j concealment_j / sum_j E0_j``, NaN when ``|sum_j E0_j| < max(min_effect, 0.01 sum_S |w_j|)``.
    Also returns ``effects`` E_j [R, k].
    """
    score_ablation = _score_ablation(deprecated, score_ablation, "concealment")
    a, mask, c, keys, mean_mask = _rows(a, mask, c, keys, mean_mask)
    k = keys.shape[1]
    # every effect is linear in c (the scores are fixed): E_j = sum_i (p_i - p'^(j)_i) c_i with the pattern changes
    # of the kernel; E0_j, the same with the other keys of S carrying c_rest, differs from E_j only on those keys:
    # concealment_j = E0_j - E_j = sum_{i in S, i != j} (p'^(j)_i - p_i) (c_i - c_rest)
    ch = changes if changes is not None and changes.c_rest is not None else \
        key_changes(a, mask, keys, mean_mask, score_ablation, c)
    E, pK, c_rest = ch.effects, ch.p_keys, ch.c_rest
    cK = c.gather(1, keys)                                                         # [R, k]
    W = pK * cK
    dK = ch.at_keys[:, :k]                                                         # [R, j, i]: p_i - p'^(j)_i
    off = ~torch.eye(k, dtype=torch.bool, device=a.device)
    conc = -(torch.where(off, dK * (cK - c_rest[:, None])[:, None, :], 0.0)).sum(2)
    conc = torch.where(torch.isnan(c_rest)[:, None], torch.full_like(conc, float("nan")), conc)
    E0 = E + conc
    tot = E0.sum(1)
    floor = torch.clamp(0.01 * W.abs().sum(1), min=min_effect)
    share = torch.where(tot.abs() >= floor, conc.sum(1) / tot, torch.full_like(tot, float("nan")))
    return {"concealment": conc, "concealment_share": share, "E0": E0, "effects": E, "c_rest": c_rest}


def pattern_changes(
    a: Float[Tensor, "R n"],
    mask: Bool[Tensor, "R n"],
    keys: Int[Tensor, "R k"],
    mean_mask: Bool[Tensor, "R n"],
    score_ablation: str = "mean",
) -> Tuple[Float[Tensor, "R k1 n"], Float[Tensor, "R k"]]:
    """``p - p'`` [R, k + 1, n] of the individual ablations (in the order of ``keys``) and the joint one,
    and ``p_S`` [R, k], from the one score-ablation kernel (``engine.ablated_pattern``), in chunks of rows."""
    R, n = a.shape
    k = keys.shape[1]
    if R == 0:
        return a.new_zeros(0, k + 1, n), a.new_zeros(0, k)
    step = max(1, _BUDGET // ((k + 2) * max(n, 1)))
    sets = torch.cat([torch.eye(k, dtype=torch.bool, device=a.device),
                      torch.ones(1, k, dtype=torch.bool, device=a.device)])               # [k+1, k]: {j}, S
    dP, pK = [], []
    for s in range(0, R, step):
        sl = slice(s, s + step)
        r = a[sl].shape[0]
        am = a[sl].masked_fill(~mask[sl], 0.0)
        p = ablated_pattern(am, mask[sl], torch.zeros_like(mask[sl]), score_ablation=score_ablation,
                            mean_mask=mean_mask[sl])                                    # [r, n] clean
        abl = torch.zeros(r, k + 1, n, dtype=torch.bool, device=a.device)
        abl.scatter_(2, repeat(keys[sl], "r s -> r t s", t=k + 1), repeat(sets, "t s -> r t s", r=r))
        p_ab = ablated_pattern(repeat(am, "r n -> r t n", t=k + 1), repeat(mask[sl], "r n -> r t n", t=k + 1), abl,
                               score_ablation=score_ablation,
                               mean_mask=repeat(mean_mask[sl], "r n -> r t n", t=k + 1))
        dP.append(p[:, None, :] - p_ab)
        pK.append(p.gather(1, keys[sl]))
    return torch.cat(dP), torch.cat(pK)


def permutation_p(
    a: Float[Tensor, "R n"],
    mask: Bool[Tensor, "R n"],
    c: Float[Tensor, "R n"],
    keys: Int[Tensor, "R k"],
    mean_mask: Bool[Tensor, "R n"],
    *,
    score_ablation: str = "mean",
    min_effect: float = 1e-4,
    n_permutations: int = 200,
    seed: int = 0,
    exclude_bos: bool = False,
    chunk_rows: Optional[int] = None,
    row_seeds: Optional[Sequence[int]] = None,
    row_lengths: Optional[Sequence[int]] = None,
    **deprecated,
) -> Dict[str, Tensor]:
    """Permutation test of "the interaction needs these contributions" (scores and S fixed).

    The permutable keys of a row are its unmasked keys (key 0 left out, and kept in place, under
    ``exclude_bos``). Draws: ``u = torch.rand(R, B, n, dtype=float64, generator=torch.Generator()
    .manual_seed(seed))`` on the CPU, B = ``n_permutations``, drawn in consecutive chunks of rows
    (``chunk_rows``; torch's CPU generator yields the same numbers whole or in chunks). Permutation b of
    row r puts on the t-th permutable key (ascending position) the c of the permutable key with the t-th
    smallest ``u[r, b]`` among the permutable keys (float64 draws: ties have probability ~1e-12 and are
    broken by the sort); the other keys keep their c.
    ``r_b`` is r with those contributions (NaN under the floor, whose w uses the permuted c). The scores
    are fixed, so every local effect is linear in c: ``E_b(S') = sum_j (p_j - p'_j(S')) c_b,j`` with the
    pattern changes taken once per row from the kernel, then one product for all B permutations.
    ``permutation_p = (1 + #{b: r_b >= r}) / (1 + #{b: r_b defined})``, NaN where r is NaN; a tie
    counts when ``r_b >= r - TIE_RTOL * max(1, |r|)`` (float64 rounding of r is orders of magnitude
    smaller, so permutations that leave r unchanged, e.g. under two equal scores and a uniform rest,
    count as ties). Returns ``permutation_p``, ``interaction`` (r, from the kernel with the row's own c)
    and ``n_defined`` (defined r_b), [R].

    ``row_seeds`` (one per row) and ``row_lengths`` (default n): each row draws from its own generator
    instead, ``u[r] = torch.rand(B, row_lengths[r], dtype=float64, generator=torch.Generator()
    .manual_seed(row_seeds[r]))`` (keys at or beyond ``row_lengths[r]`` must be masked), i.e. the numbers a
    call on that row alone, cut to its length, with ``seed=row_seeds[r]`` draws; the rest stays batched.
    """
    score_ablation = _score_ablation(deprecated, score_ablation, "permutation_p")
    B = int(n_permutations)
    if B < 1 or B != n_permutations:
        raise ValueError(f"n_permutations must be a whole number >= 1 (got {n_permutations}); e.g. 200.")
    a, mask, c, keys, mean_mask = _rows(a, mask, c, keys, mean_mask)
    R, n = a.shape
    k = keys.shape[1]
    dev = a.device
    E, ES, W = _effects(a, mask, c, keys, mean_mask, score_ablation)
    r = interaction_ratio(E, ES, W, min_effect)[0]
    dP, pK = pattern_changes(a, mask, keys, mean_mask, score_ablation)          # [R, k+1, n], [R, k]
    c0 = torch.where(mask, c, torch.zeros((), dtype=_F64, device=dev))   # masked keys hold no weight
    perm_ok = mask.clone()
    if exclude_bos and n > 0:
        perm_ok[:, 0] = False
    # target slots (per chunk below): permutable keys in ascending position first, then the fixed ones (ascending)
    gen = torch.Generator().manual_seed(int(seed))
    fixed_cpu = (~perm_ok).cpu()
    pos = torch.arange(n, dtype=_F64)
    step = int(chunk_rows) if chunk_rows is not None else max(1, _BUDGET // (B * (n + k + 2)))
    if row_seeds is not None:
        row_seeds = [int(x) for x in row_seeds]
        row_lengths = [n] * R if row_lengths is None else [int(x) for x in row_lengths]
        if len(row_seeds) != R or len(row_lengths) != R or any(not 0 <= x <= n for x in row_lengths):
            raise ValueError(f"row_seeds and row_lengths need one entry per row ({R}), lengths within 0..{n}.")
        if bool((mask & (torch.arange(n, device=dev)[None] >= torch.tensor(row_lengths, device=dev)[:, None])).any()):
            raise ValueError("keys at or beyond a row's row_lengths entry must be masked.")
    ge = torch.zeros(R, dtype=torch.long, device=dev)
    n_def = torch.zeros(R, dtype=torch.long, device=dev)
    # Keys after a row's last permutable or weighted key take no part: permutations move only permutable keys
    # (the fixed ones sort last, in order), and keys without weight (masked: c0 = 0, dP = 0) add nothing. So
    # each chunk works on its rows' first `width` keys only; with one generator per row the rows are taken in
    # the order of their width (the draws do not depend on it), so that a chunk's rows have similar widths.
    last = torch.where(perm_ok | mask, torch.arange(n, device=dev) + 1, 0).amax(1) if n else torch.zeros(R, device=dev)
    order = torch.argsort(last, stable=True) if row_seeds is not None else torch.arange(R, device=dev)
    width_sorted = last[order].tolist()
    order_l = order.tolist()
    for s in range(0, R, step):
        rows = order[s:s + step]
        Rc = rows.shape[0]
        W = max(1, int(max(width_sorted[s:s + step])))
        if row_seeds is None:
            u = torch.rand(Rc, B, n, dtype=_F64, generator=gen)[:, :, :W]
        else:
            u = torch.zeros(Rc, B, W, dtype=_F64)                       # beyond a row's length: masked, fixed
            for i, r_ in enumerate(order_l[s:s + step]):
                L = row_lengths[r_]
                u[i, :, :min(L, W)] = torch.rand(B, L, dtype=_F64,
                                                 generator=torch.Generator().manual_seed(row_seeds[r_]))[:, :W]
        rows_cpu = rows.cpu()
        u = torch.where(fixed_cpu[rows_cpu, None, :W], 2.0 + pos[:W], u).numpy()   # fixed keys sort last, in order
        src = torch.from_numpy(np.argsort(u, axis=2)).to(dev)              # numpy's sort: ~4x torch's on CPU
        dst = torch.argsort((~perm_ok[rows, :W]).to(torch.int8), dim=1, stable=True)[:, None, :].expand(Rc, B, W)
        cb = torch.zeros(Rc, B, W, dtype=_F64, device=dev).scatter_(
            2, dst, c0[rows, None, :W].expand(Rc, B, W).gather(2, src))       # [Rc, B, W]
        Eb = torch.einsum("rsn,rbn->rbs", dP[rows, :, :W], cb)              # [Rc, B, k+1]
        wb = pK[rows, None, :] * cb.gather(2, keys[rows, None, :].expand(Rc, B, k))
        rb = interaction_ratio(rearrange(Eb[..., :k], "r b k -> (r b) k"), rearrange(Eb[..., k], "r b -> (r b)"),
                               rearrange(wb, "r b k -> (r b) k"), min_effect)[0]
        rb = rearrange(rb, "(r b) -> r b", b=B)
        r0 = r[rows, None]
        tol = TIE_RTOL * r0.abs().clamp_min(1.0)
        ge[rows] = (rb >= r0 - tol).sum(1)                                 # NaN compares False
        n_def[rows] = (~torch.isnan(rb)).sum(1)
    p = torch.where(torch.isnan(r), torch.full_like(r, float("nan")), (1.0 + ge.to(_F64)) / (1.0 + n_def.to(_F64)))
    return {"permutation_p": p, "interaction": r, "n_defined": n_def}


def c_ratio(c_keys: Float[Tensor, "R k"]) -> Float[Tensor, "R"]:
    """``min_n |c_n| / max_n |c_n|`` over the keys of S, negated when the c_n differ in sign (some > 0 and
    some < 0): 1 = equal contributions, 0 = one key carries nothing, < 0 = they pull opposite ways.
    NaN when every c_n is 0."""
    c = torch.as_tensor(c_keys).to(_F64)
    ab = c.abs()
    mx = ab.max(1).values
    ratio = torch.where(mx > 0, ab.min(1).values / mx, torch.full_like(mx, float("nan")))
    mixed = (c > 0).any(1) & (c < 0).any(1)
    return torch.where(mixed, -ratio, ratio)


def value_similarity_out(
    v_keys: Float[Tensor, "R k d_head"],
    W_O_h: Float[Tensor, "#R d_head d_model"],
    *,
    basis: Optional[Float[Tensor, "d_head d_head"]] = None,
) -> Float[Tensor, "R"]:
    """Mean pairwise cosine similarity of the keys' head outputs ``v_j W_O^h`` (d_model; ``W_O^h`` the
    rows of the output projection that read head h, one per row or one shared). NaN for k < 2 or a
    zero output vector. ``basis``: ``output_basis`` of a shared ``W_O^h`` when already computed."""
    v = torch.as_tensor(v_keys).to(_F64)
    W = torch.as_tensor(W_O_h).to(device=v.device, dtype=_F64)
    R, k, _ = v.shape
    if k < 2:
        return torch.full((R,), float("nan"), dtype=_F64, device=v.device)
    # cosines of v W are those of v R^T (output_basis): one QR of a shared W, then d_head-dimensional vectors
    o = v @ (output_basis(W[0]) if basis is None else basis.to(v)) if W.shape[0] == 1 else torch.einsum("rkd,rdm->rkm", v, W.expand(R, -1, -1))
    norm = o.norm(dim=2, keepdim=True)
    on = torch.where(norm > 0, o / norm, torch.full_like(o, float("nan")))
    cos = on @ on.transpose(1, 2)
    iu = torch.triu_indices(k, k, 1, device=v.device)
    return cos[:, iu[0], iu[1]].mean(1)


def n_contributing(
    w: Float[Tensor, "R n"],
    mask: Bool[Tensor, "R n"],
    *,
    min_contribution: float = 1.0,
    select: str = "positive",
    exclude_bos: bool = False,
) -> Int[Tensor, "R"]:
    """Number of keys of each row passing the selection rule: unmasked, ``w_j > min_contribution``
    (``|w_j|`` under ``select="abs"``), key 0 excluded under ``exclude_bos``."""
    if select not in SELECT_MODES:
        raise ValueError(f"unknown select mode {select!r}; valid: {', '.join(SELECT_MODES)}.")
    w = torch.as_tensor(w)
    ok = torch.as_tensor(mask).bool().clone()
    if exclude_bos and ok.shape[1] > 0:
        ok[:, 0] = False
    key = w if select == "positive" else w.abs()
    return ((key > min_contribution) & ok).sum(1)


def n_clusters(
    members: Bool[Tensor, "R n"],
    *,
    vectors: Optional[Float[Tensor, "R n d"]] = None,
    similarity: Optional[Float[Tensor, "R n n"]] = None,
    cluster_similarity: float = 0.8,
) -> Int[Tensor, "R"]:
    """Number of connected components among each row's ``members`` (e.g. its contributing keys) when two
    members are joined if their cosine similarity is at least ``cluster_similarity`` (single linkage).

    Give either ``vectors`` (e.g. the keys' outputs ``v_j W_O^h``; the cosine is computed, a zero vector
    joins nothing) or a ``similarity`` matrix. Components are found by propagating the smallest member
    index along the joins until nothing changes (at most n rounds), all rows at once.
    """
    if not (-1.0 <= float(cluster_similarity) <= 1.0):
        raise ValueError(f"cluster_similarity is a cosine and must lie in [-1, 1] (got {cluster_similarity}).")
    if (vectors is None) == (similarity is None):
        raise ValueError("give exactly one of vectors= (output vectors) or similarity= (a similarity matrix).")
    members = torch.as_tensor(members).bool()
    R, n = members.shape
    dev = members.device
    if vectors is not None:
        v = torch.as_tensor(vectors).to(device=dev, dtype=_F64)
        norm = v.norm(dim=2, keepdim=True)
        vn = torch.where(norm > 0, v / norm, torch.full_like(v, float("nan")))
    else:
        sim_all = torch.as_tensor(similarity).to(dev)
    out = torch.zeros(R, dtype=torch.long, device=dev)
    idx = torch.arange(n, device=dev)
    big = torch.tensor(n, device=dev)
    step = max(1, _BUDGET // max(1, n * n))
    for s in range(0, R, step):
        sl = slice(s, s + step)
        m = members[sl]
        sim = vn[sl] @ vn[sl].transpose(1, 2) if vectors is not None else sim_all[sl]
        adj = (sim >= cluster_similarity) & m[:, :, None] & m[:, None, :]
        lab = torch.where(m, idx, big)
        for _ in range(n):
            nb = torch.where(adj, lab[:, None, :], big).min(2).values
            new = torch.where(m, torch.minimum(lab, nb), big)
            if torch.equal(new, lab):
                break
            lab = new
        out[sl] = (m & (lab == idx)).sum(1)
    return out


def similar_pairs(
    vectors: Float[Tensor, "n d"],
    *,
    cluster_similarity: float = 0.8,
) -> Int[Tensor, "2 E"]:
    """The pairs ``i < j`` of keys whose vectors' cosine is at least ``cluster_similarity`` (a zero vector joins
    nothing), as ``[2, E]`` indices. For the head's output vectors ``v W_O`` give ``output_basis(W_O) `` applied to
    the values: the same dot products at ``d_head`` cost."""
    v = torch.as_tensor(vectors).to(_F64)
    norm = v.norm(dim=1, keepdim=True)
    ok = norm.squeeze(1) > 0
    vn = torch.where(norm > 0, v / norm.clamp_min(torch.finfo(_F64).tiny), torch.zeros_like(v))
    # all n^2 cosines in float32, then the candidates within _PAIR_MARGIN of the threshold decided in float64: a
    # float32 cosine of unit vectors in d dimensions is off by at most about d * 2^-24 (~4e-6 at d = 64), far
    # inside the margin, so the pairs are exactly those of the float64 cosines, at the float32 product's cost
    sim = vn.to(torch.float32) @ vn.to(torch.float32).T
    cand = (sim >= float(cluster_similarity) - _PAIR_MARGIN).nonzero()
    del sim
    i, j = cand[:, 0], cand[:, 1]
    up = i < j
    i, j = i[up], j[up]
    keep = ((vn[i] * vn[j]).sum(1) >= cluster_similarity) & ok[i] & ok[j]
    return torch.stack([i[keep], j[keep]])


def n_clusters_from_pairs(
    members: Bool[Tensor, "R n"],
    pairs: Int[Tensor, "2 E"],
) -> Int[Tensor, "R"]:
    """``n_clusters`` of rows that share one set of joined pairs (e.g. the rows of one prompt and head):
    connected components among each row's ``members`` when the pairs ``(i, j)`` with both ends members are
    joined. Minimum-label propagation along the joined pairs with pointer jumping, all rows at once: the cost
    is rows x pairs per round, a few rounds (the label of a label is taken each round, so long chains
    collapse in about log2(length) rounds)."""
    members = torch.as_tensor(members).bool()
    R, n = members.shape
    dev = members.device
    size = members.sum(1)
    if pairs.numel() == 0 or R == 0:
        return size.to(torch.long)
    ei, ej = pairs[0].to(dev), pairs[1].to(dev)
    out = size.clone().to(torch.long)
    idx = torch.arange(n + 1, device=dev)
    step = max(1, _BUDGET // max(1, ei.numel()))
    for s in range(0, R, step):
        m = members[s:s + step]
        act = m[:, ei] & m[:, ej]                                   # [r, E] joined pairs of each row
        busy = act.any(1)
        if not bool(busy.any()):
            continue
        m, act = m[busy], act[busy]
        r = m.shape[0]
        # labels over n + 1 slots: slot n is the sink of non-members and of inactive pairs
        lab = torch.where(m, idx[:n], torch.full_like(idx[:n], n))
        lab = torch.cat([lab, torch.full((r, 1), n, device=dev, dtype=lab.dtype)], 1)
        src = torch.where(act, ei, n)
        dst = torch.where(act, ej, n)
        while True:
            li, lj = lab.gather(1, src), lab.gather(1, dst)
            lo = torch.minimum(li, lj)
            new = lab.scatter_reduce(1, src, lo, "amin").scatter_reduce(1, dst, lo, "amin")
            new = new.scatter_reduce(1, li, lo, "amin").scatter_reduce(1, lj, lo, "amin")   # hook the roots
            while True:                                              # pointer jumping
                jumped = new.gather(1, new)
                if torch.equal(jumped, new):
                    break
                new = jumped
            if torch.equal(new, lab):
                break
            lab = new
        roots = (lab[:, :n] == idx[:n]) & m
        out[s:s + step][busy] = roots.sum(1)
    return out


def output_basis(W_O: Float[Tensor, "d_head d_model"]) -> Float[Tensor, "d_head d_head"]:
    """``R^T`` with ``W_O^T = Q R`` (reduced QR): ``(v R^T) . (u R^T) = (v W_O) . (u W_O)`` for any values v, u,
    so cosines of a head's output vectors are taken on ``d_head``-dimensional vectors."""
    return torch.linalg.qr(torch.as_tensor(W_O).to(_F64).T, mode="r").R.T
