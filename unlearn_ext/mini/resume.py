"""Exact retraining from stored weights: the safety fallback of both history methods.

Replays SGD without the forgotten ids from a recorded step `start` to the end, with the recorded
schedule (batch seed and size, or the recorded batch ids), learning rates, weight decay and
momentum. From step 0 (the initial weights) this is exactly `retrain`.

`RetainedRun` is that training one step at a time, so that a method may run its first steps and
keep them: DeltaGrad's exact prefix (its burn-in) is retraining's first steps, taken through this
same step function, and a fallback that fires later continues the same run from there instead of
starting again at step 0 (the answer is still retraining's bit for bit, and the prefix is not
paid twice).

Momentum: a run with momentum carries the buffer b_t from step to step, so resuming at step t needs
the buffer the *retrained* run would hold there, not only its weights. At step 0 it is known (b_0 =
0: torch starts the buffer with the first gradient); at a later step it is as unknown as the
retrained weights themselves, and the recorded run's buffer is not it. So a momentum run resumes
from step 0 only (a later start would need a stored retained-run buffer, which no history holds);
a `RetainedRun` holds its own buffer, so it may be stopped and continued at any step.

Modes: each step trains the modules in the training modes the recorded loop's steps had (run_info
"train_modes", recorded by the engine), whatever mode the model was left in after training (a user
who evaluated it in eval mode); a history without them trains the model in its current modes.

Randomness: a model with dropout trains in training mode here; its masks come from the run's own
generator state, carried from step to step, so the answer depends neither on the process's RNG
state (a restarted process gives the same weights) nor on how the steps were split between a
prefix and its continuation; the process's RNG is left alone. That state starts from the run's
batch seed, and each epoch starts from the RNG state the recorded loop started it from where the
history holds one (run_info "epoch_rng_states", recorded by the engine from the user's loop), as
the recipe's retraining does: through the engine the fallback is retraining bit for bit, dropout
included.
"""
from __future__ import annotations

import base64

import torch

from ..data import BatchSchedule, TrainingData, momentum_optimizer, sgd_step
from ..policy import in_training_modes
from .record import SGDSettings


class RetainedRun:
    """Training on the retained samples from flat `weights` (loaded into `model`, which it trains in
    place) over `steps`, an iterable of (step, retained ids, lr) in order, one step at a time,
    through the step function of `retrain` (data.sgd_step; with momentum, torch.optim.SGD's own
    steps and buffer). run_info: the history's, for the run's randomness (module docstring,
    Randomness). `cost` counts the retained samples seen."""

    def __init__(self, model, data: TrainingData, sgd: SGDSettings, weights: torch.Tensor, flat, steps,
                 run_info: dict):
        self.model, self.data, self.sgd, self.flat = model, data, sgd, flat
        flat.load_(weights)
        self.optimizer = momentum_optimizer(model, sgd.momentum, sgd.nesterov, sgd.weight_decay)
        self._steps = iter(steps)
        self._rng_state = torch.Generator().manual_seed(int(run_info.get("batch_seed", 0))).get_state()
        self._epoch_rng_states = epoch_rng_states(run_info)
        self._steps_per_epoch = int(run_info.get("steps_per_epoch") or 0)
        self._modes = run_info.get("train_modes")
        self.cost = 0

    def _take(self, t, ids, lr):
        """Step t under the run's own generator state (module docstring, Randomness)."""
        if self._steps_per_epoch and t % self._steps_per_epoch == 0:
            self._rng_state = self._epoch_rng_states.get(t // self._steps_per_epoch, self._rng_state)
        with torch.random.fork_rng(devices=[]), in_training_modes(self.model, self._modes):
            torch.set_rng_state(self._rng_state)
            grads = sgd_step(self.model, self.data, ids, lr, self.sgd.weight_decay, self.optimizer)
            self._rng_state = torch.get_rng_state()
        self.cost += int(ids.numel())
        return grads

    def step(self) -> torch.Tensor | None:
        """Takes the next step; returns the mean loss gradient at the weights before it, flat float32
        without weight decay (None for an empty batch, which makes no update)."""
        t, ids, lr = next(self._steps)
        grads = self._take(t, ids, lr)
        return None if grads is None else torch.cat([g.reshape(-1).float() for g in grads])

    def finish(self) -> int:
        """Takes every remaining step; returns their cost."""
        before = self.cost
        for t, ids, lr in self._steps:
            self._take(t, ids, lr)
        return self.cost - before

    def momentum_buffer(self) -> torch.Tensor | None:
        """The run's momentum buffer, flat float32 (None without momentum or before the first step)."""
        if self.optimizer is None:
            return None
        state, params = self.optimizer.state, self.optimizer.param_groups[0]["params"]
        parts = [state[p].get("momentum_buffer") if p in state else None for p in params]
        if any(b is None for b in parts):
            return None
        return torch.cat([b.reshape(-1).float() for b in parts])


def resume_from(model, data: TrainingData, run_info: dict, sgd: SGDSettings, start: int, weights: torch.Tensor,
                flat, exclude: torch.Tensor, batches=None, lrs=None) -> int:
    """Loads `weights` (flat) into `model` and trains steps start..T-1 without `exclude`, with the
    SGD settings `sgd` (check_replayable_sgd; momentum: torch.optim.SGD's own steps, from step 0
    only). batches: optional {step: recorded batch ids}; otherwise the BatchSchedule of run_info.
    lrs: optional {step: recorded learning rate}; otherwise run_info's lr_schedule.
    Returns the sample-gradient cost (retained samples seen)."""
    if sgd.momentum and start != 0:
        raise ValueError(f"resuming momentum SGD at step {start} needs the retrained run's momentum buffer there, "
                         "which no history stores; resume from step 0 (buffer 0)")
    lrs = run_info["lr_schedule"] if lrs is None else lrs
    if batches is None:
        schedule = BatchSchedule(data.ids, run_info["batch_size"], run_info["batch_seed"],
                                 run_info.get("batch_shuffle", True))
        steps = ((s.step, s.ids, lrs[s.step]) for s in schedule.steps(start, len(lrs), exclude))
    else:
        steps = ((t, ids[~torch.isin(ids, exclude)], lrs[t]) for t, ids in sorted(batches.items()) if t >= start)
    return RetainedRun(model, data, sgd, weights, flat, steps, run_info).finish()


def encode_rng_states(states: dict) -> dict:
    """{epoch: torch RNG state} as run_info holds it: {"epoch": base64 of the state's bytes}."""
    return {str(int(e)): base64.b64encode(bytes(s.numpy())).decode("ascii") for e, s in states.items()}


def epoch_rng_states(run_info: dict) -> dict:
    """The history's {epoch: torch RNG state the recorded loop started that epoch from} (none for a
    history recorded outside the engine)."""
    return {int(e): torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
            for e, s in (run_info.get("epoch_rng_states") or {}).items()}
