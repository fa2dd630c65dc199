"""Whether the gradients of a user's first optimizer step are the ones retraining takes there.

Retraining's step 0 is `loss_fn(model(x), y).backward()` on the schedule's first batch. The loop's
own backward may differ in ways no counter of backward passes or gradient writes sees: a scaled
loss (`(loss * 4).backward()`), a term added to the loss (a penalty, an auxiliary loss), inputs or
targets changed in the loop (a normalization, mixup), another loss than the one given. Each makes
every step other than retraining's, so retraining would not reproduce the run. Recomputing
retraining's gradient at the first step and comparing tells them apart, at the cost of two more
forward and backward passes per run (two: see below).

What it cannot judge, and then does not refuse:
  * a loop whose gradients are random beyond the schedule's control (dropout in training mode,
    random augmentation not seeded by (seed, epoch, id)): the gradient is computed twice under two
    different random states, and when those two differ by more than the tolerance the comparison
    says nothing;
  * a change smaller than the tolerance (a relative difference of 1e-3 in float32, a few roundings
    of the dtype in bf16 / fp16), or one the loop makes only at later steps.
GradScaler (torch.amp) unscales the gradients before the optimizer's step, so the step uses the
loss's own gradients: it passes (with a declared clip the loop guard compares its copies unscaled;
a step the scaler skips is refused there, loop_guard.py). Mixed precision
(torch.autocast around the loop's forward) is the loop's arithmetic, not a change: the
recomputation runs under the autocast the loop's last forward with gradients ran under
(AutocastSeen). Retraining itself runs without it, as before: close to the loop, not bit for bit.
The recomputations run the model's forward (and any forward hook the user put on it) twice more
at the first step; its buffers (BatchNorm statistics), torch's RNG and every p.grad are left as
they were.
"""
from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Sequence

import numpy as np
import torch

# The relative difference (in the 2-norm over every stepped gradient) allowed between the loop's
# gradients and the recomputed ones: recomputing is bit-exact on a deterministic CPU; GPU kernels
# that add in another order differ by a few roundings of the dtype.
RELATIVE_TOLERANCE = 1e-3
DTYPE_ROUNDINGS = 8


class AutocastSeen:
    """The autocast dtype the loop's last forward with gradients ran under (None: no autocast), noted
    by a forward pre-hook on the model; `context()` runs the recomputation under the same."""

    def __init__(self, model: torch.nn.Module):
        self.device_type = next((p.device.type for p in model.parameters()), "cpu")
        self.dtype = None
        self._handle = model.register_forward_pre_hook(self._note)

    def _note(self, module, args) -> None:
        if torch.is_grad_enabled():
            on = torch.is_autocast_enabled(self.device_type)
            self.dtype = torch.get_autocast_dtype(self.device_type) if on else None

    def context(self):
        return contextlib.nullcontext() if self.dtype is None else torch.autocast(self.device_type, dtype=self.dtype)

    def remove(self) -> None:
        self._handle.remove()


