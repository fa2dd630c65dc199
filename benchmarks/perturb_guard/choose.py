"""Applies benchmarks/perturb-guard-rule.md to the grid's JSON files (grid-*.json here) and prints
the measures per candidate and the choice. Usage: python benchmarks/perturb_guard/choose.py [grid|grid2]
(grid2: round 2's files)"""
import glob, json, os, sys
from statistics import mean

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    runs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(HERE, f"{(sys.argv[1:] or ['grid'])[0]}-*.json")))]
    names = list(runs[0]["ratios"][0]["configs"])
    gen, mem = {n: [] for n in names}, {n: [] for n in names}
    for run in runs:
        for rows in run["ratios"]:
            where = f"{run['data']}+{run['model']} seed {run['seed']} ratio {rows['ratio']:g}"
            if run["regime"] == "memorizing":
                gap = rows["original"]["mia_auc"] - rows["retrain"]["mia_auc"]
                met = gap >= 0.2
                print(f"memorizing {where}: original - retrain MIA {gap:.3f} -> precondition "
                      f"{'met' if met else 'NOT met: left out'}")
                if not met:
                    continue
                for n in names:
                    c = rows["configs"][n]
                    mem[n].append((abs(c["mia_auc"] - rows["retrain"]["mia_auc"]),
                                   abs(c["forget_acc"] - rows["retrain"]["forget_acc"]), c["cost"]))
            else:
                for n in names:
                    c = rows["configs"][n]
                    gen[n].append((rows["retrain"]["test_acc"] - c["test_acc"], c["cost"], where))
    base_mia = mean(m[0] for m in mem["base"]) if mem["base"] else None
    base_forget = mean(m[1] for m in mem["base"]) if mem["base"] else None
    table = []
    for n in names:
        within = sum(s <= 0.02 for s, _, _ in gen[n])
        worst = max(s for s, _, _ in gen[n])
        gen_cost = mean(c for _, c, _ in gen[n])
        mia, forget, cost = (mean(m[i] for m in mem[n]) for i in range(3)) if mem[n] else (None, None, None)
        eligible = mem[n] == [] or (mia <= base_mia + 0.01 and forget <= base_forget + 0.01 and cost <= 0.12)
        table.append((n, within, len(gen[n]), worst, gen_cost, mia, forget, cost, eligible))
        print(f"{n:11s} generalizing within 2 points {within}/{len(gen[n])}, worst shortfall {worst:+.3f}, "
              f"mean cost {gen_cost:.3f} | memorizing MIA gap {mia if mia is None else round(mia, 3)} "
              f"forget gap {forget if forget is None else round(forget, 3)} cost {cost if cost is None else round(cost, 3)}"
              f" | {'eligible' if eligible else 'not eligible'}")
    ranked = sorted((t for t in table if t[-1]), key=lambda t: (-t[1], t[3], t[4]))
    print("chosen:", ranked[0][0] if ranked else "none eligible: the defaults stay")


if __name__ == "__main__":
    main()
