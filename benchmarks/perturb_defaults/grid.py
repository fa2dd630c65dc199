"""The grid of benchmarks/perturb-defaults-rule.md on one (data, model, regime, seed): trains the
original, retrains without a 10% forget set, runs every Top-K configuration from the same original,
writes JSON. Usage: python benchmarks/perturb_defaults/grid.py DATA MODEL memorizing|generalizing SEED OUT.json"""
import copy, json, sys, time

import torch

from unlearn_ext.data import retrain
from unlearn_ext.evaluate import datasets, harness, models
from unlearn_ext.evaluate.training import RecipeOptions
from unlearn_ext.perturb import TopKUnlearner

MEMORIZING = dict(noise=0.2, limit=300, recipe=RecipeOptions(optimizer="momentum", lr=0.02, batch_size=32,
                                                              weight_decay=0.0, epochs=150))
GRID = [dict(k=k, repair_epochs=e, guard=g) for k in (0.05, 0.1, 0.3) for e in (3, 5) for g in (None, 0.05)]


def main(data, model, regime, seed, out):
    seed = int(seed)
    mem = regime == "memorizing"
    ds = datasets.load(data, form=models.reads(model), label_noise=MEMORIZING["noise"] if mem else 0.0,
                       noise_seed=seed, limit=MEMORIZING["limit"] if mem else None)
    run = harness.train_run(ds, model, seed, recipe=MEMORIZING["recipe"] if mem else None)
    forget = harness.forget_ids(run.data, 0.1, seed)
    gold = retrain(run.initial, run.data, run.config, forget)
    measure = lambda net: harness._measure(net, ds, run.data, forget)  # noqa: E731
    rows = {"original": measure(run.original), "retrain": measure(gold)}
    configs = []
    for cfg in GRID:
        u = TopKUnlearner(copy.deepcopy(run.original), run.data, run.config, initial=run.initial, seed=seed, **cfg)
        report = u.unlearn(forget)
        configs.append({**cfg, **measure(u.model), "cost": report.cost_vs_retrain,
                        "k_chosen": report.details.get("k_chosen", cfg["k"])})
        print(cfg, configs[-1]["test_acc"], flush=True)
    json.dump({"data": data, "model": model, "regime": regime, "seed": seed, **rows, "configs": configs},
              open(out, "w"), indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
