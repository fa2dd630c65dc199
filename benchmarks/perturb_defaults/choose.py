"""Applies the rule of benchmarks/perturb-defaults-rule.md to the grid's JSON files and prints every
configuration's measures and the choice. Usage: python benchmarks/perturb_defaults/choose.py FILE.json..."""
import json, statistics, sys

MARGIN = 0.2
LIMITS = dict(shortfall=0.02, mia=0.08, forget=0.10, cost=0.12)


def main(paths):
    runs = [json.load(open(p)) for p in paths]
    mem, gen = [], []
    for r in runs:
        gap = r["original"]["mia_auc"] - r["retrain"]["mia_auc"]
        name = f"{r['regime']} {r['data']}+{r['model']} seed {r['seed']}"
        if r["regime"] == "memorizing":
            ok = gap >= MARGIN
            print(f"{name}: original - retrain MIA {gap:.3f} -> precondition {'met' if ok else 'NOT met: left out'}")
            if ok:
                mem.append(r)
        else:
            print(f"{name}: retrain test {r['retrain']['test_acc']:.3f}")
            gen.append(r)
    table = []
    for i, cfg in enumerate(runs[0]["configs"]):
        key = {k: cfg[k] for k in ("k", "repair_epochs", "guard")}
        shortfall = max(g["retrain"]["test_acc"] - g["configs"][i]["test_acc"] for g in gen)
        mia = statistics.mean(abs(m["configs"][i]["mia_auc"] - m["retrain"]["mia_auc"]) for m in mem)
        forget = statistics.mean(abs(m["configs"][i]["forget_acc"] - m["retrain"]["forget_acc"]) for m in mem)
        cost = statistics.mean(m["configs"][i]["cost"] for m in mem)
        miss = max(shortfall / LIMITS["shortfall"], mia / LIMITS["mia"], forget / LIMITS["forget"], cost / LIMITS["cost"])
        table.append((key, shortfall, mia, forget, cost, miss))
        print(f"{key}: worst test shortfall {shortfall:+.3f} | memorizing MIA gap {mia:.3f} forget gap {forget:.3f} "
              f"cost {cost:.3f} | worst normalized miss {miss:.2f}")
    eligible = [t for t in table if t[5] <= 1.0]
    if eligible:
        best = min(eligible, key=lambda t: (t[2] + t[3], t[4]))
        print("chosen (all four limits met):", best[0])
    else:
        best = min(table, key=lambda t: (t[5], t[4]))
        print(f"no configuration meets all four; chosen by the smallest worst normalized miss ({best[5]:.2f}):", best[0])


if __name__ == "__main__":
    main(sys.argv[1:])
