"""The perturbation evaluation table: Top-K / Random-k perturbation (reset, dampen, normalized ascent,
masked and distillation repair, the adaptive K, the grad_ratio score) against retraining, retraining from other seeds
(the noise floor), fine-tuning and the do-nothing row, on digits (tanh MLP 64) and the memorizing setting (docs/design.md
section 8). A thin wrapper of unlearn_ext.evaluate.evaluate: the methods are registry entries
(unlearn_ext/evaluate/methods.py), the UD column is evaluate/ud.py. One JSON per (setting, seed),
so seeds can run in parallel processes; --table prints the markdown of finished JSON files.

  PYTHONPATH=. python scripts/eval_perturb.py --setting memorizing --seed 0 --json out/mem-0.json
  PYTHONPATH=. python scripts/eval_perturb.py --table out/*.json

The memorizing setting was chosen on seeds 100-102 (never the table's): 300 digits samples, 20%
label noise, a 512-wide tanh MLP, no weight decay, 300 epochs; its precondition (original MIA >=
retrain MIA + 0.2) is checked on every reported run. The methods' settings are docs/design.md §7's
defaults, fixed before any table seed ran (methods.PERTURB_SETTINGS); --calibrate searches K, repair
epochs and repair (labels / distillation) for Top-K reset on held-out seeds 100-102, and --k /
--repair-epochs run the table with the chosen values:

  PYTHONPATH=. python scripts/eval_perturb.py --setting memorizing --calibrate --grid "0.3,0.5;3,10;all,distill"
  PYTHONPATH=. python scripts/eval_perturb.py --setting memorizing --seed 0 --k 0.3 --repair-epochs 3 --json m.json

(--k does not reach the -adaptive rows: their K is chosen per request, methods.ADAPTIVE_K_CAP caps it;
`--calibrate --adaptive` runs the grid on them, the grid's K being the cap. Nor the -ratio rows:
methods.RATIO_SETTINGS, chosen with `--calibrate --score grad_ratio --perturbations reset,dampen`.)

The noise floor: every (seed, ratio) retrains from NOISE_FLOOR = 5 other seeds (other initial
weights and batch order; the harness's noise floor) and each table puts, beside every method's gaps, in
how many runs its |test gap| and per-run MIA gap are at or below that run's floor (the largest gap
of those retrains to the reference retrain), with the floor itself per ratio.

The settings are the harness's named ones (digits = perturb-digits, memorizing = memorizing in
unlearn_ext/evaluate/settings.py; label flips drawn per training seed), so with the default K and
repair epochs a seed's records equal

  unlearn-ext eval --setting memorizing --methods retrain-other,finetune,topk,... --seeds 0 --noise-floor 5

(wall time and memory aside; tests/test_eval_scripts.py checks it on a tiny configuration).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from unlearn_ext.evaluate import harness, methods, settings

SETTINGS = {"digits": "perturb-digits", "memorizing": "memorizing"}  # script name -> harness setting
METHODS = ["retrain-other", "finetune"] + [f"{family}{suffix}" for family in ("topk", "randomk")
                                           for suffix in ("", "-dampen", "-ascent", "-masked", "-distill", "-adaptive")]
# grad_ratio Top-K (dampen, K and repair chosen on held-out seeds) with its Random-k and fine-tuning controls
METHODS += ["topk-ratio", "randomk-ratio", "finetune-ratio"]
NOISE_FLOOR = 5  # retrains from other seeds per (seed, ratio): docs/design.md §8 asks for >= 5


def _profile(setting: str, overrides: dict) -> dict:
    """The perturbation methods' settings this script's setting uses (methods.PERTURB_SETTINGS),
    with the command line's overrides."""
    wide = settings.get(SETTINGS[setting]).model == "mlp-wide"
    return {**methods.PERTURB_SETTINGS["memorizing" if wide else "generalizing"], **overrides}


