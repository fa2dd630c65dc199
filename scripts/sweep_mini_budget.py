"""Mini-Unlearning's curvature budget on held-out seeds (issue 12's cost target): d/d0 and cost
relative to retraining per (curvature_samples m, lanczos_steps k), per setting and forget ratio.

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/sweep_mini_budget.py [--seeds 100 101 102]
        [--settings history-logreg history-mlp] [--samples 128 256 512 1024] [--steps 5 8 10] [--budgets 0.25 0.3 [--auto-steps]] [--draws 2]

Every seed trains once (the harness's setting, unlearn_ext/evaluate/settings.py), records Mini's
anchors once, and retrains once per ratio (the harness's forget sets, harness.forget_ids); each
(m, k) is then one MiniUnlearner request on that record. --budgets adds rows of MiniUnlearner's
default (curvature_samples="auto") at each --budgets value. Prints, per setting, a table of mean d/d0 (max over seeds),
mean cost and fallbacks per (m, k) and ratio. Use held-out seeds only: the table's seeds are 0-2.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import time
from collections import defaultdict

import torch

import unlearn_ext as ue
from unlearn_ext.evaluate import settings
from unlearn_ext.evaluate.harness import forget_ids
from unlearn_ext.mini.vectors import FlatModel

RATIOS = (0.01, 0.05, 0.10, 0.20, 0.30)


def sweep_seed(setting: str, seed: int, configs, ratios, draws: int = 1) -> list[dict]:
    """One record per (m, k, ratio, subsample draw) for one training seed of `setting`; draw j
    uses MiniUnlearner(seed=seed + 1000 j) (j = 0 is what the harness runs)."""
    data, init, config = settings.get(setting).training(seed)
    original = ue.train_sgd(copy.deepcopy(init), data, config)
    store = ue.mini_store(original, codec="fp32")
    ue.train_recording_anchors(copy.deepcopy(init), data, config, store)
    w_star = FlatModel(original, data).flat().double()
    rows = []
    for ratio in ratios:
        forget = forget_ids(data, ratio, seed)
        w_retrain = FlatModel(ue.retrain(init, data, config, forget), data).flat().double()
        d0 = float((w_star - w_retrain).norm())
        for (m, k), draw in itertools.product(configs, range(draws)):
            model = copy.deepcopy(original)
            kw = dict(curvature_samples=m) if isinstance(m, int) else dict(curvature_budget=float(m.split()[1]))
            report = ue.MiniUnlearner(model, data, store, lanczos_steps=k, seed=seed + 1000 * draw, **kw).unlearn(forget)
            k_used = report.details.get("lanczos_steps")
            w = FlatModel(model, data).flat().double()
            rows.append(dict(setting=setting, seed=seed, ratio=ratio, m=m, k=k, status=report.status,
                             m_used=report.details.get("curvature_samples"), k_used=k_used,
                             d=float((w - w_retrain).norm()) / d0, cost=report.cost_vs_retrain))
    return rows


def table(rows: list[dict], ratios) -> str:
    groups = defaultdict(list)
    for r in rows:
        groups[(r["m"], r["k"], r["ratio"])].append(r)
    configs = sorted({(r["m"], r["k"]) for r in rows}, key=lambda c: (isinstance(c[0], str), str(c[0]).zfill(5), str(c[1]).zfill(4)))
    head = "| m | k | " + " | ".join(f"{q:.0%} d/d0 (max) / cost" for q in ratios) + " | mean d/d0 | max cost | fallbacks |"
    out = [head, "|" + "---|" * (len(ratios) + 5)]
    for m, k in configs:
        cells, ds, costs, falls = [], [], [], 0
        for q in ratios:
            g = groups[(m, k, q)]
            d = sum(r["d"] for r in g) / len(g)
            c = sum(r["cost"] for r in g) / len(g)
            falls += sum(r["status"] != "unlearned" for r in g)
            ds.append(d)
            costs.append(c)
            cells.append(f"{d:.2f} ({max(r['d'] for r in g):.2f}) / {c:.2f}")
        label = m if isinstance(m, int) else f"{m} (m " + "/".join(str(groups[(m, k, q)][0]["m_used"]) for q in ratios) + ")"
        if k == "auto":
            k = "auto (" + "/".join(str(groups[(m, k, q)][0]["k_used"]) for q in ratios) + ")"
        out.append(f"| {label} | {k} | " + " | ".join(cells) + f" | {sum(ds) / len(ds):.3f} | {max(costs):.2f} | {falls} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=["history-logreg", "history-mlp"], choices=list(settings.SETTINGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[100, 101, 102])
    ap.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    ap.add_argument("--samples", nargs="*", type=int, default=[128, 256, 512, 1024])
    ap.add_argument("--steps", nargs="+", type=int, default=[5, 8, 10])
    ap.add_argument("--auto-steps", action="store_true", help="with --budgets: also rows with lanczos_steps='auto'")
    ap.add_argument("--draws", type=int, default=1, help="curvature subsample draws per request (averaged)")
    ap.add_argument("--budgets", nargs="*", type=float, default=[],
                    help="add rows of MiniUnlearner's default m='auto' with these curvature_budget values (k from --steps)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if any(s in (0, 1, 2) for s in args.seeds):
        print("warning: seeds 0-2 are the reported table's; choose hyperparameters on others")
    steps = args.steps + (["auto"] if args.auto_steps else [])
    configs = [(m, k) for m in args.samples for k in args.steps] + [(f"auto {b:g}", k) for b in args.budgets for k in steps]
    began = time.perf_counter()
    for setting in args.settings:
        rows = []
        for seed in args.seeds:
            rows += sweep_seed(setting, seed, configs, args.ratios, args.draws)
        print(f"\n{setting}, seeds {args.seeds}, {args.draws} subsample draw(s) each: mean d/d0 (max), "
              "mean cost vs retraining\n", flush=True)
        print(table(rows, args.ratios), flush=True)
    print(f"\n{time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
