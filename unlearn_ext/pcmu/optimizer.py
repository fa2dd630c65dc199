"""PCMU in the user's own training loop: the user's torch.optim.SGD with its step replaced by PCMU's.

    model, optimizer, loader = engine.make_unlearnable(model, sgd, loader, method="pcmu", epochs=5,
                                                       clip_norm=1.0, tau=0.1, sigma=0.05)
    for epoch in range(5):
        for x, y in loader:
            optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()

`PCMUOptimizer.step()` is one step of a `PCMUTrainer` (trainer.py) on the schedule's batch t (the
loader yields it; the ids come from the schedule): the clipped float64 sum of the batch's per-sample
gradients, divided by the nominal batch size, smoothed and quantized, and w <- w - lr * code with lr
the wrapped optimizer's learning rate at that moment (so the user's scheduler drives it). It
records exactly what `PCMUTrainer` records, and `unlearner()` returns the `PCMUUnlearner` of that
trainer: certificates, per-request checks and resumes work as for a `PCMUTrainer` run.

Where the per-sample sums come from:
  * from the user's backward pass (per_sample/capture.py: hooks record each layer's inputs and
    output gradients; the closed forms give norms and sums) when that gives the same bits as
    recomputing: every trainable layer has a closed form (Linear, Conv1d/2d, Embedding,
    LayerNorm, GroupNorm), no dropout is active, the user's loss is the sum of the per-sample
    losses or their mean over a power-of-two number of samples (undoing the mean is then exact; a
    class-weighted mean is never undone),
    the batch fits one chunk, and the last forward with gradients was on the step's batch (its size
    is checked; the loop must use the returned loader);
  * otherwise recomputed from the batch (`data.batch(ids)`, one more forward and backward), in eval
    mode. `sources` counts how many steps took each route.
The user's p.grad is left as their backward made it and is not used. A step after more than one
backward pass (gradient accumulation, a step skipped) is refused before its update: the loop ran
several batches for one scheduled step, and the last one's backward is not batch t's. So is a step
whose gradients the loop changed after the backward (clipping, noise): the change would be dropped.
And a first step whose gradients are not those of the loss given (a scaled loss, a penalty added,
inputs changed in the loop; loss_probe.py): the per-sample sums taken from that backward would be
another loss's, so the run would silently not be PCMUTrainer's over the data. And the first step
taking its sums from the backward whose p.grad is no longer that backward's (a GradScaler's
unscale_ or a write through p.grad.data changes it in place without a version counter moving, so
neither check above sees it): the sums would be the scaled loss's.
"""
from __future__ import annotations

import contextlib

import torch

from ..backward_passes import BackwardPasses
from ..data import TrainingData
from ..loss_probe import ForwardSeen, check_first_step, most_different, relative_difference, scale_between, tolerance
from ..per_sample.capture import BackwardCapture
from ..policy import UnsupportedModelError, active_stochastic_layers, refuse_training_batch_norm
from .trainer import PER_SAMPLE_NEED, PCMUTrainer
from .unlearner import PCMUUnlearner

# SGD options that would change PCMU's update w <- w - lr * code (their neutral values).
_NEUTRAL_SGD = {"momentum": 0, "dampening": 0, "nesterov": False, "weight_decay": 0, "maximize": False}


def check_pcmu_wrap(model: torch.nn.Module, optimizer) -> None:
    """What PCMU's wrapper refuses before training: BatchNorm in training mode and any optimizer but
    plain torch.optim.SGD over every trainable parameter with one learning rate."""
    refuse_training_batch_norm(model, "PCMU", PER_SAMPLE_NEED)
    if type(optimizer) is not torch.optim.SGD:
        raise UnsupportedModelError(
            f"PCMU's update is w <- w - lr * code (a quantized plain SGD step): wrap a torch.optim.SGD without "
            f"momentum or weight decay, got {type(optimizer).__name__}; its lr (and the scheduler driving it) "
            "sets the step size")
    for group in optimizer.param_groups:
        for key, neutral in _NEUTRAL_SGD.items():
            if group.get(key, neutral) != neutral:
                raise UnsupportedModelError(f"PCMU's update is w <- w - lr * code; the SGD optimizer has {key}="
                                            f"{group[key]!r}, which it cannot apply: use {key}={neutral!r}")
    _one_lr(optimizer)
    covered = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
    if missing:
        raise UnsupportedModelError(f"PCMU updates every trainable parameter; the optimizer does not hold "
                                    f"{', '.join(missing[:5])}: freeze them (requires_grad=False) or add them")


