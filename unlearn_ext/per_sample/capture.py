"""The clipped float64 sums from the user's own forward and backward pass (no second pass).

`BackwardCapture` keeps forward hooks on the modules of a `ClippedSums` plan (engine.py): during
the user's forward it records each module's inputs and output, and a tensor hook on that output
records the gradient the user's backward computes for it. `clipped_sums` then runs the plan's
steps 3-4 (norms, clip factors, sums) on those records -- what `clipped_sum64` does after its own
forward and backward.

The user's backward differentiates the *batch* loss, e.g. the mean (1/n) sum_i l_i, so each
recorded output gradient is `scale` times the one of sum_i l_i. Multiplying back by 1/scale is
exact only when scale is a power of two (every float32 operation of the backward then scales
exactly, barring underflow), so `clipped_sums` is given the factor and the caller decides when it
holds; the result then equals `clipped_sum64`'s bit for bit (tests/test_pcmu_engine.py).

Nothing here ever raises inside the user's forward: anything the closed forms cannot take (an
output that is not one tensor, a dtype other than the parameters', e.g. under autocast) marks the
pass unusable and the caller recomputes.
"""
from __future__ import annotations

import contextlib
from functools import partial

import torch

from .engine import plan_for
from .layers import Call


class BackwardCapture:
    """Records the user's forward/backward pass for the plan of `model`'s parameters `names`."""

    def __init__(self, model: torch.nn.Module, names):
        self.model, self.plan = model, plan_for(model, names)
        self.calls: dict[int, list[Call]] = {id(f): [] for f in self.plan.forms}
        self.unusable = False
        self.paused = False
        self.handles = []
        if self.plan.closed_form_only:
            # The root's pre-hook starts a new pass: only the latest forward with gradients counts.
            self.handles.append(model.register_forward_pre_hook(self._new_pass))
            self.handles += [f.module.register_forward_hook(partial(self._record, f), with_kwargs=True)
                             for f in self.plan.forms]

    def __deepcopy__(self, memo):
        """A deep copy of the model (e.g. the engine's copy of the trained model) carries its hooks
        and with them a copy of this capture: make that copy inert (always paused, nothing kept)."""
        inert = object.__new__(BackwardCapture)
        inert.__dict__.update(model=None, plan=None, calls={}, unusable=True, paused=True, handles=[])
        return inert

    @property
    def active(self) -> bool:
        """Whether the plan has closed forms only (tied parameters and other modules: recompute)."""
        return bool(self.handles)

    @contextlib.contextmanager
    def pause(self):
        """No recording (e.g. while the trainer itself runs the model)."""
        self.paused, saved = True, self.paused
        try:
            yield
        finally:
            self.paused = saved

    def clear(self) -> None:
        for calls in self.calls.values():
            calls.clear()
        self.unusable = False

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.clear()

    def _recording(self) -> bool:
        return not self.paused and torch.is_grad_enabled()

    def _new_pass(self, module, args):
        if self._recording():
            self.clear()

    def _record(self, form, module, args, kwargs, output):
        if not self._recording():
            return None
        dtype = next(p.dtype for p in module._parameters.values() if p is not None)
        if not isinstance(output, torch.Tensor) or not output.requires_grad or output.dtype != dtype:
            self.unusable = True
            return None
        call = Call(tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), kwargs, output)
        output.register_hook(partial(_keep_gradient, call))
        self.calls[id(form)].append(call)
        # Later in-place ops must not change the tensor whose gradient we keep (as engine.py does).
        return output.clone()

    def batch_gradient(self, n: int, values: dict, out: dict) -> dict:
        """out[name] = the gradient of the user's batch loss as their backward computed it (unclipped
        per-sample gradients of the recorded pass, summed in float64, at the loss's own scale): what
        p.grad holds after that backward. The records are kept for `clipped_sums`; only for a pass
        that is `usable(n)`."""
        for c in self._recorded():
            if c.grad_output is None:
                c.grad_output = torch.zeros_like(c.output)
        for t in out.values():
            t.zero_()
        self.plan.reduce(self.calls, n, float("inf"), values, out)
        return out

    def clipped_sums(self, n: int, scale: float, clip_norm: float, values: dict, out: dict) -> dict | None:
        """out[name] = sum over the last pass's n samples of clipped per-sample gradients, in
        float64, where the user's loss was `scale` * sum_i l_i; None if the last pass cannot give
        them (no pass with a backward, another batch size, an unusable output). The records are
        released either way."""
        usable = self.usable(n)
        if usable:
            for c in self._recorded():
                c.grad_output = (torch.zeros_like(c.output) if c.grad_output is None
                                 else c.grad_output * (1.0 / scale))
            for t in out.values():
                t.zero_()
            self.plan.reduce(self.calls, n, clip_norm, values, out)
        self.clear()
        return out if usable else None

    def usable(self, n: int) -> bool:
        """Whether the last pass was one forward and backward of n samples, every output recorded."""
        recorded = self._recorded()
        return (self.active and not self.unusable and bool(recorded) and all(c.output.shape[0] == n for c in recorded)
                and any(c.grad_output is not None for c in recorded))

    def _recorded(self) -> list[Call]:
        return [c for cs in self.calls.values() for c in cs]


def _keep_gradient(call: Call, grad: torch.Tensor) -> None:
    call.grad_output = grad
