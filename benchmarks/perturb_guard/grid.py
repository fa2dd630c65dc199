"""The grid of benchmarks/perturb-guard-rule.md on one (data, model, regime, seed): trains the
original, and per forget ratio (5%, 10%) retrains without F and runs every candidate from the same
original; test accuracy on the harness's test pool less its validation split, which the guard
reads. Writes JSON (GRID_ROUND=2: the round-2 candidates). Usage: python benchmarks/perturb_guard/grid.py DATA MODEL LIMIT|- memorizing|generalizing SEED OUT.json"""
import copy, json, os, sys

from unlearn_ext.data import retrain
from unlearn_ext.evaluate import datasets, harness, models
from unlearn_ext.evaluate.training import RecipeOptions
from unlearn_ext.perturb import TopKUnlearner

MEMORIZING = dict(noise=0.2, limit=300, recipe=RecipeOptions(optimizer="momentum", lr=0.02, batch_size=32,
                                                              weight_decay=0.0, epochs=150))
BASE = dict(k=0.3, repair_epochs=5, repair_lr_factor=0.4, guard_halvings=3)
CANDIDATES = {
    "base": dict(guard=None),
    "g01-r2-b1": dict(guard=0.01, guard_rounds=2, guard_budget=1.0),
    "g01-r1-b1": dict(guard=0.01, guard_rounds=1, guard_budget=1.0),
    "g01-r0-b1": dict(guard=0.01, guard_rounds=0, guard_budget=1.0),
    "g02-r2-b1": dict(guard=0.02, guard_rounds=2, guard_budget=1.0),
    "g02-r0-b1": dict(guard=0.02, guard_rounds=0, guard_budget=1.0),
    "g01-r2-b05": dict(guard=0.01, guard_rounds=2, guard_budget=0.5),
    "g01-r0-b05": dict(guard=0.01, guard_rounds=0, guard_budget=0.5),
    "lr1": dict(guard=None, repair_lr_factor=1.0),
}
# round 2 of the rule (repair rounds only): GRID_ROUND=2 runs these instead
CANDIDATES_2 = {
    "base": dict(guard=None),
    "g01-r2-h0-b1": dict(guard=0.01, guard_rounds=2, guard_halvings=0, guard_budget=1.0),
    "g02-r2-h0-b1": dict(guard=0.02, guard_rounds=2, guard_halvings=0, guard_budget=1.0),
}
if os.environ.get("GRID_ROUND") == "2":
    CANDIDATES = CANDIDATES_2


def main(data, model, limit, regime, seed, out):
    seed = int(seed)
    mem = regime == "memorizing"
    limit = MEMORIZING["limit"] if mem else (None if limit == "-" else int(limit))
    ds = datasets.load(data, form=models.reads(model), label_noise=MEMORIZING["noise"] if mem else 0.0,
                       noise_seed=seed, limit=limit)
    ds, validation = harness.carve_validation(ds)
    run = harness.train_run(ds, model, seed, recipe=MEMORIZING["recipe"] if mem else None, validation=validation)
    result = {"data": data, "model": model, "regime": regime, "seed": seed, "limit": limit, "ratios": []}
    for ratio in (0.05, 0.1):
        forget = harness.forget_ids(run.data, ratio, seed)
        gold = retrain(run.initial, run.data, run.config, forget)
        measure = lambda net: harness.measure(net, ds, run.data, forget)  # noqa: E731
        rows = {"ratio": ratio, "original": measure(run.original), "retrain": measure(gold), "configs": {}}
        for name, cfg in CANDIDATES.items():
            options = {**BASE, **cfg}
            u = TopKUnlearner(copy.deepcopy(run.original), run.data, run.config, initial=run.initial, seed=seed,
                              guard_data=validation if options["guard"] is not None else None, **options)
            report = u.unlearn(forget)
            d = report.details
            rows["configs"][name] = {**measure(u.model), "cost": report.cost_vs_retrain,
                                     "k_chosen": d.get("k_chosen", options["k"]),
                                     "extra_epochs": d.get("guard_extra_repair_epochs", 0),
                                     "guard_stop": d.get("guard_stop"), "guard_trials": d.get("guard_trials")}
            print(data, model, regime, seed, ratio, name, round(rows["configs"][name]["test_acc"], 4),
                  "retrain", round(rows["retrain"]["test_acc"], 4), "cost", round(report.cost_vs_retrain, 3),
                  d.get("guard_stop"), flush=True)
        result["ratios"].append(rows)
    json.dump(result, open(out, "w"), indent=1, default=float)


if __name__ == "__main__":
    main(*sys.argv[1:])