def run(setting: str, seed: int, ratios, noise_floor: int, ud: bool, names=METHODS, epochs=None,
        overrides: dict | None = None) -> dict:
    """overrides: k= / repair_epochs= for the perturbation family (methods.perturb_family)."""
    began = time.perf_counter()
    family = methods.perturb_family(**(overrides or {}))
    chosen = [family.get(n, n) if overrides else n for n in names]
    records = settings.evaluate_setting(SETTINGS[setting], methods=chosen, ratios=list(ratios), seeds=[seed],
                                        epochs=epochs, noise_floor_seeds=noise_floor, ud=ud,
                                        progress=lambda what: print(f"[{setting}] {what}", flush=True))
    for r in records:
        r["setting"] = setting
    profile = _profile(setting, overrides or {})
    return {"setting": setting, "seed": seed, "perturb_settings": profile, "seconds": time.perf_counter() - began, "records": records}


COLUMNS = ("test_acc", "retain_acc", "forget_acc", "fr", "mrr", "mia_auc", "mia_gap", "ud", "cost_vs_retrain")


def _mean(values):
    vals = [v for v in values if v is not None]
    return statistics.mean(vals) if vals else None


def _fmt(v, spec=".3f"):
    return "n/a" if v is None else format(v, spec)


def _test_gap(r: dict, gold: dict) -> float:
    """|test accuracy - that run's reference retrain's|."""
    return abs(gold["test_acc"] - r["test_acc"])


def _within(rows: list[dict], gold_of, field: str, gap) -> str:
    """'a/n': in how many runs the method's gap is at or below that run's noise floor (the largest gap
    of a retrain from another seed to the reference retrain); n/a without floor retrains."""
    runs = [r for r in rows if gold_of(r).get(field) is not None]
    if not runs:
        return "n/a"
    return f"{sum(gap(r) <= gold_of(r)[field] + 1e-12 for r in runs)}/{len(runs)}"


def _floor_line(golds: list[dict]) -> str:
    """The noise floor of these runs: per run the largest |gap| of a retrain from another seed to the
    reference retrain (test accuracy, MIA AUC); mean and max over runs, and the mean gap."""
    runs = [g for g in golds if g.get("retrain_floor_test_gaps")]
    if not runs:
        spread = [g["retrain_spread_test_acc"] for g in golds if g.get("retrain_spread_test_acc") is not None]
        return ("Noise floor: not measured in these runs" if not spread else
                f"Noise floor (older runs: spread only): test {_fmt(_mean(spread))}")
    count = len(runs[0]["retrain_floor_test_gaps"])
    return (f"Noise floor ({count} retrains from other seeds vs the reference retrain, per run the largest gap; "
            f"mean; max over {len(runs)} runs): |test gap| {_fmt(_mean([g['retrain_floor_test_gap'] for g in runs]))}; "
            f"{_fmt(max(g['retrain_floor_test_gap'] for g in runs))}, MIA gap "
            f"{_fmt(_mean([g['retrain_floor_mia_gap'] for g in runs]))}; "
            f"{_fmt(max(g['retrain_floor_mia_gap'] for g in runs))} (mean over all retrains: |test gap| "
            f"{_fmt(_mean([x for g in runs for x in g['retrain_floor_test_gaps']]))}, MIA gap "
            f"{_fmt(_mean([x for g in runs for x in g['retrain_floor_mia_gaps']]))})")


