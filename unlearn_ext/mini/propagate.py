"""Segment-by-segment spectral propagation of the trajectory gap (DESIGN section 6, step 3).

The gap e_t = w'_t - w_t between the retrained and the original run follows, to first order,
    e_{t+1} = (I - eta_t H) e_t - eta_t delta_t.
In the basis U of Ritz vectors (and the complement, where the curvature is taken as h_perp), over
the steps t of one segment this sums to
    e <- U[P(theta) U^T e - Phi_s(theta) U^T delta_s - Phi_e(theta) U^T delta_e]
         + P(h_perp) e_perp - Phi_s(h_perp) delta_s_perp - Phi_e(h_perp) delta_e_perp,
with P(h) = prod_t (1 - eta_t h) and Phi(h) = sum_t eta_t prod_{t' > t}(1 - eta_t' h), split in two.

Our choice (beyond DESIGN's single anchor per segment): delta_t is interpolated linearly in t
between the anchors at the segment's start (delta_s, weight 1 - alpha_t) and end (delta_e, weight
alpha_t = (t - start) / length). With one step per segment delta_t is exactly delta(w_t) at the
step's own weights, so full-batch GD on a quadratic objective with an anchor at every step
reproduces retraining exactly; over longer segments it is a better quadrature than either end.
"""
from __future__ import annotations

import torch

from .curvature import Spectrum


def segment_filters(etas: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, Phi_s, Phi_e) for each curvature value in h, over the steps with learning rates etas."""
    etas = etas.double().reshape(-1, 1)
    h = h.double().reshape(1, -1)
    L = etas.shape[0]
    factors = 1.0 - etas * h                                             # [L, m]
    # after[t] = prod_{t' > t} factors[t']: a reversed cumulative product shifted by one.
    rev = torch.cumprod(factors.flip(0), dim=0).flip(0)                  # prod_{t' >= t}
    after = torch.cat([rev[1:], torch.ones_like(rev[:1])], dim=0)
    alpha = (torch.arange(L, dtype=torch.float64) / L).reshape(-1, 1)
    weighted = etas * after
    return rev[0], (weighted * (1 - alpha)).sum(0), (weighted * alpha).sum(0)


def propagate_segment(e: torch.Tensor, spectrum: Spectrum, etas: torch.Tensor, delta_start: torch.Tensor,
                      delta_end: torch.Tensor) -> torch.Tensor:
    """The gap after one segment (float64 vectors)."""
    U = spectrum.basis
    h = torch.cat([spectrum.thetas, torch.tensor([spectrum.h_perp], dtype=torch.float64)])
    P, Ps, Pe = segment_filters(etas, h)

    def split(v):
        c = U.T @ v
        return c, v - U @ c

    (ce, pe), (cs, ps), (cd, pd) = split(e), split(delta_start), split(delta_end)
    k = spectrum.thetas.numel()
    inside = U @ (P[:k] * ce - Ps[:k] * cs - Pe[:k] * cd)
    return inside + P[k] * pe - Ps[k] * ps - Pe[k] * pd
