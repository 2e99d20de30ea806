"""Closed-form row arithmetic: the local effects of ablating keys of one attention row (docs/quantities.md,
"Local effects", "Individual versus joint", "Gradient estimates").

``row_effects`` takes R rows at once (scores, mask, ``c = g . v``, the group S) and returns, in float64,
every subset's local effect, Shapley values, value-ablation effects, gradient estimates and the z edits
the global engine replays; ``local_effects`` does the same for hand-built rows; ``select_keys`` picks S,
``interaction_ratio`` turns effects into r.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from .._deprecation import renamed_keyword
from .._typing import Bool, Float, Int, Tensor

__all__ = ["row_effects", "local_effects", "select_keys", "interaction_ratio", "subset_bits", "shapley_matrix",
           "check_mode", "check_temperature", "NOISE_FLOOR_FACTOR", "ABLATIONS", "VALUE_ABLATIONS", "SELECT_MODES", "MAX_K"]


ABLATIONS = ("mean", "knockout")
VALUE_ABLATIONS = ("zero", "mean")
SELECT_MODES = ("positive", "abs")
MAX_K = 8


def subset_bits(k: int, device=None) -> Bool[Tensor, "subsets k"]:
    """Row ``s`` of the result is subset ``s`` as a bitmask: key ``n`` is in it iff bit ``n`` of ``s`` is set."""
    s = torch.arange(2 ** k, device=device)
    return ((s[:, None] >> torch.arange(k, device=device)) & 1).bool()


def shapley_matrix(k: int, dtype=torch.float64, device=None) -> Float[Tensor, "subsets k"]:
    """``phi = E_subsets @ M``: ``phi_n = sum_{S not n} |S|!(k-|S|-1)!/k! (E(S+n) - E(S))``."""
    bits = subset_bits(k, device)
    size = bits.sum(1)
    wt = torch.tensor([math.factorial(s) * math.factorial(k - s - 1) / math.factorial(k) for s in range(k)],
                      dtype=dtype, device=device)
    # subset T containing n contributes +w(|T|-1) E(T); subset S without n contributes -w(|S|) E(S)
    plus = torch.where(bits, wt[(size - 1).clamp_min(0)][:, None], torch.zeros((), dtype=dtype, device=device))
    minus = torch.where(~bits, wt[size.clamp_max(k - 1)][:, None], torch.zeros((), dtype=dtype, device=device))
    return plus - minus


def row_effects(
    a: Float[Tensor, "R n"],
    mask: Bool[Tensor, "R n"],
    c: Float[Tensor, "R n"],
    keys: Int[Tensor, "R k"],
    mean_mask: Bool[Tensor, "R n"],
    *,
    score_ablation: Optional[str] = None,
    value_ablation: str,
    temperature: float,
    v_keys: Optional[Float[Tensor, "R k d"]] = None,
    v_rest: Optional[Float[Tensor, "R d"]] = None,
    **deprecated,
) -> Dict[str, Tensor]:
    """Local effects of every subset of ``keys`` for R rows, in closed form (float64 in, float64 out).

    ``a`` scores (any value at masked keys), ``mask`` unmasked keys, ``c = g . v``,
    ``mean_mask`` the keys entering the score/value means. The softmax is exact and
    computed in log space: for an ablated set S with new log-normaliser ``lse'``,
    every kept key changes by ``p_j - p'_j = rho p_j`` with ``rho = -expm1(lse - lse')``,
    the ablated keys by ``p_j - exp(a'_j - lse')``.
    With ``v_keys`` and ``v_rest`` (the softmax-over-the-rest weighted value) also the
    z edits ``z' - z`` of the individual and joint ablations (for global effects).
    ``score_ablation`` (required): ``"mean"`` or ``"knockout"`` (the old keyword ``ablation=`` still works, with a
    DeprecationWarning).
    """
    score_ablation = renamed_keyword(deprecated, "ablation", "score_ablation", score_ablation, "row_effects",
                                     stacklevel=3)
    if score_ablation is None:
        raise TypeError("row_effects() missing required keyword argument 'score_ablation' ('mean' or 'knockout')")
    R, n = a.shape
    k = keys.shape[1]
    dt, dev = a.dtype, a.device
    ninf = torch.tensor(float("-inf"), dtype=dt, device=dev)
    zero = torch.zeros((), dtype=dt, device=dev)
    # every [R, n] pass counts (this runs over every row of every head): each row-wide quantity below is one
    # masked copy, one exp or one dot product, and the clean softmax is never formed over the whole row
    am = torch.where(mask, a, ninf)
    c0 = torch.where(mask, c, zero)                                       # masked keys carry no weight
    aK = am.gather(1, keys)                                               # [R, k]
    cK = c.gather(1, keys)
    # the rest (unmasked keys outside S): its log-normaliser and softmax-weighted c from one exp
    a_rest = am.scatter(1, keys, ninf.expand(R, k))
    top = a_rest.amax(1, keepdim=True) if n else a_rest.new_full((R, 1), float("-inf"))
    has_rest = torch.isfinite(top[:, 0])
    e_rest = torch.exp(a_rest - torch.where(has_rest[:, None], top, zero))   # exp(a_j - max over the rest), 0 off it
    sum_rest = e_rest.sum(1)
    L_rest = torch.where(has_rest, top[:, 0] + torch.log(sum_rest), ninf)    # [R], -inf without a rest
    cbar_rest = torch.where(has_rest, torch.einsum("rn,rn->r", e_rest, c0) / sum_rest, zero)
    # the same over the rest's keys that enter the mean (concealment's c_rest; NaN without such a key)
    e_mm = e_rest * mean_mask
    del e_rest
    sum_mm = e_mm.sum(1)
    c_rest = torch.where(sum_mm > 0, torch.einsum("rn,rn->r", e_mm, c0) / sum_mm,
                         torch.tensor(float("nan"), dtype=dt, device=dev))
    del e_mm
    cnt = mean_mask.sum(1).to(dt)
    abar = torch.where(mean_mask, a, zero).sum(1) / cnt                   # mean score
    cbar = torch.where(mean_mask, c, zero).sum(1) / cnt                   # mean of g . v

    bits = subset_bits(k, dev)                                           # [B, k]
    B = bits.shape[0]
    nS = bits.sum(1).to(dt)                                               # [B]
    kept = torch.where(bits[None], ninf, aK[:, None, :])                  # [R, B, k]
    if score_ablation == "mean":
        abl = torch.where(nS[None] > 0, abar[:, None] + torch.log(nS.clamp_min(1))[None], ninf)  # [R, B]
    else:
        abl = ninf.expand(R, B)
    terms = torch.cat([L_rest[:, None, None].expand(R, B, 1), kept, abl[..., None]], 2)
    lse2 = torch.logsumexp(terms, 2)                                      # [R, B]
    lse = lse2[:, :1]                                                     # S = {} : the original normaliser
    pK = torch.exp(aK - lse)                                              # [R, k]
    wK = pK * cK
    x = lse - lse2                                                        # rho = -expm1(x)
    pos = x > 0
    # log|rho|: x > 0: log(e^x - 1) = x + log(1 - e^-x); x < 0: log(1 - e^x); x = 0: -inf (no change)
    log_abs_rho = torch.log(-torch.expm1(-x.abs())) + x.clamp_min(0)
    sign = torch.where(pos, -torch.ones((), dtype=dt, device=dev), torch.ones((), dtype=dt, device=dev))
    # kept keys: sum_j (p_j - p'_j) c_j = sign * sum_j exp(a_j - lse + log|rho|) c_j
    t_rest = torch.where(has_rest[:, None], torch.exp(L_rest[:, None] - lse + log_abs_rho) * cbar_rest[:, None],
                         torch.zeros((), dtype=dt, device=dev))
    fac_K = torch.exp(aK[:, None, :] - lse[:, :, None] + log_abs_rho[..., None])       # [R, B, k] = |p_j - p'_j|
    fac_K = torch.where(bits[None], torch.zeros((), dtype=dt, device=dev), fac_K)
    E = sign * (t_rest + (fac_K * cK[:, None, :]).sum(2))
    bitsf = bits.to(dt)
    if score_ablation == "mean":
        p_new = torch.exp(abar[:, None] - lse2)                            # new p of each ablated key
        dpK = torch.where(bits[None], pK[:, None, :] - p_new[..., None], torch.zeros((), dtype=dt, device=dev))
    else:
        p_new = torch.zeros_like(lse2)
        dpK = pK[:, None, :] * bitsf[None]
    E = E + (dpK * cK[:, None, :]).sum(2)                                 # [R, B]
    E[:, 0] = 0.0

    out: Dict[str, Tensor] = {}
    single = 2 ** torch.arange(k, device=dev)
    which = torch.cat([single, torch.tensor([B - 1], device=dev)])       # the individual ablations, then S
    out["subset_effects"] = E
    # p_i - p'_i at the keys of S (in the order of keys) for the individual ablations and the joint one:
    # kept keys sign * |p_i - p'_i|, ablated keys p_i - p'_i (dpK)
    out["key_changes"] = sign[:, which, None] * fac_K[:, which] + dpK[:, which]   # [R, k+1, k]
    out["c_rest"] = c_rest
    out["effects"] = E[:, single]
    out["effect_joint"] = E[:, B - 1]
    out["shapley"] = E @ shapley_matrix(k, dt, dev)
    out["contributions"] = wK
    out["p"] = pK
    out["scores"] = aK
    out["mass"] = pK.sum(1)
    out["n_keys"] = mask.sum(1)
    # g . z_i = sum_j p_j c_j: the rest's share exp(L_rest - lse) times its softmax-weighted c, plus S's
    zg = torch.where(has_rest, torch.exp(L_rest - lse[:, 0]) * cbar_rest, zero) + wK.sum(1)
    out["head_contribution"] = zg

    # gradient estimates of the score ablation (docs/quantities.md, "Gradient estimates"); NaN under knockout
    if score_ablation == "mean":
        da = abar[:, None] - aK                                           # a'_j - a_j
        dmda = pK * (cK - zg[:, None])
        # the softmax at temperature T: exp((a_j - lse) / T) <= 1 never overflows, its largest term is at least
        # n^(-1/T), so the normaliser is formed without a max pass
        s_un = torch.exp((am - lse) * (1.0 / temperature))
        s_den = s_un.sum(1)
        sc = torch.einsum("rn,rn->r", s_un, c0) / s_den
        d_tsg = (s_un.gather(1, keys) / s_den[:, None]) * (cK - sc[:, None])
        out["grad_estimates"] = -dmda * da
        out["tsg_estimates"] = -d_tsg * da
    else:
        nan = torch.full((R, k), float("nan"), dtype=dt, device=dev)
        out["grad_estimates"], out["tsg_estimates"] = nan, nan.clone()
    out["grad_estimate"] = out["grad_estimates"].sum(1)
    out["tsg_estimate"] = out["tsg_estimates"].sum(1)

    # value ablations: E_v(S) = sum_{j in S} p_j (v_j - v'_j) . g, no renormalisation
    c_prime = torch.zeros_like(cbar) if value_ablation == "zero" else cbar
    out["value_effects"] = pK * (cK - c_prime[:, None])
    # the joint one from the ablated head output: g . z - g . z'  with z' = z - sum_S p_j (v_j - v')
    zg_v = zg - (wK.sum(1) - pK.sum(1) * c_prime)
    out["value_effect_joint"] = zg - zg_v
    out["value_interaction"] = out["value_effect_joint"] - out["value_effects"].sum(1)

    if v_keys is not None:
        vn = v_keys / v_keys.norm(dim=2, keepdim=True)
        cos = vn @ vn.transpose(1, 2)
        iu = torch.triu_indices(k, k, 1, device=dev)
        out["value_similarity"] = cos[:, iu[0], iu[1]].mean(1)
    if v_keys is not None and v_rest is not None:
        # z' - z = -(sum_j (p_j - p'_j) v_j) for the individual and joint ablations
        sg = sign[:, which]                                               # [R, k+1]
        rest_fac = torch.where(has_rest[:, None], torch.exp(L_rest[:, None] - lse + log_abs_rho[:, which]),
                               torch.zeros((), dtype=dt, device=dev))     # [R, k+1]
        d_kept = sg[..., None] * (rest_fac[..., None] * v_rest[:, None, :]
                                  + torch.einsum("rsk,rkd->rsd", fac_K[:, which], v_keys))
        d_abl = torch.einsum("rsk,rkd->rsd", dpK[:, which], v_keys)
        out["z_deltas"] = -(d_kept + d_abl)                               # [R, k+1, d]
    return out


def local_effects(
    scores: Float[Tensor, "*R n"],
    values: Float[Tensor, "*R n d_head"],
    grad: Float[Tensor, "*R d_head"],
    mask: Bool[Tensor, "*R n"],
    keys: Int[Tensor, "*R k"],
    *,
    score_ablation: str = "mean",
    value_ablation: str = "zero",
    exclude_bos: bool = False,
    temperature: float = 2.0,
    **deprecated,
) -> Dict[str, Tensor]:
    """Closed-form local effects for hand-built rows (one head, one query each; one row without the R axis), float64.

    ``scores`` a (masked entries may hold anything), ``values`` v_j, ``grad`` g = dm/dz_i,
    ``mask`` unmasked keys, ``keys`` the group S per row (its order is kept). Returns
    tensors keyed like the columns of ``SelfRepairResult.groups`` (``effects``,
    ``effect_joint``, ``shapley``, ``value_effects``, ``grad_estimate``, ...), plus
    ``subset_effects`` [R, 2^k] (subset ``s`` = the keys whose bit is set in ``s``), ``key_changes``
    [R, k+1, k] (``p_i - p'_i`` at the keys of S under each individual ablation, then the joint one),
    ``c_rest`` [R] (the p-weighted mean of c over the keys outside S that enter the mean) and
    ``z_deltas`` [R, k+1, d] (z' - z of the individual ablations, then the joint one). ``score_ablation``:
    ``"mean"`` or ``"knockout"`` (the old keyword ``ablation=`` still works, with a DeprecationWarning).
    """
    score_ablation = renamed_keyword(deprecated, "ablation", "score_ablation", score_ablation, "local_effects",
                                     default="mean", stacklevel=3)
    check_mode("score_ablation", score_ablation, ABLATIONS)
    check_mode("value_ablation", value_ablation, VALUE_ABLATIONS)
    temperature = check_temperature(temperature)
    dt = torch.float64
    a = torch.as_tensor(scores).to(dt)
    v = torch.as_tensor(values).to(dt)
    g = torch.as_tensor(grad).to(dt)
    mask = torch.as_tensor(mask).bool()
    keys = torch.as_tensor(keys).long()
    if a.ndim == 1:
        a, v, g, mask, keys = a[None], v[None], g[None], mask[None], keys[None]
    if not bool(mask.gather(1, keys).all()):
        raise ValueError("every key of a group must be unmasked.")
    if keys.shape[1] > 1 and bool((keys.sort(1).values.diff(dim=1) == 0).any()):
        raise ValueError("the keys of a group must be distinct.")
    mean_mask = mask.clone()
    if exclude_bos:
        mean_mask[:, 0] = False
    c = torch.einsum("rnd,rd->rn", v, g)
    vK = v.gather(1, keys[..., None].expand(-1, -1, v.shape[2]))
    ninf = torch.tensor(float("-inf"), dtype=dt)
    rest = mask.clone().scatter_(1, keys, False)
    s_rest = torch.softmax(torch.where(rest, a, ninf), 1).nan_to_num(0.0)
    v_rest = torch.einsum("rn,rnd->rd", s_rest, v)
    return row_effects(a, mask, c, keys, mean_mask, score_ablation=score_ablation, value_ablation=value_ablation,
                        temperature=temperature, v_keys=vK, v_rest=v_rest)


#: the global ratio's numerator ``G_S - sum_n G_n = sum_n m(ablated n) - m(ablated S) - (k - 1) m(clean)`` adds
#: 2k metrics of forward passes, each off by up to ``delta`` (the measured noise of one forward): an error of at
#: most ``2 k delta``. Requiring ``|G_S| >= 20 k delta`` bounds the ratio's error by 0.1, the default threshold.
NOISE_FLOOR_FACTOR = 20.0


def check_temperature(temperature) -> float:
    """The TSG temperature T as a float: a finite number > 0, else one ValueError (inf would give NaN
    estimates, 0 or a negative T no softmax)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating, np.integer)) \
            or not math.isfinite(float(temperature)) or not float(temperature) > 0:
        raise ValueError(f"temperature must be a finite number > 0 (the TSG temperature T); got {temperature!r}.")
    return float(temperature)


