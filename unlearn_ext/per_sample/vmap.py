"""Per-sample clipped gradients with torch.func (no Python loop over samples): the general path.

The closed forms in layers.py replace it for the common layers (engine.py); this module remains the
fallback for modules without a closed form, and the whole-model path where parameters are tied.

PCMU's step needs sum_i clip_C(grad l_i(w)) / b. The sum is accumulated in float64 and rounded to
float32 once, so summing adds only ~1e-16 relative error whatever the order or chunking. The
per-sample gradients themselves come from vmap's batched matmuls, whose float32 roundings depend on
how many samples share a call: the same sample's gradient can differ by a few float32 roundings
between batch compositions (tests/test_per_sample.py measures it). That is what lets a deletion
check predict retraining: the sum without F differs from (stored sum - F's part) only by those
roundings, which pcmu/trainer.py's `rounding_margin` covers.

Limits: the loss must be per-sample. Layers that mix samples (BatchNorm in training mode) are not
per-sample and are refused by vmap; use GroupNorm/LayerNorm or BatchNorm in eval mode. Dropout would
make gradients random and break replay; keep the model deterministic.
"""
from __future__ import annotations

import math

import torch
from torch.func import functional_call, grad, vmap

from ..parameters import trainable


def per_sample_grad_fn(model, loss_fn):
    """vmap of the one-sample loss gradient: f(params, buffers, x, y) -> {name: per-sample gradients}."""
    def sample_loss(params, buffers, xi, yi):
        out = functional_call(model, (params, buffers), (xi.unsqueeze(0),))
        # .sum(): a one-sample batch's loss is a scalar whether loss_fn reduces (mean) or not.
        return loss_fn(out, yi.unsqueeze(0)).sum()
    return vmap(grad(sample_loss), in_dims=(None, None, 0, 0))


def clipped_per_sample(model, loss_fn, x, y, clip_norm: float, params=None) -> dict[str, torch.Tensor]:
    """Per-sample gradients (leading dim = batch), each clipped to L2 norm `clip_norm`."""
    params = {k: v.detach() for k, v in (params or trainable(model)).items()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    per_sample = per_sample_grad_fn(model, loss_fn)(params, buffers, x, y)
    scale = clip_scales(per_sample, clip_norm)
    return {k: g * scale.to(g.dtype).view(-1, *([1] * (g.dim() - 1))) for k, g in per_sample.items()}


def _rows(g: torch.Tensor) -> torch.Tensor:
    """[b, ...] -> [b, d] (also for b = 0, where reshape(b, -1) is ambiguous)."""
    return g.reshape(g.shape[0], math.prod(g.shape[1:]))


def clip_scales(per_sample: dict[str, torch.Tensor], clip_norm: float) -> torch.Tensor:
    """min(1, C / ||g_i||) per sample in float64: float64 row norms of each tensor (a float32
    vector_norm over long rows was off by ~3e-5 relative), then the norm of those."""
    rows = [torch.linalg.vector_norm(_rows(g), dim=1, dtype=torch.float64) for g in per_sample.values()]
    norms = torch.linalg.vector_norm(torch.stack(rows, dim=1), dim=1)
    return torch.where(norms > clip_norm, clip_norm / norms, torch.ones_like(norms))


# Columns of a per-sample gradient converted to float64 at a time: the [b, 2048] float64 block stays
# in cache for its matrix-vector product (measured at b = 256, d = 85k: 62 ms for one whole-tensor
# conversion + mv, 10 ms in blocks; the same bits, since each output element is one dot product).
SUM_COLUMNS = 2048


def weighted_row_sum64(g: torch.Tensor, weights64: torch.Tensor) -> torch.Tensor:
    """sum_i weights_i * g_i in float64 (g: [b, ...] per-sample values), computed column block by
    column block. float32 x float32 products are exact in float64, so only the sum rounds."""
    flat = _rows(g)
    parts = [torch.mv(flat[:, j:j + SUM_COLUMNS].double().t(), weights64)
             for j in range(0, flat.shape[1], SUM_COLUMNS)]
    total = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=g.device)
    return total.view(g.shape[1:])


def clipped_sum64_vmap(model, loss_fn, x, y, clip_norm: float, params=None, chunk: int = 4096) -> dict[str, torch.Tensor]:
    """sum_i clip(grad l_i) in float64, `chunk` samples at a time (bounds memory at chunk * d), from the
    whole model's per-sample gradients (the path before the closed forms; kept for tied parameters)."""
    params = params or trainable(model)
    total = {k: torch.zeros(v.shape, dtype=torch.float64, device=v.device) for k, v in params.items()}
    detached = {k: v.detach() for k, v in params.items()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    fn = per_sample_grad_fn(model, loss_fn)
    for s in range(0, x.shape[0], chunk):
        per_sample = fn(detached, buffers, x[s:s + chunk], y[s:s + chunk])
        scale = clip_scales(per_sample, clip_norm)
        for k, g in per_sample.items():
            total[k] += weighted_row_sum64(g, scale)
    return total
