"""The memorizing setting of DESIGN section 8 at test size, shared by tests/test_perturb.py and the
calibration that chose its margins (scripts/eval_perturb.py --calibrate): digits, 300 training
samples, 10% label noise, the wide MLP (512 tanh), no weight decay, 100 epochs."""
from __future__ import annotations

import copy

import torch

from unlearn_ext import metrics, mia
from unlearn_ext.baselines import FinetuneUnlearner
from unlearn_ext.data import SGDConfig, TrainingData, retrain, train_sgd
from unlearn_ext.evaluate import datasets, models
from unlearn_ext.perturb import RandomKUnlearner, TopKUnlearner

EPOCHS, RATIO = 100, 0.1


def setting(seed: int):
    ds = datasets.load("digits", label_noise=0.1, noise_seed=seed, limit=300)
    data = TrainingData(ds.x, ds.y)
    initial = models.make("mlp-wide", ds.features, ds.classes, seed)
    config = SGDConfig(epochs=EPOCHS, batch_size=32, lr=0.05, seed=seed)
    original = train_sgd(copy.deepcopy(initial), data, config)
    gen = torch.Generator().manual_seed(1000 + seed)
    forget = data.ids[torch.randperm(len(data), generator=gen)[:int(RATIO * len(data))]].sort().values
    return ds, data, initial, config, original, forget


def measure(model, ds, data, forget) -> dict:
    fx, fy = data.batch(forget)
    return {"forget_acc": metrics.accuracy(model, fx, fy), "test_acc": metrics.accuracy(model, ds.x_test, ds.y_test),
            "mia": mia.loss_auc(metrics.per_sample_losses(model, fx, fy),
                                metrics.per_sample_losses(model, ds.x_test, ds.y_test))}


def run_methods(seed: int, methods=("original", "retrain", "finetune", "topk", "randomk")) -> dict:
    ds, data, initial, config, original, forget = setting(seed)
    out = {}
    for name in methods:
        model = copy.deepcopy(original)
        if name == "retrain":
            model = retrain(initial, data, config, forget)
        elif name == "finetune":
            FinetuneUnlearner(model, data, config, epochs=3).unlearn(forget)
        elif name == "topk":
            TopKUnlearner(model, data, config, k=0.05, repair_epochs=3).unlearn(forget)
        elif name == "randomk":
            RandomKUnlearner(model, data, config, k=0.05, repair_epochs=3, seed=seed).unlearn(forget)
        out[name] = measure(model, ds, data, forget)
    return out
