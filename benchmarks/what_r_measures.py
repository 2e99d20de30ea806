"""Measure what r is made of (docs/quantities.md "What r is made of", "Group sizes") on the shipped model
(code-copy, induction) and on stories260K (induction, token ids), k = 2 (the paper's setting) and k = "auto".

    PYTHONPATH=. python benchmarks/what_r_measures.py [--out what_r.json] [--n-code 512] [--n-induction 256]

Prints one block per (model, task, k, min_contribution) and writes every number as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

import selfrepair
from selfrepair import tasks
from selfrepair.analysis.stats import spearman_interval

STORIES = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "stories260K.bin"


def measure(model, task, *, k, min_contribution, label):
    t0 = time.perf_counter()
    res = selfrepair.analyze_self_repair(model, task, k=k, min_contribution=min_contribution, progress=False)
    secs = time.perf_counter() - t0
    g = res.groups
    sw = res.sweep([0.1]).iloc[0]
    r = g["interaction"].to_numpy(float)
    flagged = g[np.isfinite(r) & (r > 0.1)]
    rho, lo, hi = spearman_interval(r, g["mass_interaction"].to_numpy(float), g["prompt"].to_numpy(), seed=0)
    gs = res.group_sizes()
    hs = res.summary()
    hs = hs[hs["n_defined"] > 0]
    out = dict(label=label, k=k, min_contribution=min_contribution, seconds=round(secs, 1), groups=len(g),
               defined=int(sw["n_defined"]),
               r_rule=dict(fraction=sw["fraction"], lo=sw["ci_low"], hi=sw["ci_high"], n_eff=sw["n_eff"]),
               permutation=dict(fraction=sw["fraction_permutation"], lo=sw["perm_ci_low"], hi=sw["perm_ci_high"],
                                n_tested=int(sw["n_tested"]), n_flagged=int(sw["n_permutation"])),
               median_p=float(g["permutation_p"].median()),
               flagged_medians={c: float(flagged[c].median()) for c in
                                ("interaction", "mass_interaction", "excess_interaction", "concealment_share",
                                 "c_ratio", "value_similarity_out")},
               spearman_r_mass=dict(rho=rho, lo=lo, hi=hi),
               spearman_r_concealment=float(g[["interaction", "concealment_share"]].corr("spearman").iloc[0, 1]),
               per_head=[dict(head=f"L{int(x.layer)}H{int(x.head)}", n=int(x.n_defined),
                              r_rule=[x.frac_self_repair, x.ci_low, x.ci_high],
                              permutation=[x.frac_permutation, x.perm_ci_low, x.perm_ci_high])
                         for x in hs.itertuples()],
               group_sizes={f"L{int(l)}H{int(h)}": {q: {int(v): int(c) for v, c in zip(d2["value"], d2["count"])}
                                                     for q, d2 in d.groupby("quantity")}
                            for (l, h), d in gs.groupby(["layer", "head"])},
               by_group_size=res.by_group_size(per_head=False).to_dict("records"))
    return out


def show(o):
    rr, pp, fm, sm = o["r_rule"], o["permutation"], o["flagged_medians"], o["spearman_r_mass"]
    print(f"== {o['label']} k={o['k']} min_contribution={o['min_contribution']}: {o['groups']} groups "
          f"({o['defined']} defined), {o['seconds']} s")
    print(f"  r > 0.1: {rr['fraction']:.1%} [{rr['lo']:.1%}, {rr['hi']:.1%}] (n_eff {rr['n_eff']:.0f}); permutation "
          f"test (BH 0.05): {pp['fraction']:.1%} [{pp['lo']:.1%}, {pp['hi']:.1%}] ({pp['n_flagged']}/{pp['n_tested']});"
          f" median p {o['median_p']:.2f}")
    print("  flagged medians: " + ", ".join(f"{k} {v:.3g}" for k, v in fm.items()))
    print(f"  Spearman(r, mass_interaction) {sm['rho']:.3f} [{sm['lo']:.3f}, {sm['hi']:.3f}]; "
          f"Spearman(r, concealment_share) {o['spearman_r_concealment']:.3f}")
    for h in o["per_head"]:
        print(f"  {h['head']}: n={h['n']} r-rule {h['r_rule'][0]:.0%} [{h['r_rule'][1]:.0%}, {h['r_rule'][2]:.0%}]"
              f" perm {h['permutation'][0]:.0%} [{h['permutation'][1]:.0%}, {h['permutation'][2]:.0%}]")
    if o["k"] == "auto":
        for h, d in o["group_sizes"].items():
            print(f"  {h}: n_contributing {d.get('n_contributing')}, n_clusters {d.get('n_clusters')}")
        for b in o["by_group_size"]:
            print(f"  size {b['group_size']}: n={b['n_groups']} median r {b['median_interaction']:.3g}, mass "
                  f"{b['median_mass_interaction']:.3g}, excess {b['median_excess_interaction']:.3g}, concealment_share "
                  f"{b['median_concealment_share']:.3g}, r>0.1 {b['frac_self_repair']:.0%}")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="what_r.json")
    ap.add_argument("--n-code", type=int, default=512)
    ap.add_argument("--n-induction", type=int, default=256)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    results = []
    m = selfrepair.load_model(device="cpu")
    cases = [("default / code-copy", m, tasks.load("code-copy", m, n=args.n_code, seed=0)),
             ("default / induction", m, tasks.load("induction", m, n=args.n_induction, seed=0))]
    if STORIES.is_file():
        s = selfrepair.load_model(STORIES, device="cpu")
        cases.append(("stories260K / induction", s, tasks.load("induction", s, n=args.n_induction, seed=0)))
    for label, model, task in cases:
        mins = (1.0, 0.1) if "stories" in label else (1.0,)
        for mc in mins:
            for k in (2, "auto"):
                o = measure(model, task, k=k, min_contribution=mc, label=label)
                show(o)
                results.append(o)
    Path(args.out).write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
