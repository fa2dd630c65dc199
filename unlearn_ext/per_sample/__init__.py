"""Per-sample clipped gradient sums (PCMU's step, docs/design.md §4).

`clipped_sum64` (engine.py) is the one to use: per-sample norms and the clipped sum per layer in
closed form (layers.py), float64 throughout, without the [b, d] per-sample gradients; modules
without a closed form fall back to torch.func per module. vmap.py keeps the whole-model torch.func
path (`clipped_per_sample`, `clipped_sum64_vmap`), used for tied parameters and as a reference.
The float64 rounding error of the sums is bounded in pcmu/margin.py (PCMU's rounding margin).
"""
from ..policy import refuse_training_batch_norm
from .engine import clipped_sum64, per_sample_losses, plan_for
from .vmap import (SUM_COLUMNS, clip_scales, clipped_per_sample, clipped_sum64_vmap, per_sample_grad_fn,
                   weighted_row_sum64)

__all__ = ["per_sample_grad_fn", "clipped_sum64", "clipped_sum64_vmap", "clipped_per_sample", "clip_scales", "per_sample_losses",
           "plan_for", "refuse_training_batch_norm", "weighted_row_sum64", "SUM_COLUMNS"]
