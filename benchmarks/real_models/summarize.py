"""The summary table of benchmarks/RESULTS.md, "Real models: every method on cnn, resnet, transformer",
and the targets read off it, from the JSON files that the `unlearn-ext eval` commands listed there write.

Usage: python benchmarks/real_models/summarize.py benchmarks/real_models/*.json

Per setting, method and ratio (over seeds): how many requests were answered by the method itself
(not a fallback to exact retraining, not refused), mean test accuracy and its signed gap to that
seed's retraining (worst run), the mean MIA gap and d/d0, and the three costs relative to
retraining (sample-gradients, wall time, CPU time). The retraining noise floor is the largest
|test gap| between the reference retrain and its other-seed retrains over the setting's runs.
"""
import json
import statistics
import sys

ANSWERED = ("unlearned", "certified")        # the method's own answer
FALLBACK = ("fallback", "retrained")          # exact retraining (history methods; PCMU from a step)
TEST_POINTS = 0.02                            # "within 2 points of retraining"


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def _fmt(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)


def _range(xs, spec=".2f"):
    xs = [x for x in xs if x is not None]
    return "n/a" if not xs else f"{min(xs):{spec}}-{max(xs):{spec}}"


def _reference_row(method):
    return "pcmu-retrain" if method.startswith("pcmu") else "retrain"


def table(payload):
    recs, s = payload["records"], payload["settings"]
    gold = {(r["method"], r["seed"], r["ratio"]): r for r in recs if r["method"] in ("retrain", "pcmu-retrain")}
    methods = [m for m in dict.fromkeys(r["method"] for r in recs)]
    floor = max((r["retrain_floor_test_gap"] or 0.0) for r in recs if r["method"] == "retrain")
    test_rt = [r["test_acc"] for r in recs if r["method"] == "retrain"]
    lines = [f"### {s['data']} + {s['model']}",
             "",
             f"`{s['command']}`",
             "",
             f"recipe {s['recipe']}; retraining's test accuracy {_range(test_rt, '.3f')}; "
             f"noise floor of retraining (largest |test gap| of a reference retrain to its other-seed retrains) "
             f"{floor:.3f}",
             "",
             "| method | ratio | answered | refused | test | test - retrain (worst) | MIA gap | d/d0 | cost | wall/rt | cpu/rt |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        for ratio in s["ratios"]:
            rows = [r for r in recs if r["method"] == m and r["ratio"] == ratio]
            if not rows:
                continue
            ref = _reference_row(m)
            measured = [r for r in rows if r["status"] != "refused"]
            gaps = [r["test_acc"] - gold[(ref, r["seed"], ratio)]["test_acc"] for r in measured]
            own = m not in ("original", "retrain", "pcmu-original", "pcmu-retrain")
            answered = f"{sum(r['status'] in ANSWERED for r in rows)}/{len(rows)}" if own else "-"
            lines.append(
                f"| {m} | {ratio:g} | {answered} | {sum(r['status'] == 'refused' for r in rows)} | "
                f"{_fmt(_mean(r['test_acc'] for r in measured))} | {_fmt(min(gaps) if gaps else None, '+.3f')} | "
                f"{_fmt(_mean(r['mia_gap'] for r in measured))} | {_fmt(_mean(r['d_d0'] for r in measured), '.2f')} | "
                f"{_fmt(_mean(r['cost_vs_retrain'] for r in measured))} | "
                f"{_range([r['wall_vs_retrain'] for r in measured])} | {_range([r['cpu_vs_retrain'] for r in measured])} |")
    refusals = sorted({f"{r['method']}: {r['reason']}" for r in recs if r["status"] == "refused"})
    if refusals:
        lines += ["", "Refused: " + "; ".join(refusals)]
    return lines


def targets(payloads):
    """The targets, each marked met or missed from the records (our reading of each target below)."""
    out = ["### Targets", ""]
    cnn = [p for p in payloads if p["settings"]["model"] == "cnn"]
    for p in cnn:
        recs = p["records"]
        for m in ("mini", "deltagrad"):
            rows = [r for r in recs if r["method"] == m]
            if not rows:
                continue
            share = sum(r["status"] in ANSWERED for r in rows) / len(rows)
            d = _mean(r["d_d0"] for r in rows)
            cost = _mean(r["cost_vs_retrain"] for r in rows)
            if m == "mini":
                met = share >= 0.8 and d is not None and d <= 0.7 and cost is not None and cost <= 0.5
                goal = ">= 80% answered without fallback, mean d/d0 <= 0.7, mean cost <= 0.5"
            else:
                met = share >= 0.8
                goal = ">= 80% answered without fallback"
            out.append(f"* {m} on {p['settings']['data']} + cnn ({goal}): **{'met' if met else 'missed'}** -- "
                       f"answered {share:.0%} of {len(rows)}, mean d/d0 {_fmt(d, '.2f')}, mean cost {_fmt(cost)}")
    for p in payloads:
        recs, s = p["records"], p["settings"]
        runs = s["memorization"]["runs"]
        memorized = f"memorization precondition met in {sum(run['met'] for run in runs)} of {len(runs)} runs"
        gold = {(r["seed"], r["ratio"]): r["test_acc"] for r in recs if r["method"] == "retrain"}
        for m in ("topk", "randomk"):
            rows = [r for r in recs if r["method"] == m and r["status"] != "refused"]
            if not rows:
                continue
            gaps = [r["test_acc"] - gold[(r["seed"], r["ratio"])] for r in rows]
            within = sum(g >= -TEST_POINTS for g in gaps)
            tag = "met" if within == len(gaps) else "missed"
            out.append(f"* {m} on {s['data']} + {s['model']} ({memorized}), "
                       f"test no more than 2 points below retraining: **{tag}** ({within} of {len(gaps)} runs within; "
                       f"worst {min(gaps):+.3f})")
    fallbacks = [(p["settings"]["model"], r) for p in payloads for r in p["records"] if r["status"] in FALLBACK]
    if fallbacks:
        over = [(mod, r) for mod, r in fallbacks if r["wall_vs_retrain"] is not None and r["wall_vs_retrain"] > 1.05]
        walls = [r["wall_vs_retrain"] for _, r in fallbacks]
        cpus = [r["cpu_vs_retrain"] for _, r in fallbacks]
        out.append(f"* a fallback costs <= 1.05x retraining (wall time): **{'met' if not over else 'missed'}** "
                   f"({len(fallbacks) - len(over)} of {len(fallbacks)} fallback rows within; wall/rt {_range(walls)}, "
                   f"cpu/rt {_range(cpus)}, sample-gradients {_range([r['cost_vs_retrain'] for _, r in fallbacks], '.3f')})")
        for method in sorted({r["method"] for _, r in fallbacks}):
            mine = [r for _, r in fallbacks if r["method"] == method]
            out.append(f"  * {method}: {len(mine)} fallback rows, wall/rt {_range([r['wall_vs_retrain'] for r in mine])}, "
                       f"cpu/rt {_range([r['cpu_vs_retrain'] for r in mine])}, over 1.05 (wall): "
                       f"{sum(r['wall_vs_retrain'] is not None and r['wall_vs_retrain'] > 1.05 for r in mine)}")
    return out


def main(paths):
    payloads = [json.load(open(p)) for p in paths]
    lines = []
    for p in payloads:
        lines += table(p) + [""]
    lines += targets(payloads)
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
