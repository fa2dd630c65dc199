"""Per-run test accuracy against retraining's for the report set (report-*.json here): every
(seed, ratio) row of topk and randomk, met (>= -0.02) or missed; on the memorizing runs also the
MIA gap, |forget acc - retraining's| and cost. Usage: python benchmarks/perturb_guard/summarize.py"""
import glob, json, os
from statistics import mean

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    for path in sorted(glob.glob(os.path.join(HERE, "report-*.json"))):
        records = json.load(open(path))["records"]
        gold = {(r["seed"], r["ratio"]): r for r in records if r["method"] == "retrain"}
        print(f"## {os.path.basename(path)}")
        for method in ("topk", "randomk"):
            rows = sorted((r for r in records if r["method"] == method), key=lambda r: (r["ratio"], r["seed"]))
            if not rows:
                continue
            gaps = [r["test_acc"] - gold[(r["seed"], r["ratio"])]["test_acc"] for r in rows]
            met = sum(g >= -0.02 for g in gaps)
            cells = ", ".join(f"{r['ratio']:g}/s{r['seed']} {g:+.3f}" for r, g in zip(rows, gaps))
            print(f"{method}: within 2 points {met}/{len(rows)} (worst {min(gaps):+.3f}; mean cost "
                  f"{mean(r['cost_vs_retrain'] for r in rows):.3f}) -- {cells}")
            guard = [r["details"].get("guard_stop") for r in rows if r["details"].get("guard_stop")]
            if guard:
                print(f"  guard: {', '.join(f'{s} {guard.count(s)}' for s in sorted(set(guard)))}; K chosen "
                      f"{sorted({r['details']['k_chosen'] for r in rows})}, further repair epochs "
                      f"{sorted({r['details']['guard_extra_repair_epochs'] for r in rows})}")
            if "mem-" in path:
                forget = [abs(r["forget_acc"] - gold[(r["seed"], r["ratio"])]["forget_acc"]) for r in rows]
                print(f"  memorizing: MIA gap {mean(r['mia_gap'] for r in rows):.3f} (per run "
                      f"{', '.join(format(r['mia_gap'], '.3f') for r in rows)}), forget gap {mean(forget):.3f}, "
                      f"cost {mean(r['cost_vs_retrain'] for r in rows):.3f}")
        print()


if __name__ == "__main__":
    main()
