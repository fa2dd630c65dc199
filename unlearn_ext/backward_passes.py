"""What happened to each parameter's gradient between two optimizer steps of the user's loop.

The recipe that retraining repeats is zero_grad, one backward, step. The loop's checks (loop_guard's
LoopGuard, PCMU's optimizer in pcmu/optimizer.py) tell that apart from gradient accumulation, a
skipped step or a gradient changed before the step (clipping, scaling, noise) by what is kept here
per parameter: the backward passes that accumulated into its gradient since the last step, the
gradient tensor the last of them left in p.grad, and that tensor's version counter then (every
in-place change bumps it). A gradient replaced by another tensor (`p.grad = p.grad * 0.5`,
`p.grad = torch.clamp(p.grad, ...)`) starts a version counter of its own, which can read the same
as the backward's; it is told by identity instead.

Not seen: an in-place change through `p.grad.data` (`.data` does not share the version counter),
which only a copy of every gradient could tell (the loop guard keeps one with declared clipping).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


class BackwardPasses:
    """Post-accumulate-grad hooks on `params` (those that require grad) counting backward passes per
    parameter; `after_backward(p)`, if given, runs after each count (LoopGuard keeps a copy of the
    backward's gradient there). `clear()` after each step; `remove()` takes the hooks off."""

    def __init__(self, params: Iterable[torch.Tensor], after_backward: Callable[[torch.Tensor], None] | None = None):
        self._after_backward = after_backward
        self._passes: dict[int, int] = {}    # id(param) -> backward passes into its grad since the last clear
        self._versions: dict[int, int] = {}  # id(param) -> its grad's version counter after the last of them
        # id(param) -> the gradient tensor the last of them left (the same object p.grad holds, so no copy;
        # let go at clear())
        self._grads: dict[int, torch.Tensor] = {}
        self._hooks = [p.register_post_accumulate_grad_hook(self._count) for p in params if p.requires_grad]

    def _count(self, p: torch.Tensor) -> None:
        key = id(p)
        self._passes[key] = self._passes.get(key, 0) + 1
        self._versions[key] = p.grad._version
        self._grads[key] = p.grad
        if self._after_backward is not None:
            self._after_backward(p)

    def passes(self, p: torch.Tensor) -> int:
        """Backward passes into p's gradient since the last clear."""
        return self._passes.get(id(p), 0)

    def writes(self, p: torch.Tensor) -> int:
        """In-place writes to p's gradient since the last backward into it (0 if none reached it)."""
        key = id(p)
        return 0 if key not in self._versions or p.grad is None else p.grad._version - self._versions[key]

    def replaced(self, p: torch.Tensor) -> bool:
        """Whether p.grad is another tensor than the one the last backward into it left (False if
        none reached it, or p.grad is None: set to None is the caller's to judge)."""
        kept = self._grads.get(id(p))
        return kept is not None and p.grad is not None and p.grad is not kept

    def most(self, params: Iterable[torch.Tensor]) -> tuple[torch.Tensor | None, int]:
        """The parameter of `params` with the most backward passes since the last clear, and their number."""
        return max(((p, self.passes(p)) for p in params), key=lambda item: item[1], default=(None, 0))

    def clear(self) -> None:
        self._passes.clear()
        self._versions.clear()
        self._grads.clear()

    def remove(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self.clear()
