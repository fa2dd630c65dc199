"""Parameter scores over the forget set F (DESIGN section 7, our formulation):
* grad_abs    |sum over F of grad loss|, the saliency of F (the default);
* fisher      sum over batches of F of (batch gradient)^2 (diagonal empirical Fisher on batch
              gradients; ranks like grad_abs whenever F fits in one batch);
* sensitivity mean over F of |d ||f(x)||^2 / d w| per sample (output sensitivity, no labels).
Each returns one score tensor per trainable parameter (detached, float32) and the number of
sample-gradient evaluations it cost (the scoring pass counted in every report's cost)."""
from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap

from ..data import TrainingData
from ..per_sample import trainable


def _batches(ids: torch.Tensor, batch_size: int):
    for i in range(0, ids.numel(), batch_size):
        yield ids[i:i + batch_size]


def _batch_grad(model, data: TrainingData, ids, reduce: str):
    x, y = data.batch(ids)
    loss = data.loss(model(x), y)
    params = list(trainable(model).values())
    return torch.autograd.grad(loss.sum() if reduce == "sum" else loss.mean(), params)


def grad_abs(model, data, ids, batch_size=256):
    total = None
    for b in _batches(ids, batch_size):
        g = _batch_grad(model, data, b, "sum")
        total = list(g) if total is None else [t + x for t, x in zip(total, g)]
    return [t.detach().abs().float() for t in total]


def fisher(model, data, ids, batch_size=256):
    total = None
    for b in _batches(ids, batch_size):
        g = [x.detach().float() ** 2 for x in _batch_grad(model, data, b, "mean")]
        total = g if total is None else [t + x for t, x in zip(total, g)]
    return total


def sensitivity(model, data, ids, batch_size=256):
    params = {k: v.detach() for k, v in trainable(model).items()}
    buffers = dict(model.named_buffers())

    def out_norm(p, xi):
        return (functional_call(model, (p, buffers), (xi.unsqueeze(0),)) ** 2).sum()

    per_sample = vmap(grad(out_norm), in_dims=(None, 0))
    total = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in params.items()}
    for b in _batches(ids, batch_size):
        x, _ = data.batch(b)
        for k, g in per_sample(params, x).items():
            total[k] += g.abs().float().sum(0)
    return [t / max(1, ids.numel()) for t in total.values()]


SCORES = {"grad_abs": grad_abs, "fisher": fisher, "sensitivity": sensitivity}


def forget_scores(model, data: TrainingData, ids: torch.Tensor, score: str = "grad_abs",
                  batch_size: int = 256) -> tuple[list[torch.Tensor], int]:
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose from {', '.join(SCORES)}")
    return SCORES[score](model, data, ids, batch_size), int(ids.numel())