def check_mode(name: str, value, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(repr(v) for v in valid)}.")


def select_keys(
    w: Float[Tensor, "batch head qpos kpos"],
    keys_ok: Bool[Tensor, "batch qpos kpos"],
    row_ok: Bool[Tensor, "batch head qpos"],
    *,
    k: int,
    min_contribution: float,
    select: str = "positive",
) -> tuple:
    """Rows with at least k selectable keys of ``w_j > min_contribution`` (``|w_j|`` for ``"abs"``) and
    their groups S: the k keys of largest ``w_j`` (``|w_j|``), largest first, ties to the lower position.

    Returns ``(idx [R, 3] = (batch, head, query), keys [R, k])``.
    """
    check_mode("select mode", select, SELECT_MODES)
    key = w if select == "positive" else w.abs()
    key = key.masked_fill(~keys_ok[:, None], float("-inf"))
    ok = ((key > min_contribution).sum(-1) >= k) & row_ok
    idx = ok.nonzero()
    if idx.numel() == 0:
        return idx, torch.zeros(0, k, dtype=torch.long, device=w.device)
    bi, hi, qi = idx.unbind(1)
    kr = key[bi, hi, qi]                                                   # [R, n]
    # the k largest, ties to the lower position (what a stable sort of -key gives), without sorting whole rows.
    # topk's set is that set wherever exactly k keys reach the k-th largest value t; rows where more keys
    # equal t (a tie across the boundary) take every key above t, then the lowest positions among those at t
    top_v, top_i = kr.topk(k, dim=1)
    t = top_v[:, k - 1:k]
    pos = top_i.sort(dim=1).values                                         # ascending positions, k per row
    tied = ((kr >= t).sum(1) > k).nonzero().squeeze(1)
    if tied.numel():
        kt, tt = kr[tied], t[tied]
        above = kt > tt
        at_t = kt == tt
        chosen = above | (at_t & (at_t.cumsum(1) <= k - above.sum(1, keepdim=True)))
        pos[tied] = chosen.nonzero()[:, 1].reshape(len(kt), k)
    order = torch.sort(-kr.gather(1, pos), dim=1, stable=True).indices    # largest first, ties: lower position
    return idx, pos.gather(1, order)