def table(payloads: list[dict]) -> str:
    """Markdown: per (setting, ratio) one row per method, means over seeds (max of the per-run MIA
    gap beside its mean), the noise floor and in how many runs each method's gaps are within it, the
    precondition per seed, and SPD-GAN's checks."""
    records = [r for p in payloads for r in p["records"]]
    out = []
    for setting in dict.fromkeys(r["setting"] for r in records):
        for ratio in sorted({r["ratio"] for r in records if r["setting"] == setting}):
            rows = [r for r in records if r["setting"] == setting and r["ratio"] == ratio]
            seeds = sorted({r["seed"] for r in rows})
            gold = {r["seed"]: r for r in rows if r["method"] == "retrain"}
            gold_of = lambda r: gold[r["seed"]]  # noqa: E731
            out += [f"\n#### {setting}, forget ratio {ratio:g} (|F| = {rows[0]['forget_size']}, seeds "
                    f"{', '.join(map(str, seeds))})\n",
                    "| method | test | retain | forget | FR | MRR | MIA | per-run MIA gap (mean; max) | abs test gap | "
                    "runs within floor (test; MIA) | UD | cost |",
                    "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for method in dict.fromkeys(r["method"] for r in rows):
                mine = [r for r in rows if r["method"] == method]
                m = {k: _mean([r[k] for r in mine]) for k in COLUMNS}
                gaps = [r["mia_gap"] for r in mine]
                within = (f"{_within(mine, gold_of, 'retrain_floor_test_gap', lambda r: _test_gap(r, gold_of(r)))}; "
                          f"{_within(mine, gold_of, 'retrain_floor_mia_gap', lambda r: r['mia_gap'])}")
                out.append(f"| {method} | {_fmt(m['test_acc'])} | {_fmt(m['retain_acc'])} | "
                           f"{_fmt(m['forget_acc'])} | {_fmt(m['fr'], '.2f')} | {_fmt(m['mrr'])} | "
                           f"{_fmt(m['mia_auc'])} | {_fmt(m['mia_gap'])}; {_fmt(max(gaps))} | "
                           f"{_fmt(_mean([_test_gap(r, gold_of(r)) for r in mine]))} | {within} | "
                           f"{_fmt(m['ud'], '.2f')} | {_fmt(m['cost_vs_retrain'])} |")
            out.append("\n" + _floor_line(list(gold.values())))
            by_seed = {s: {r["method"]: r for r in rows if r["seed"] == s} for s in seeds}
            pre = [by_seed[s]["original"]["mia_auc"] - by_seed[s]["retrain"]["mia_auc"] for s in seeds]
            out.append(f"Original MIA - retrain MIA per seed: {', '.join(f'{g:.3f}' for g in pre)}")
            checks = [by_seed[s]["original"]["ud_checks"] for s in seeds if by_seed[s]["original"]["ud_checks"]]
            if checks:
                c = {k: _mean([x[k] for x in checks]) for k in checks[0]}
                out.append(f"SPD-GAN (means over seeds): held-out detector accuracy {c['detector_acc']:.3f}; "
                           f"accuracy on x~(F) before {c['before_acc']:.3f} vs retrain {c['retrain_acc']:.3f}; "
                           f"perturbed-test control: before {c['control_before_acc']:.3f} vs retrain "
                           f"{c['control_retrain_acc']:.3f} (retrain clean test {c['retrain_clean_test_acc']:.3f})")
            else:
                out.append(f"UD: {rows[0]['ud_note']}")
    return "\n".join(out)


def targets(payloads: list[dict], min_ratio: float = 0.05) -> str:
    """The perturbation targets' measures, means over every (seed, ratio >= min_ratio) run: test-accuracy gap
    to that run's retrain (retrain - method), per-run |MIA gap|, |forget - retrain forget|, MRR, cost,
    UD, and in how many runs the test and MIA gaps are within that run's noise floor."""
    records = [r for p in payloads for r in p["records"] if r["ratio"] >= min_ratio]
    out = []
    for setting in dict.fromkeys(r["setting"] for r in records):
        rows = [r for r in records if r["setting"] == setting]
        gold = {(r["seed"], r["ratio"]): r for r in rows if r["method"] == "retrain"}
        g = lambda r: gold[(r["seed"], r["ratio"])]  # noqa: E731
        out += [f"\n#### {setting}: means over seeds and ratios >= {min_ratio:g}\n",
                "| method | test gap (retrain - method) | abs test gap | per-run MIA gap (mean; max) | abs forget gap | "
                "MRR | runs within floor (test; MIA) | UD | cost |", "|---|---|---|---|---|---|---|---|---|"]
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == method]
            within = (f"{_within(mine, g, 'retrain_floor_test_gap', lambda r: _test_gap(r, g(r)))}; "
                      f"{_within(mine, g, 'retrain_floor_mia_gap', lambda r: r['mia_gap'])}")
            out.append(f"| {method} | {_fmt(_mean([g(r)['test_acc'] - r['test_acc'] for r in mine]), '+.3f')} | "
                       f"{_fmt(_mean([_test_gap(r, g(r)) for r in mine]))} | "
                       f"{_fmt(_mean([r['mia_gap'] for r in mine]))}; {_fmt(max(r['mia_gap'] for r in mine))} | "
                       f"{_fmt(_mean([abs(r['forget_acc'] - g(r)['forget_acc']) for r in mine]))} | "
                       f"{_fmt(_mean([r['mrr'] for r in mine]))} | {within} | "
                       f"{_fmt(_mean([r['ud'] for r in mine]), '.2f')} | {_fmt(_mean([r['cost_vs_retrain'] for r in mine]))} |")
        out.append("\n" + _floor_line(list(gold.values())))
    return "\n".join(out)


