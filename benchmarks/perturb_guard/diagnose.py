"""Why a 30% reset + 5 repair epochs loses test accuracy (benchmarks/perturb-guard-rule.md, first
part): on one (data, model, seed) at forget ratio 10%, the test accuracy of the original, of
retraining, after the reset alone, and after 5 / 10 / 15 repair epochs at 0.4x and 1.0x the
recipe's peak lr; and the share of each parameter tensor the selection resets. Test accuracy is on
the harness's test pool less its validation split. Writes JSON.
Usage: python benchmarks/perturb_guard/diagnose.py DATA MODEL LIMIT|- SEED OUT.json"""
import copy, json, sys

import torch

from unlearn_ext import metrics
from unlearn_ext.data import retrain
from unlearn_ext.evaluate import datasets, harness, language, models
from unlearn_ext.parameters import trainable
from unlearn_ext.perturb import TopKUnlearner


def main(data, model, limit, seed, out):
    seed = int(seed)
    ds = datasets.load(data, form=models.reads(model), limit=None if limit == "-" else int(limit))
    ds, validation = harness.carve_validation(ds)
    acc = (lambda net: language.token_accuracy(net, ds.x_test, ds.y_test)) if ds.kind == "documents" else \
        (lambda net: metrics.accuracy(net, ds.x_test, ds.y_test))
    run = harness.train_run(ds, model, seed, validation=validation)
    forget = harness.forget_ids(run.data, 0.1, seed)
    gold = retrain(run.initial, run.data, run.config, forget)
    u = TopKUnlearner(copy.deepcopy(run.original), run.data, run.config, k=0.3, initial=run.initial,
                      repair_epochs=0, seed=seed)
    u.unlearn(forget)
    reset = u.model
    shares = {name: float((a != b).double().mean()) for (name, a), b in
              zip(trainable(reset).items(), trainable(run.original).values())}
    result = {"data": data, "model": model, "seed": seed, "original": acc(run.original), "retrain": acc(gold),
              "reset_only": acc(reset), "reset_share_per_tensor": shares, "repair": {}}
    for factor in (0.4, 1.0):
        net, curve = copy.deepcopy(reset), []
        for block in range(3):
            tune = run.config.tuned(factor, 5, run.config.seed + 104729 * (1 + len(forget)) + block, len(run.data))
            tune.train(net, run.data, exclude=forget)
            curve.append(acc(net))
        result["repair"][str(factor)] = curve  # after 5, 10, 15 epochs
    print(json.dumps(result), flush=True)
    json.dump(result, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