@contextlib.contextmanager
def _leaving_no_trace(model: torch.nn.Module, params: Sequence[torch.Tensor], seed: int | None):
    """Gradients on: the model's buffers (BatchNorm statistics) and the global random generators
    (torch's, numpy's, Python's: a dataset may draw from any) put back afterwards; seed: the torch
    RNG state to run under (None: the current one)."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({p.device.index for p in params if p.device.type == "cuda"})
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            if seed is not None:
                torch.manual_seed(seed)
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        with torch.no_grad():
            for b, kept in buffers:
                b.copy_(kept)


def recomputed_gradients(params: Sequence[torch.Tensor], model: torch.nn.Module,
                         batch_loss: Callable[[], torch.Tensor], seed: int | None) -> list[torch.Tensor]:
    """d batch_loss() / d params (zeros where unused), without touching p.grad, the buffers or the
    RNGs (_leaving_no_trace)."""
    with _leaving_no_trace(model, params, seed):
        grads = torch.autograd.grad(batch_loss(), list(params), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


def distance_of_recomputed(reference: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                           model: torch.nn.Module, batch_loss: Callable[[], torch.Tensor], seed: int) -> float:
    """relative_difference(recomputed_gradients(...), reference) without holding the gradients:
    a hook compares each one as the backward pass makes it and hands autograd an expanded zero
    instead (no memory), so the check holds one extra copy of the gradients, not two."""
    diff = [0.0]
    reached = set()

    def comparing(i: int):
        def hook(g: torch.Tensor) -> torch.Tensor:
            reached.add(i)
            diff[0] += float((g.double() - reference[i].double()).square().sum())
            return g.new_zeros(()).expand_as(g)
        return hook

    handles = [p.register_hook(comparing(i)) for i, p in enumerate(params)]
    try:
        with _leaving_no_trace(model, params, seed):
            torch.autograd.grad(batch_loss(), list(params), allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    diff_sq = diff[0] + sum(float(r.double().square().sum()) for i, r in enumerate(reference) if i not in reached)
    base = sum(float(r.double().square().sum()) for r in reference)
    if base == 0:
        return 0.0 if diff_sq == 0 else float("inf")
    return (diff_sq / base) ** 0.5


def relative_difference(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """||a - b|| / ||b|| over every tensor together, in float64 (inf when b is zero and a is not)."""
    diff = sum(float((x.double() - y.double()).square().sum()) for x, y in zip(a, b))
    base = sum(float(y.double().square().sum()) for y in b)
    if base == 0:
        return 0.0 if diff == 0 else float("inf")
    return (diff / base) ** 0.5


def scale_between(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """The least-squares factor s with a ~ s * b (1 when b is zero)."""
    dot = sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))
    base = sum(float(y.double().square().sum()) for y in b)
    return dot / base if base else 1.0


def tolerance(grads: Sequence[torch.Tensor]) -> float:
    return max([RELATIVE_TOLERANCE] + [DTYPE_ROUNDINGS * torch.finfo(g.dtype).eps for g in grads])


def check_first_step(params: Sequence[torch.Tensor], loop: Sequence[torch.Tensor], names: dict,
                     model: torch.nn.Module, batch_loss: Callable[[], torch.Tensor],
                     autocast: AutocastSeen | None = None, hint: str = "") -> None:
    """Refuses the loop's first step when its backward's gradients `loop` (of `params`; with declared
    clipping the copies taken before the clip) are not batch_loss()'s (retraining's step-0 loss,
    loading its batch included) -- unless two recomputations under different random states
    disagree, when the comparison cannot tell (module docstring). autocast: the loop's, which the
    recomputations run under. hint: ends the refusal's message (the caller's advice)."""
    if autocast is not None:
        plain_loss = batch_loss

        def batch_loss():
            with autocast.context():
                return plain_loss()

    # A frozen parameter's stale gradient is left out: autograd differentiates trainable ones only.
    kept = [(p, g) for p, g in zip(params, loop) if p.requires_grad]
    if not kept:
        return
    params, loop = [p for p, _ in kept], [g for _, g in kept]
    first = recomputed_gradients(params, model, batch_loss, seed=None)
    limit = tolerance(first)
    if distance_of_recomputed(first, params, model, batch_loss, seed=1) > limit:
        return  # random beyond the schedule's control: nothing to compare with
    off = relative_difference(loop, first)
    if off <= limit:
        return
    worst = max(range(len(params)), key=lambda i: relative_difference([loop[i]], [first[i]]))
    raise RuntimeError(
        f"optimizer step 0: the loop's gradients are not those of the loss given to make_unlearnable on the "
        f"batch (relative difference {off:.3g}; they are about {scale_between(loop, first):.4g} times it; "
        f"most different: {names.get(id(params[worst]), 'a parameter')}); retraining steps on "
        "loss_fn(model(x), y).backward() over the loader's batches and could not repeat the run. Backpropagate "
        "that loss unscaled ((loss * c).backward() scales every step), pass the loss the loop uses as "
        f"loss_fn=, and leave the loader's inputs and targets as they come{hint}")
