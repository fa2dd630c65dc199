"""The memorizing setting of docs/design.md §8 at test size, shared by tests/test_perturb.py and
tests/test_perturb_adaptive.py: the harness's named `memorizing` setting (unlearn_ext/evaluate/
settings.py: 300 digits samples, 20% label noise drawn per seed, a 512-wide tanh MLP, no weight
decay, 300 epochs -- the setting of the perturbation table), a 10% forget set drawn as the harness draws
it, and the methods at the registry's memorizing settings (evaluate/methods.py PERTURB_SETTINGS)."""
from __future__ import annotations

import copy

from unlearn_ext import metrics, mia
from unlearn_ext.baselines import FinetuneUnlearner
from unlearn_ext.data import retrain, train_sgd
from unlearn_ext.evaluate import harness, settings
from unlearn_ext.evaluate import methods as registry
from unlearn_ext.perturb import AdaptiveTopKUnlearner, RandomKUnlearner, TopKUnlearner

RATIO = 0.1
PROFILE = registry.PERTURB_SETTINGS["memorizing"]  # K = 5%, 3 repair epochs at 0.4x the peak lr
RATIO_PROFILE = registry.RATIO_SETTINGS["memorizing"]  # topk-ratio: grad_ratio, dampen, K = 10%, 5 repair epochs


def setting(seed: int):
    named = settings.get("memorizing")
    ds = named.dataset(seed)
    data, initial, config = named.training(seed)
    original = train_sgd(copy.deepcopy(initial), data, config)
    forget = harness.forget_ids(data, RATIO, seed)
    return ds, data, initial, config, original, forget


def measure(model, ds, data, forget) -> dict:
    fx, fy = data.batch(forget)
    return {"forget_acc": metrics.accuracy(model, fx, fy), "test_acc": metrics.accuracy(model, ds.x_test, ds.y_test),
            "mia": mia.loss_auc(metrics.per_sample_losses(model, fx, fy),
                                metrics.per_sample_losses(model, ds.x_test, ds.y_test))}


def run_methods(seed: int, methods=("original", "retrain", "finetune", "topk", "randomk")) -> dict:
    ds, data, initial, config, original, forget = setting(seed)
    holdout = (ds.x_test[::2], ds.y_test[::2])  # as harness.train_run holds out
    repair = dict(repair_epochs=PROFILE["repair_epochs"], repair_lr_factor=PROFILE["repair_lr_factor"])
    out = {}
    for name in methods:
        model = copy.deepcopy(original)
        if name == "original":
            pass
        elif name == "retrain":
            model = retrain(initial, data, config, forget)
        elif name == "finetune":
            FinetuneUnlearner(model, data, config, epochs=PROFILE["repair_epochs"]).unlearn(forget)
        elif name == "topk":
            TopKUnlearner(model, data, config, k=PROFILE["k"], **repair).unlearn(forget)
        elif name == "randomk":
            RandomKUnlearner(model, data, config, k=PROFILE["k"], seed=seed, **repair).unlearn(forget)
        elif name == "topk-adaptive":
            AdaptiveTopKUnlearner(model, data, config, k=registry.ADAPTIVE_K_CAP, holdout=holdout, **repair).unlearn(forget)
        elif name == "topk-ratio":
            TopKUnlearner(model, data, config, score="grad_ratio", seed=seed, **RATIO_PROFILE).unlearn(forget)
        elif name == "randomk-ratio":
            RandomKUnlearner(model, data, config, seed=seed, **RATIO_PROFILE).unlearn(forget)
        elif name == "finetune-ratio":  # the same repair budget as topk-ratio
            FinetuneUnlearner(model, data, config, epochs=RATIO_PROFILE["repair_epochs"]).unlearn(forget)
        else:
            raise ValueError(f"unknown method {name!r}")
        out[name] = measure(model, ds, data, forget)
    return out