def _one_lr(optimizer) -> float:
    lrs = sorted({float(g["lr"]) for g in optimizer.param_groups})
    if len(lrs) != 1:
        raise UnsupportedModelError(f"PCMU takes one step size for every parameter; the optimizer's groups have "
                                    f"learning rates {lrs}")
    return lrs[0]


# What make_unlearnable sets itself (from its own arguments, the data, the loss and the optimizer's
# lr): PCMUOptimizer's arguments and PCMUTrainer's options that are not PCMU options of
# make_unlearnable(..., method="pcmu", **options) (the engine refuses them there).
SET_BY_THE_WRAP = ("batch_size", "seed", "shuffle", "steps", "loss_fn", "loss_reduction", "lr", "ids", "exclude",
                   "data", "history")


class PCMUOptimizer:
    """The user's SGD optimizer, stepping with PCMU (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.SGD, data: TrainingData, *, batch_size: int,
                 seed: int, steps: int, loss_fn, loss_reduction: str, shuffle: bool = True,
                 first_batch_loss=None, **pcmu_options):
        """first_batch_loss: () -> the loss of the schedule's first batch at the current weights
        (loss_probe.py), checked against the loop's first backward; None: not checked."""
        check_pcmu_wrap(model, optimizer)
        self._first_batch_loss = first_batch_loss
        self._forward_seen = ForwardSeen(model) if first_batch_loss is not None else None  # (until the first step)
        self.optimizer, self.model, self.steps = optimizer, model, int(steps)
        # A class-weighted CrossEntropyLoss/NLLLoss divides its mean by the batch's total weight, not
        # by n: its scale is unknown here, so those losses always recompute.
        self.loss_reduction = "weighted" if getattr(loss_fn, "weight", None) is not None and hasattr(
            loss_fn, "ignore_index") else loss_reduction
        self.trainer = PCMUTrainer(model, None, data, batch_size=batch_size, seed=seed, shuffle=shuffle, lr=None,
                                   **pcmu_options)
        self.capture = BackwardCapture(model, self.trainer.names) if self.trainer.framework == "G" else None
        self._values = dict(zip(self.trainer.names, self.trainer.params))
        self._sums = {k: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for k, p in self._values.items()}
        self.sources = {"backward": 0, "recomputed": 0}
        # Backward passes into each parameter's gradient since the last step: step t takes its sums from
        # the loop's one backward of batch t (or recomputes them), so a loop that runs two batches per
        # step (gradient accumulation, a step skipped) is refused rather than stepped on the last one.
        # And the gradient's version counter after the last of them: p.grad is not read, so a change the
        # loop makes to it (clipping, noise) would be dropped silently; it is refused instead.
        self._passes = BackwardPasses(self._values.values())
        self._backward_checked = False  # p.grad against the recorded backward, at its first use

    # ---- what a loop uses of an optimizer --------------------------------------------------------

    @property
    def param_groups(self) -> list:
        return self.optimizer.param_groups

    @property
    def defaults(self) -> dict:
        return self.optimizer.defaults

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        """PCMU's step t on the schedule's batch t (a closure, if given, is called first for the loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        trainer = self.trainer
        t = trainer.steps_done
        if t >= self.steps:
            raise RuntimeError(f"the loop takes more optimizer steps than the {self.steps} of the epochs given to "
                               "make_unlearnable: the records would not match the schedule")
        self._check_loop(t)
        if t == 0 and self._first_batch_loss is not None:
            self._check_first_loss()
        lr = _one_lr(self.optimizer)
        ids = trainer.schedule.step(t, trainer.forgotten).ids
        sums = self._sums_from_backward(ids.numel())
        self.sources["backward" if sums is not None else "recomputed"] += 1
        if self.capture is None:
            trainer.step(ids, step_size=lr)
        else:
            with self.capture.pause():
                trainer.step(ids, step_size=lr, clipped_sums=sums)
        # The user's LR scheduler checks that the optimizer it drives has stepped (torch's flag, set by
        # the optimizer's own step, which PCMU's update replaces).
        self.optimizer._opt_called = True
        self._passes.clear()
        self._stop_noting_forward()
        if trainer.steps_done == self.steps:
            self.close()
        return loss

    def _check_loop(self, t: int) -> None:
        """Refuses step t of a loop that left zero_grad, one backward, step (see __init__)."""
        for name, p in self._values.items():
            if self._passes.writes(p) or self._passes.replaced(p):
                raise RuntimeError(
                    f"optimizer step {t}: the loop changed the gradient of {name} between backward and step (e.g. "
                    "torch.nn.utils.clip_grad_norm_, gradient scaling or added noise, in place or by a new "
                    "tensor); PCMU's step does not use the gradients: it clips each sample's gradient itself "
                    "(clip_norm=) and smooths with its own noise (sigma=). Remove the change from the loop")
        most, passes = self._passes.most(self._values.values())
        if passes > 1:
            name = next(name for name, p in self._values.items() if p is most)
            raise RuntimeError(
                f"optimizer step {t}: the gradient of {name} comes from {passes} backward passes since the last "
                "step; PCMU's step t trains on the schedule's batch t, from the loop's one backward of that batch "
                "(zero_grad, backward, step). Gradient accumulation or a backward whose step was skipped (e.g. on "
                "a non-finite loss) runs several batches per step: step after every batch's backward")

    def _check_first_loss(self) -> None:
        """The first backward's gradients against the given loss's own (loss_probe.py), with the
        recording paused: the recomputation must not replace the loop's captured batch."""
        names = {id(p): name for name, p in self._values.items()}
        params = [p for p in self._values.values() if p.grad is not None]
        paused = self.capture.pause() if self.capture is not None else contextlib.nullcontext()
        with paused:
            check_first_step(params, [p.grad.detach() for p in params], names, self.model, self._first_batch_loss,
                             self._forward_seen)

    def _sums_from_backward(self, n: int) -> dict | None:
        if self.capture is None or not self.capture.active:
            return None
        scale = self._loss_scale(n)
        exact = (scale is not None and n <= self.trainer.chunk and not active_stochastic_layers(self.model))
        if not exact:
            self.capture.clear()
            return None
        refuse_training_batch_norm(self.model, "PCMU", PER_SAMPLE_NEED)
        if not self._backward_checked and self.capture.usable(n):
            self._check_gradients_are_the_backwards(n)
            self._backward_checked = True
        return self.capture.clipped_sums(n, scale, self.trainer.clip_norm, self._values, self._sums)

    def _check_gradients_are_the_backwards(self, n: int) -> None:
        """Refuses the first step taking its sums from the loop's backward when p.grad is no longer
        what that backward computed (the recorded pass's batch gradient): a change that moves no
        version counter, which _check_loop cannot see -- GradScaler.unscale_ divides p.grad in place
        that way (scaler.scale(loss).backward(); scaler.step(optimizer)), as does a write through
        p.grad.data. The recorded pass is the scaled loss's: its per-sample sums, clipped, would make
        every step another run than PCMUTrainer's. One more reduction of the records, once per run."""
        backward = self.capture.batch_gradient(n, self._values, self._sums)
        names = list(self._values)
        loop = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._values.values()]
        recorded = [backward[k] for k in names]
        off = relative_difference(loop, recorded)
        if off <= tolerance(loop):
            return
        worst = most_different(loop, recorded)
        raise RuntimeError(
            f"optimizer step {self.trainer.steps_done}: the gradients at the step are not the ones the loop's "
            f"backward computed (about {scale_between(loop, recorded):.4g} times them; most different: "
            f"{names[worst]}): they were changed in place without a trace, as torch.amp.GradScaler's unscale_ "
            "(scaler.scale(loss).backward(); scaler.step(optimizer)) or a write through p.grad.data does. PCMU takes "
            "its per-sample gradients inside the backward, so they would be the scaled loss's: backpropagate the "
            "loss unscaled (loss.backward(); optimizer.step()), without a GradScaler")

    def _loss_scale(self, n: int) -> float | None:
        """The factor between the user's batch loss and sum_i l_i when undoing it is exact, else None."""
        if self.loss_reduction == "sum":
            return 1.0
        if self.loss_reduction == "mean" and n > 0 and n & (n - 1) == 0:
            return 1.0 / n
        return None

    # ---- after training ------------------------------------------------------------------------

    def close(self) -> None:
        """Removes the recording hooks (done after the last step)."""
        if self.capture is not None:
            self.capture.close()
        self._passes.remove()
        self._stop_noting_forward()

    def _stop_noting_forward(self) -> None:
        if self._forward_seen is not None:
            self._forward_seen.remove()
            self._forward_seen = None

    def unlearner(self) -> PCMUUnlearner:
        if self.trainer.steps_done != self.steps:
            raise RuntimeError(f"training took {self.trainer.steps_done} optimizer steps; the epochs given to "
                               f"make_unlearnable have {self.steps}: finish them before asking for the unlearner")
        self.close()
        return PCMUUnlearner(self.trainer)

