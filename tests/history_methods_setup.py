"""Small problems shared by tests/test_mini.py and tests/test_deltagrad.py: each comes with its
SGD configuration, and `gap` measures d/d0 = ||w - w_retrain|| / ||w* - w_retrain|| (docs/design.md §8)."""
from __future__ import annotations

import copy

import torch

import unlearn_ext as ue
from unlearn_ext.mini.vectors import FlatModel


def squared_error(out, t):
    return 0.5 * (out.squeeze(-1) - t) ** 2


def linear_regression(n=40, d=5, seed=0, scale=1.0):
    """A quadratic objective: linear model, squared error (the linear response is exact here)."""
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(n, d, generator=g)
    y = x @ torch.randn(d, generator=g) + 0.3 * torch.randn(n, generator=g)
    torch.manual_seed(seed)
    return ue.TrainingData(x, y, loss=squared_error), torch.nn.Linear(d, 1)


def classification(n=60, d=4, classes=3, seed=0):
    """Logistic regression on separable-ish Gaussian blobs (a non-quadratic objective)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, d, generator=g) + 1.5 * torch.nn.functional.one_hot(y, d).float()[:, :d]
    torch.manual_seed(seed)
    return ue.TrainingData(x, y), torch.nn.Linear(d, classes)


def flat(model, data):
    return FlatModel(model, data).flat()


def gap(model, original, retrained, data) -> float:
    w, w0, wr = flat(model, data), flat(original, data), flat(retrained, data)
    return float((w - wr).norm() / (w0 - wr).norm())


def trained(data, init, config, record, store):
    """A copy of init trained with `record` (train_recording_anchors / _steps) into store."""
    model = copy.deepcopy(init)
    record(model, data, config, store)
    return model


# The distributed history-method tests' run: every rank and the single process train it alike.
DISTRIBUTED_RUN = dict(epochs=6, batch_size=50, lr=0.3, weight_decay=1e-3)


def recorded_run(method: str, n: int = 200, epochs: int = DISTRIBUTED_RUN["epochs"]):
    """(model, data, store): a 3-class problem trained with `method`'s history recorded in fp32
    ("mini": anchors, "deltagrad": every step)."""
    data, init = classification(n=n, d=6, classes=3, seed=1)
    model = copy.deepcopy(init)
    config = ue.SGDConfig(**{**DISTRIBUTED_RUN, "epochs": epochs})
    if method == "mini":
        store = ue.mini_store(model)
        ue.train_recording_anchors(model, data, config, store)
    else:
        store = ue.step_store(model, params="fp32", grads="fp32")
        ue.train_recording_steps(model, data, config, store)
    return model, data, store


def recorded_by_torch_sgd(data, init, config):
    """The run trained by a plain torch.optim.SGD loop (the config's lr schedule, weight decay and
    momentum) and recorded by HistoryRecorder (p.grad and batch ids): the user's loop, not the
    library's trainer. Such a history holds no eta * lambda_max estimate. Returns (model, store)."""
    model = copy.deepcopy(init)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr_at(0), weight_decay=config.weight_decay,
                          momentum=config.momentum, nesterov=config.nesterov)
    store = ue.step_store(model, params="fp32", grads="fp32")
    recorder = ue.HistoryRecorder(store, model, opt)
    for step in ue.BatchSchedule(data.ids, config.batch_size, config.seed).steps(0, config.steps(len(data))):
        for g in opt.param_groups:
            g["lr"] = config.lr_at(step.step)
        opt.zero_grad()
        x, y = data.batch(step.ids)
        data.loss(model(x), y).mean().backward()
        recorder.batch(step.ids)
        opt.step()
    return model, store