CALIBRATION_SEEDS = (100, 101, 102)  # never the table's seeds
GRID = [dict(k=k, repair_epochs=e, repair=rep) for k in (0.05, 0.1, 0.2) for e in (3, 10, 30)
        for rep in ("all", "distill")]


def calibrate(setting: str, ratios=(0.1, 0.2), grid=GRID, adaptive: bool = False, score: str = "grad_abs",
              ratio_floor: float | None = None) -> list[dict]:
    """Top-K on held-out seeds over GRID (reset unless a grid entry names its `perturbation`): per
    setting the per-run MIA gap, |forget - retrain|, test gap, MRR and cost (means over seeds and
    ratios). adaptive: Top-K with the adaptive K (perturb/adaptive.py; the grid's k is the ladder's
    cap) instead of a fixed K. score: the Top-K score (perturb/scores.py); ratio_floor: the ratio scores'
    floor (default perturb.scores.RATIO_FLOOR)."""
    import copy

    from unlearn_ext.data import retrain
    from unlearn_ext.perturb import AdaptiveTopKUnlearner, TopKUnlearner

    named = settings.get(SETTINGS[setting])
    results = {i: [] for i in range(len(grid))}
    for seed in CALIBRATION_SEEDS:
        ds = named.dataset(seed)
        run_ = harness.train_run(ds, named.model, seed, None, named.widths, named.sgd)
        for ratio in ratios:
            forget = harness.forget_ids(run_.data, ratio, seed)
            orig = harness.measure(run_.original, ds, run_.data, forget)
            gold = harness.measure(retrain(run_.initial, run_.data, run_.config, forget), ds, run_.data, forget)
            for i, kw in enumerate(grid):
                cls = AdaptiveTopKUnlearner if adaptive else TopKUnlearner
                u = cls(copy.deepcopy(run_.original), run_.data, run_.config, holdout=run_.holdout, seed=seed,
                        score=score, **({} if ratio_floor is None else {"ratio_floor": ratio_floor}),
                        **{"perturbation": "reset", **kw})
                rep = u.unlearn(forget)
                m = harness.measure(u.model, ds, run_.data, forget)
                results[i].append({"mia_gap": abs(m["mia_auc"] - gold["mia_auc"]),
                                   "forget_gap": abs(m["forget_acc"] - gold["forget_acc"]),
                                   "test_gap": gold["test_acc"] - m["test_acc"],
                                   "mrr": m["retain_acc"] / orig["retain_acc"], "cost": rep.cost_vs_retrain,
                                   "k_chosen": rep.details.get("k_chosen", kw["k"])})
            print(f"[calibrate {setting}] seed {seed} ratio {ratio:g} done", flush=True)
    out = []
    for i, kw in enumerate(grid):
        out.append({"score": score, **({} if ratio_floor is None else {"ratio_floor": ratio_floor}),
                    "perturbation": "reset", **kw,
                    **{k: statistics.mean(r[k] for r in results[i]) for k in results[i][0]},
                    "abs_test_gap": statistics.mean(abs(r["test_gap"]) for r in results[i])})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setting", choices=list(SETTINGS), default="digits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ratios", default="0.01,0.05,0.1,0.2")
    ap.add_argument("--noise-floor", type=int, default=NOISE_FLOOR,
                    help=f"retrains from other seeds per ratio (default {NOISE_FLOOR})")
    ap.add_argument("--no-ud", action="store_true", help="skip SPD-GAN's UD column")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--json", default=None, help="write the records here")
    ap.add_argument("--epochs", type=int, default=None, help="override the setting's epochs (quick runs)")
    ap.add_argument("--k", type=float, default=None, help="override K of the perturbation methods (this setting)")
    ap.add_argument("--repair-epochs", type=int, default=None, help="override their repair epochs")
    ap.add_argument("--calibrate", action="store_true", help="Top-K settings on held-out seeds 100-102")
    ap.add_argument("--adaptive", action="store_true", help="with --calibrate: Top-K with the adaptive K "
                    "(the grid's K is the ladder's cap)")
    ap.add_argument("--grid", default=None, help="calibration grid 'K,K;EPOCHS,EPOCHS;REPAIR,REPAIR' "
                    "(default 0.05,0.1,0.2;3,10,30;all,distill); with --adaptive optionally "
                    "';DISTILL_ALPHA,..;STOP_STATISTIC,..' (mean, median) appended")
    ap.add_argument("--score", default="grad_abs", help="with --calibrate: Top-K's score (grad_abs, fisher, "
                    "sensitivity, fisher_ratio, grad_ratio)")
    ap.add_argument("--ratio-floor", type=float, default=None, help="with --calibrate --score fisher_ratio / grad_ratio: "
                    "the floor under R's term as a fraction of its mean (default perturb.scores.RATIO_FLOOR)")
    ap.add_argument("--perturbations", default="reset", help="with --calibrate: comma list of perturbations "
                    "the grid crosses (reset, dampen)")
    ap.add_argument("--calibrate-ratios", default="0.1,0.2", help="with --calibrate: forget ratios (default 0.1,0.2)")
    ap.add_argument("--table", nargs="+", default=None, metavar="JSON", help="print the markdown of these runs")
    args = ap.parse_args(argv)
    if args.calibrate:
        grid = GRID
        if args.grid:
            parts = args.grid.split(";")
            if len(parts) not in (3, 5):
                ap.error("--grid is 'K,..;EPOCHS,..;REPAIR,..' or, with --adaptive, "
                         "'K,..;EPOCHS,..;REPAIR,..;DISTILL_ALPHA,..;STOP_STATISTIC,..'")
            if len(parts) == 5 and not args.adaptive:
                ap.error("the distill_alpha and stop_statistic fields of --grid need --adaptive")
            ks, es, rs = parts[:3]
            grid = [dict(k=float(k), repair_epochs=int(e), repair=r) for k in ks.split(",") for e in es.split(",")
                    for r in rs.split(",")]
            if len(parts) == 5:
                # distill_alpha only changes a distillation repair: label repairs keep alpha 0 once
                grid = [{**g, "distill_alpha": float(a), "stop_statistic": st} for g in grid
                        for a in parts[3].split(",") for st in parts[4].split(",")
                        if "distill" in g["repair"] or float(a) == 0.0]
        grid = [{**g, "perturbation": p} for g in grid for p in args.perturbations.split(",")]
        rows = calibrate(args.setting, ratios=[float(r) for r in args.calibrate_ratios.split(",")], grid=grid,
                         adaptive=args.adaptive, score=args.score, ratio_floor=args.ratio_floor)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(rows, f, indent=1)
        print("| score | perturbation | k | repair epochs | repair | distill alpha | stop statistic | per-run MIA gap | "
              "abs forget gap | test gap (abs) | MRR | cost | K used (mean) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['score']} | {r['perturbation']} | {r['k']:g} | {r['repair_epochs']} | {r['repair']} | "
                  f"{r.get('distill_alpha', 0.0):g} | "
                  f"{r.get('stop_statistic', 'mean') if args.adaptive else '-'} | {r['mia_gap']:.3f} | "
                  f"{r['forget_gap']:.3f} | {r['test_gap']:+.3f} ({r['abs_test_gap']:.3f}) | {r['mrr']:.3f} | {r['cost']:.3f} | "
                  f"{r['k_chosen']:.3f} |")
        return 0
    if args.table:
        payloads = []
        for path in args.table:
            with open(path, encoding="utf-8") as f:
                payloads.append(json.load(f))
        print(table(payloads))
        print(targets(payloads))
        return 0
    overrides = {key: value for key, value in (("k", args.k), ("repair_epochs", args.repair_epochs))
                 if value is not None}
    payload = run(args.setting, args.seed, [float(r) for r in args.ratios.split(",")], args.noise_floor,
                  not args.no_ud, args.methods.split(","), args.epochs, overrides)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1, default=float)
    print(table([payload]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
