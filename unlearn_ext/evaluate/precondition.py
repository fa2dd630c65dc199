"""The memorizing setting's precondition (docs/design.md §8): forgetting can be judged by the MIA
and forget-accuracy columns only where the model memorized, i.e. where the original's MIA AUC
exceeds the reference retrain's by at least MEMORIZATION_MARGIN. Where it does not, doing nothing
already "passes", and a table of such runs cannot tell methods apart on forgetting."""
from __future__ import annotations

MEMORIZATION_MARGIN = 0.2


def check(records: list[dict]) -> dict:
    """Per (dataset, model, seed, ratio) run: original's MIA AUC - the reference retrain's, and
    whether it reaches the margin. Returns {"margin", "runs": [...], "met", "total"}."""
    by_run: dict = {}
    for r in records:
        if r["method"] in ("original", "retrain") and r.get("mia_auc") is not None:
            by_run.setdefault((r["dataset"], r["model"], r["seed"], r["ratio"]), {})[r["method"]] = r["mia_auc"]
    runs = [{"dataset": d, "model": m, "seed": s, "ratio": q, "gap": v["original"] - v["retrain"],
             "met": v["original"] - v["retrain"] >= MEMORIZATION_MARGIN}
            for (d, m, s, q), v in by_run.items() if {"original", "retrain"} <= set(v)]
    return {"margin": MEMORIZATION_MARGIN, "runs": runs, "met": sum(r["met"] for r in runs), "total": len(runs)}


def lines(result: dict, memorizing_asked: bool) -> list[str]:
    """What the report says: always the count; where a memorizing run was asked for (label noise)
    and some run missed the margin, a warning naming those runs."""
    runs = result["runs"]
    if not runs:
        return []
    gaps = [r["gap"] for r in runs]
    out = [f"memorization precondition (original's MIA AUC >= retraining's + {result['margin']:g}): met in "
           f"{result['met']} of {result['total']} runs (original - retrain MIA AUC {min(gaps):.3f} to {max(gaps):.3f})"]
    missed = [r for r in runs if not r["met"]]
    if memorizing_asked and missed:
        where = ", ".join(f"seed {r['seed']} ratio {r['ratio']:g} ({r['gap']:.3f})" for r in missed)
        out.append(f"WARNING: the model did not memorize in {len(missed)} of {len(runs)} runs ({where}): there the "
                   "original already sits near retraining, so the MIA and forget columns cannot judge forgetting "
                   "(doing nothing passes). Train longer, a larger model, or with more label noise "
                   "(README: the memorizing image setting).")
    return out
