"""The reported set's table and targets (benchmarks/perturb-defaults-rule.md) from report.sh's JSON
files. Usage: python benchmarks/perturb_defaults/summarize.py report-*.json"""
import json, statistics, sys

METHODS = ("original", "retrain", "finetune", "randomk", "topk")


def main(paths):
    for path in paths:
        payload = json.load(open(path))
        recs, memo = payload["records"], payload["settings"]["memorization"]
        memorizing = payload["settings"]["label_noise"] > 0
        print(f"\n### {payload['settings']['data']} + {payload['settings']['model']} "
              f"({'memorizing' if memorizing else 'generalizing'}), ratio 10%, seeds 0-2\n")
        print("precondition (original - retrain MIA AUC >= 0.2): "
              + ", ".join(f"seed {r['seed']} {r['gap']:.3f} ({'met' if r['met'] else 'not met'})" for r in memo["runs"]))
        gold = {r["seed"]: r for r in recs if r["method"] == "retrain"}
        print("\n| method | test | test - retrain (per seed) | forget | forget gap (per seed) | MIA gap (per seed) | cost |")
        print("|---|---|---|---|---|---|---|")
        for m in METHODS:
            rows = sorted((r for r in recs if r["method"] == m), key=lambda r: r["seed"])
            if not rows:
                continue
            tg = [r["test_acc"] - gold[r["seed"]]["test_acc"] for r in rows]
            fg = [abs(r["forget_acc"] - gold[r["seed"]]["forget_acc"]) for r in rows]
            mg = [r["mia_gap"] for r in rows]
            cost = [r["cost_vs_retrain"] for r in rows if r["cost_vs_retrain"] is not None]
            f = lambda xs, s="+.3f": " / ".join(format(x, s) for x in xs)  # noqa: E731
            cost_cell = f"{statistics.mean(cost):.3f}" if cost else "n/a"
            print(f"| {m} | {statistics.mean(r['test_acc'] for r in rows):.3f} | {f(tg)} | "
                  f"{statistics.mean(r['forget_acc'] for r in rows):.3f} | {f(fg, '.3f')} | {f(mg, '.3f')} | "
                  f"{cost_cell} |")


if __name__ == "__main__":
    main(sys.argv[1:])