def interaction_ratio(
    effects: Float[Tensor, "R k"],
    effect_joint: Float[Tensor, "R"],
    contributions: Float[Tensor, "R k"],
    min_effect: float = 1e-4,
    noise: Optional[Float[Tensor, "R"]] = None,
) -> tuple:
    """The ratio (docs/quantities.md, "Individual versus joint") ``r = (E_S - sum_n E_n) / E_S`` (NaN when ``|E_S| < max(min_effect, 0.01 sum |w_j|)``) and
    ``interaction_sym = (E_S - sum_n E_n) / (|E_S| + sum_n |E_n|)`` (NaN only for a zero denominator).

    ``noise``: per row, the measured rounding noise ``delta`` of one forward pass's metric (global effects,
    docs/quantities.md, "Global effects"); the floor then also requires ``|E_S| >= NOISE_FLOOR_FACTOR * k * delta``."""
    esum = effects.sum(1)
    floor = torch.clamp(0.01 * contributions.abs().sum(1), min=min_effect)
    if noise is not None:
        floor = torch.maximum(floor, (NOISE_FLOOR_FACTOR * effects.shape[1]) * noise.to(floor.dtype).abs())
    defined = effect_joint.abs() >= floor
    nan = torch.full_like(effect_joint, float("nan"))
    r = torch.where(defined, (effect_joint - esum) / effect_joint, nan)
    den = effect_joint.abs() + effects.abs().sum(1)
    r_sym = torch.where(den > 0, (effect_joint - esum) / den, nan)
    return r, r_sym
