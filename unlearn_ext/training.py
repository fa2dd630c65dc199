"""A minimal certified-training loop with smoothed quantized gradients (DESIGN section 4, framework G).

Per step: per-sample gradients (torch.func, no Python loop over samples), each clipped to L2 norm C,
summed and divided by the *nominal* batch size b, quantized by the fused kernel and applied as
w <- w - lr * code. Removing k samples from a batch moves the summed gradient by at most k*C/b in
every coordinate, so a step whose smallest radius exceeds m*C/b would produce the same codes without
any m of its samples. This module is the foundation the full PCMU method builds on.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.func import functional_call, grad, vmap

from .smoothing import SmoothedQuantizer


def clipped_gradient_sum(model: torch.nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor,
                         clip_norm: float) -> dict[str, torch.Tensor]:
    """Sum over the batch of per-sample gradients, each clipped to L2 norm `clip_norm`."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def sample_loss(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    norms = torch.sqrt(sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in per_sample.values()))
    scale = torch.clamp(clip_norm / (norms + 1e-12), max=1.0)
    return {k: (g * scale.view(-1, *([1] * (g.dim() - 1)))).sum(0) for k, g in per_sample.items()}


@dataclass
class CertificateLog:
    """Per-step smallest radius; the a-priori budget m* follows from it."""
    clip_norm: float
    batch_size: int
    min_radius: list = field(default_factory=list)
    coordinates: int = 0

    def budget(self) -> int:
        """m*: the largest m with m*C/b < every step's smallest radius (0 if none)."""
        if not self.min_radius:
            return 0
        r = min(self.min_radius)
        unit = self.clip_norm / self.batch_size
        m = int(r // unit)
        m = m - 1 if m * unit >= r else m  # strict inequality
        return max(m, 0)

    def summary(self) -> str:
        r = min(self.min_radius) if self.min_radius else float("nan")
        return (f"steps={len(self.min_radius)} coordinates={self.coordinates} "
                f"min radius={r:.4g} (one removal moves a coordinate by C/b="
                f"{self.clip_norm / self.batch_size:.4g}) -> certified removal budget m*={self.budget()}")


def train_smoothed(model, loss_fn, x, y, *, quantizer: SmoothedQuantizer, lr: float, steps: int,
                   batch_size: int, clip_norm: float, seed: int = 0) -> CertificateLog:
    """Trains in place with fixed per-epoch batches from a seeded permutation; returns the log."""
    n = x.shape[0]
    log = CertificateLog(clip_norm=clip_norm, batch_size=batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    log.coordinates = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for step in range(steps):
        if order.numel() < batch_size:  # new epoch: fresh permutation, fixed cuts
            order = torch.randperm(n, generator=gen)
        batch, order = order[:batch_size], order[batch_size:]
        grads = clipped_gradient_sum(model, loss_fn, x[batch], y[batch], clip_norm)
        mean = [grads[name] / batch_size for name, p in model.named_parameters() if p.requires_grad]
        stats = quantizer.step_(params, mean, step_size=lr)
        log.min_radius.append(stats.min_radius)
    return log
