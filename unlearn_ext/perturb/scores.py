"""Parameter scores over the forget set F (docs/design.md §7, our formulation):
* grad_abs    |sum over F of grad loss|, the saliency of F (the default);
* fisher      sum over batches of F of (batch gradient)^2 (diagonal empirical Fisher on batch
              gradients; ranks like grad_abs whenever F fits in one batch);
* sensitivity mean over F of |d ||f(x)||^2 / d w| per sample (output sensitivity, no labels);
* fisher_ratio  F's per-sample Fisher over R's (our formulation, below): how much more a coordinate
              matters to F than to the retained data R. Needs R and costs |F| + |R| sample gradients;
* grad_ratio  grad_abs over F against R's |summed gradient| scaled to |F| (our formulation, below);
              needs R, same cost.
Each returns one score tensor per trainable parameter (detached, float32) and the number of
sample-gradient evaluations it cost (the scoring pass counted in every report's cost)."""
from __future__ import annotations

import math

import torch
from torch.func import functional_call, grad, vmap

from ..data import TrainingData
from ..forward import eval_mode
from ..parameters import trainable
from ..per_sample import per_sample_grad_fn


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


def _per_sample_total(model, data, ids, batch_size, per_sample, transform):
    """Sum over ids of transform(per-sample gradient), per trainable parameter (float32);
    per_sample(params, buffers, x, y) -> {name: per-sample gradients} (vmap over the batch)."""
    params = {k: v.detach() for k, v in trainable(model).items()}
    buffers = dict(model.named_buffers())
    total = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in params.items()}
    for b in _batches(ids, batch_size):
        x, y = data.batch(b)
        for k, g in per_sample(params, buffers, x, y).items():
            total[k] += transform(g.float()).sum(0)
    return list(total.values())


def sensitivity(model, data, ids, batch_size=256):
    def out_norm(p, buffers, xi, _yi):
        return (functional_call(model, (p, buffers), (xi.unsqueeze(0),)) ** 2).sum()

    per_sample = vmap(grad(out_norm), in_dims=(None, None, 0, 0))
    return [t / max(1, ids.numel())
            for t in _per_sample_total(model, data, ids, batch_size, per_sample, torch.abs)]


def _mean_sq_sample_grads(model, data, ids, batch_size):
    """Mean over `ids` of the squared per-sample loss gradient, per trainable parameter (float32)."""
    per_sample = per_sample_grad_fn(model, data.loss)
    return [t / ids.numel() for t in _per_sample_total(model, data, ids, batch_size, per_sample, torch.square)]


# The ratio scores' floor under R's term, as a fraction of its mean over all coordinates. Why a
# floor: coordinates that no sample moves (weights of always-zero input pixels) have 0 / 0; with the
# floor they score 0, and a coordinate R barely uses cannot win on a tiny F gradient alone. The value
# is our choice, fixed before the held-out grid (the earlier trial tried 0.001-1x: similar outcomes).
RATIO_FLOOR = 0.1


def fisher_ratio(model, data, ids, batch_size=256, *, retained, floor_fraction=RATIO_FLOOR):
    """Our formulation: F_F / (F_R + floor_fraction * mean(F_R)) per coordinate, F_S being the mean over
    S of squared per-sample gradients (the diagonal empirical Fisher of S). Large where F relies on a
    coordinate that R does not: resetting those forgets F while sparing what R needs (selective
    synaptic dampening weighs the same two Fishers against each other; this ranks by their ratio)."""
    forget_f = _mean_sq_sample_grads(model, data, ids, batch_size)
    retain_f = _mean_sq_sample_grads(model, data, retained, batch_size)
    return _floored_ratio(forget_f, retain_f, floor_fraction)


def grad_ratio(model, data, ids, batch_size=256, *, retained, floor_fraction=RATIO_FLOOR):
    """Our formulation: |sum_F g| / (|F| / |R| * |sum_R g| + floor) per coordinate -- grad_abs over F
    against R's summed gradient scaled to |F| samples. Unlike fisher_ratio the sums let gradients of
    opposite sign cancel: at a minimum of the training loss R's sum is small everywhere, so this
    ranks closer to grad_abs (sample gradients: |F| + |R|, no per-sample pass)."""
    forget_g = grad_abs(model, data, ids, batch_size)
    scale = ids.numel() / retained.numel()
    retain_g = [scale * t for t in grad_abs(model, data, retained, batch_size)]
    return _floored_ratio(forget_g, retain_g, floor_fraction)


def _floored_ratio(forget_terms, retain_terms, floor_fraction):
    """forget / (retain + floor_fraction * mean(retain)) per coordinate; with a zero floor, coordinates
    R never moves score 0 rather than x / 0."""
    count = sum(t.numel() for t in retain_terms)
    mean = float(sum(t.double().sum() for t in retain_terms)) / max(1, count)
    if not mean > 0:  # every score would be 0 and Top-K would pick the lowest indices: refuse instead
        raise ValueError("ratio score: the retained data's gradient is zero on every coordinate, so F cannot "
                         "be weighed against it (use score='grad_abs')")
    floor = floor_fraction * mean
    return [f / (r + floor) if floor > 0 else torch.where(r > 0, f / r, torch.zeros_like(f))
            for f, r in zip(forget_terms, retain_terms)]


SCORES = {"grad_abs": grad_abs, "fisher": fisher, "sensitivity": sensitivity, "fisher_ratio": fisher_ratio,
          "grad_ratio": grad_ratio}
# Scores that weigh F against the retained data R: they need R's ids and pay |R| more sample gradients.
RETAINED_SCORES = frozenset({"fisher_ratio", "grad_ratio"})


def forget_scores(model, data: TrainingData, ids: torch.Tensor, score: str = "grad_abs",
                  batch_size: int = 256, retained: torch.Tensor | None = None,
                  ratio_floor: float = RATIO_FLOOR) -> tuple[list[torch.Tensor], int]:
    """(one score tensor per trainable parameter, sample gradients spent). `retained` (ids of R) is
    required by the scores in RETAINED_SCORES and ignored by the others; `ratio_floor` is
    the ratio scores' floor (fisher_ratio and grad_ratio) as a fraction of R's mean term.

    Scores are gradients taken with the model in eval mode (policy.py): dropout off, and BatchNorm
    on its running statistics -- so a request of one id works, and scoring never moves a buffer."""
    with eval_mode(model):
        return _forget_scores(model, data, ids, score, batch_size, retained, ratio_floor)


def _forget_scores(model, data, ids, score, batch_size, retained, ratio_floor):
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose from {', '.join(SCORES)}")
    if ids.numel() == 0:
        raise ValueError("scores over the forget set need at least one forget id")
    if not (math.isfinite(ratio_floor) and ratio_floor >= 0):
        raise ValueError(f"ratio_floor must be a finite number >= 0, got {ratio_floor!r}")
    if score not in RETAINED_SCORES:
        return SCORES[score](model, data, ids, batch_size), int(ids.numel())
    if retained is None or retained.numel() == 0:
        raise ValueError(f"score {score!r} weighs F against the retained data: give retained= (at least one "
                         "retained id)")
    if torch.isin(retained, ids).any():
        raise ValueError(f"score {score!r}: the retained ids overlap the forget ids")
    unknown = data.unknown_ids(torch.cat([ids, retained]))
    if unknown.numel():
        raise ValueError(f"score {score!r}: ids not in the training data: {unknown[:5].tolist()}")
    return (SCORES[score](model, data, ids, batch_size, retained=retained, floor_fraction=ratio_floor),
            int(ids.numel()) + int(retained.numel()))
