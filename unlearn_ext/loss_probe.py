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
  * a model whose graph takes backward() but not torch.autograd.grad (activation checkpointing
    with use_reentrant=True), which the recomputation needs so as to leave p.grad alone;
  * a change smaller than the tolerance (a relative difference of 1e-3 in float32, a few roundings
    of the dtype in bf16 / fp16), or one the loop makes only at later steps.
GradScaler (torch.amp) unscales the gradients before the optimizer's step, so the step uses the
loss's own gradients: this comparison passes it (PCMU refuses a scaler, pcmu/optimizer.py: its
per-sample sums come from the scaled backward; with a declared clip the loop guard compares its copies unscaled;
a step the scaler skips is refused there, loop_guard.py). Under a declared scaler the recomputations
backpropagate at the scale the loop's backward ran at and are unscaled alike: unscaled, float16
gradients that the scale keeps normal fall into its subnormals and differ by more than its
roundings. Mixed precision
(torch.autocast around the loop's forward) is the loop's arithmetic, not a change: the
recomputation runs under the autocast the loop's last forward with gradients ran under, from the
buffers that forward started from (ForwardSeen). Retraining itself runs without it, as before:
close to the loop, not bit for bit.
The recomputations load the first batch (the dataset's __getitem__) and run the model's forward
(and any forward hook the user put on it) twice more at the first step; its buffers (BatchNorm
statistics), torch's, numpy's and Python's global RNGs and every p.grad are left as they were.
State outside those is not: a generator of the model's or the dataset's own, or a Python counter
its forward keeps, has advanced by those two calls, which retraining (from the copy taken when
wrapping) does not repeat.
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


class ForwardSeen:
    """What the loop's last forward with gradients started from, noted by a forward pre-hook on the
    model until the first step: the autocast dtype it ran under (None: no autocast) and the model's
    buffers as they were before it. The recomputation repeats both (`context()`): a forward that
    updates a buffer before using it (a running normalization, a power iteration's vector) would
    otherwise run from the value the loop's forward left, not the one it used, and differ from the
    loop for no fault of it. One copy of the buffers per forward until the first step."""

    def __init__(self, model: torch.nn.Module):
        self.device_type = next((p.device.type for p in model.parameters()), "cpu")
        self.dtype = None
        self._buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._handle = model.register_forward_pre_hook(self._note)

    def _note(self, module, args) -> None:
        if torch.is_grad_enabled():
            on = torch.is_autocast_enabled(self.device_type)
            self.dtype = torch.get_autocast_dtype(self.device_type) if on else None
            self._buffers = [(b, b.detach().clone()) for b in module.buffers()]

    @contextlib.contextmanager
    def context(self):
        """The buffers put back to the noted ones (the caller restores the current ones, as
        _leaving_no_trace does), under the noted autocast."""
        with torch.no_grad():
            for b, noted in self._buffers:
                b.copy_(noted)
        with contextlib.nullcontext() if self.dtype is None else torch.autocast(self.device_type, dtype=self.dtype):
            yield

    def remove(self) -> None:
        self._handle.remove()
        self._buffers = []


@contextlib.contextmanager
def _leaving_no_trace(model: torch.nn.Module, params: Sequence[torch.Tensor], seed: int | None):
    """Gradients on: the model's buffers (BatchNorm statistics) and the global random generators
    (torch's, numpy's, Python's: a dataset may draw from any) put back afterwards; seed: what all
    three are seeded with to run under (None: their current states). All three, so that
    randomness from any of them (augmentation drawing from numpy or Python in the main process)
    differs between the two recomputations and is not judged (a torch seed alone left the two
    agreeing with each other and not with the loop: a false refusal)."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({p.device.index for p in params if p.device.type == "cuda"})
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            if seed is not None:
                torch.manual_seed(seed)
                np.random.seed(seed)
                random.seed(seed)
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        with torch.no_grad():
            for b, kept in buffers:
                b.copy_(kept)


class GradUnsupported(Exception):
    """The recomputed loss's graph takes backward() only, not torch.autograd.grad."""


def _grad(loss: torch.Tensor, params: Sequence[torch.Tensor]):
    """torch.autograd.grad of loss over params (None where unused); GradUnsupported where the graph
    refuses .grad() -- activation checkpointing with use_reentrant=True does -- though the loop's
    backward() ran on the same model: no fault of the loop, only nothing to compare with."""
    try:
        return torch.autograd.grad(loss, list(params), allow_unused=True)
    except RuntimeError as error:
        raise GradUnsupported(str(error)) from error


def recomputed_gradients(params: Sequence[torch.Tensor], model: torch.nn.Module,
                         batch_loss: Callable[[], torch.Tensor], seed: int | None) -> list[torch.Tensor]:
    """d batch_loss() / d params (zeros where unused), without touching p.grad, the buffers or the
    RNGs (_leaving_no_trace)."""
    with _leaving_no_trace(model, params, seed):
        grads = _grad(batch_loss(), params)
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
            diff[0] += _squared_distance(g, reference[i])
            # (a sparse gradient, nn.Embedding(sparse=True)'s, takes no expand: an empty sparse zero)
            return torch.zeros_like(g) if g.layout != torch.strided else g.new_zeros(()).expand_as(g)
        return hook

    handles = [p.register_hook(comparing(i)) for i, p in enumerate(params)]
    try:
        with _leaving_no_trace(model, params, seed):
            # (not _grad: a graph that refuses .grad() did so in recomputed_gradients first; an error
            # here is this module's own and is not to pass for "nothing to compare with")
            torch.autograd.grad(batch_loss(), list(params), allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    diff_sq = diff[0] + sum(_dot(r, r) for i, r in enumerate(reference) if i not in reached)
    base = sum(_dot(r, r) for r in reference)
    if base == 0:
        return 0.0 if diff_sq == 0 else float("inf")
    return (diff_sq / base) ** 0.5


# Elements taken to float64 at a time by the sums below: their temporaries stay ~16 MB whatever the
# largest gradient (a whole tensor in float64, with its difference and square, took about eight
# times its float32 size at the first step: 2 GB more for a 268 MB layer).
FLOAT64_CHUNK = 1 << 20


def _flat(x: torch.Tensor) -> torch.Tensor:
    """x as one dense row (a sparse gradient, nn.Embedding(sparse=True)'s, made dense)."""
    return (x if x.layout == torch.strided else x.to_dense()).reshape(-1)


def _dot(x: torch.Tensor, y: torch.Tensor) -> float:
    """sum(x * y) in float64, FLOAT64_CHUNK elements at a time."""
    xs, ys = _flat(x), _flat(y)
    return sum(float(torch.dot(xs[s:s + FLOAT64_CHUNK].double(), ys[s:s + FLOAT64_CHUNK].double()))
               for s in range(0, xs.numel(), FLOAT64_CHUNK))


def _squared_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """sum((x - y)^2) in float64, FLOAT64_CHUNK elements at a time."""
    xs, ys = _flat(x), _flat(y)
    total = 0.0
    for s in range(0, xs.numel(), FLOAT64_CHUNK):
        d = xs[s:s + FLOAT64_CHUNK].double() - ys[s:s + FLOAT64_CHUNK].double()
        total += float(torch.dot(d, d))
    return total


def relative_difference(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """||a - b|| / ||b|| over every tensor together, in float64 (inf when b is zero and a is not)."""
    diff = sum(_squared_distance(x, y) for x, y in zip(a, b))
    base = sum(_dot(y, y) for y in b)
    if base == 0:
        return 0.0 if diff == 0 else float("inf")
    return (diff / base) ** 0.5


def scale_between(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """The least-squares factor s with a ~ s * b (1 when b is zero)."""
    dot = sum(_dot(x, y) for x, y in zip(a, b))
    base = sum(_dot(y, y) for y in b)
    return dot / base if base else 1.0


def most_different(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> int:
    """The index i whose a[i] is relatively farthest from b[i] (the parameter a refusal names)."""
    return max(range(len(a)), key=lambda i: relative_difference([a[i]], [b[i]]))


def tolerance(grads: Sequence[torch.Tensor]) -> float:
    return max([RELATIVE_TOLERANCE] + [DTYPE_ROUNDINGS * torch.finfo(g.dtype).eps for g in grads])


def unscale_factor(scale: float, device: torch.device) -> torch.Tensor:
    """GradScaler.unscale_'s factor for a scale: float32(1 / scale), on device."""
    return torch.tensor(1.0 / scale, dtype=torch.float64).float().to(device)


def unscaled(grad: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """grad unscaled as GradScaler.unscale_ unscales p.grad: times its factor, in float32."""
    return (grad.float() * factor).to(grad.dtype)


def check_first_step(params: Sequence[torch.Tensor], loop: Sequence[torch.Tensor], names: dict,
                     model: torch.nn.Module, batch_loss: Callable[[], torch.Tensor],
                     seen: ForwardSeen | None = None, hint: str = "", loss_scale: float = 1.0) -> None:
    """Refuses the loop's first step when its backward's gradients `loop` (of `params`; with declared
    clipping the copies taken before the clip) are not batch_loss()'s (retraining's step-0 loss,
    loading its batch included) -- unless two recomputations under different random states
    disagree, when the comparison cannot tell (module docstring). seen: the loop's forward's
    autocast and starting buffers, which the recomputations run under and from. hint: ends the
    refusal's message (the caller's advice). loss_scale: the loop's GradScaler scale at its backward
    (`loop` already unscaled): the recomputations backpropagate the loss times it, as the loop did,
    and are unscaled as unscale_ unscales; unscaled, float16 gradients that the scale keeps normal
    fall into float16's subnormals and differ from the loop's by far more than its roundings."""
    if seen is not None:
        plain_loss = batch_loss

        def batch_loss():
            with seen.context():
                return plain_loss()

    if loss_scale != 1.0:
        unscaled_loss = batch_loss

        def batch_loss():
            loss = unscaled_loss()
            return loss * torch.tensor(loss_scale, dtype=torch.float32, device=loss.device)

    # A frozen parameter's stale gradient is left out: autograd differentiates trainable ones only.
    kept = [(p, g) for p, g in zip(params, loop) if p.requires_grad]
    if not kept:
        return
    params, loop = [p for p, _ in kept], [g for _, g in kept]
    try:
        first = recomputed_gradients(params, model, batch_loss, seed=None)
        limit = tolerance(first)
        if seen is not None and seen.dtype is not None:
            # The loop's forward computed in the autocast dtype: the tolerance is its roundings, not
            # the gradients' float32 ones. A loop computing its loss outside the autocast (which the
            # recomputation runs inside) differs by a few of them (it was refused at 1e-3).
            limit = max(limit, DTYPE_ROUNDINGS * torch.finfo(seen.dtype).eps)
        if distance_of_recomputed(first, params, model, batch_loss, seed=1) > limit:
            return  # random beyond the schedule's control: nothing to compare with
    except GradUnsupported:
        return  # a graph that takes backward() only (reentrant checkpointing): nothing to compare with
    if loss_scale != 1.0:
        first = [unscaled(g, unscale_factor(loss_scale, g.device)) for g in first]
    off = relative_difference(loop, first)
    if off <= limit:
        return
    worst = most_different(loop, first)
    raise RuntimeError(
        f"optimizer step 0: the loop's gradients are not those of the loss given to make_unlearnable on the "
        f"batch (relative difference {off:.3g}; they are about {scale_between(loop, first):.4g} times it; "
        f"most different: {names.get(id(params[worst]), 'a parameter')}); retraining steps on "
        "loss_fn(model(x), y).backward() over the loader's batches and could not repeat the run. Backpropagate "
        "that loss unscaled ((loss * c).backward() scales every step), pass the loss the loop uses as "
        f"loss_fn=, and leave the loader's inputs and targets as they come{hint}")
