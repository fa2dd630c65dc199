"""Segment-by-segment spectral propagation of the trajectory gap (docs/design.md §6, step 3; our
formulation: linear response of SGD).

The gap e_t = w'_t - w_t between the retrained and the original run follows, to first order,
    e_{t+1} = (I - eta_t H) e_t - eta_t delta_t.
In the basis U of Ritz vectors (and the complement, where the curvature is taken as h_perp), over
the steps t of one segment this sums to
    e <- U[P(theta) U^T e - Phi(theta) U^T delta] + P(h_perp) e_perp - Phi(h_perp) delta_perp,
with P(h) = prod_t (1 - eta_t h) and Phi(h) = sum_t eta_t prod_{t' > t}(1 - eta_t' h) = (1 - P(h))/h.

Which drift delta a segment uses (`DELTA_RULES`):
  "end"    (the default): delta_k of the anchor closing the segment, constant over it.
  "interp" (an experiment): delta_t interpolated linearly in t between the anchors at the
           segment's start (weight 1 - alpha_t) and end (alpha_t = (t - start) / length). With one
           step per segment this is delta(w_t) at the step's own weights, so full-batch GD on a
           quadratic with an anchor at every step is reproduced exactly (a test of the algebra).
           With a truncated curvature (k Ritz vectors + h_perp) it is clearly worse on digits:
           mean d/d0 0.64 vs 0.39 for "end" (logreg, seeds 100/101, m = 1024, k = 10) — the
           early anchors' drift lies outside the Krylov space built from delta_K.

Momentum (our derivation, for torch.optim.SGD with dampening 0). torch's step t is
    g_t = grad L_B(w_t) + wd w_t,  b_{t+1} = mu b_t + g_t  (b_0 = 0, so b_1 = g_0),
    heavy ball: w_{t+1} = w_t - eta_t b_{t+1};   Nesterov: w_{t+1} = w_t - eta_t (g_t + mu b_{t+1}).
With e_t = w'_t - w_t and f_t = b'_t - b_t (retrained minus original; e_0 = f_0 = 0), the retrained
gradient is to first order g'_t = g_t + H e_t + delta_t, so the pair (e, f) follows a linear
recursion; along a curvature direction h, with x_t = (e_t, f_t):
    heavy ball: x_{t+1} = [[1 - eta h, -eta mu], [h, mu]] x_t + (-eta, 1) delta_t
    Nesterov:   x_{t+1} = [[1 - eta (1 + mu) h, -eta mu^2], [h, mu]] x_t + (-eta (1 + mu), 1) delta_t
(the f row is f_{t+1} = mu f_t + h e_t + delta_t; the e row substitutes it into the w update).
A segment's map is the product of these 2x2 blocks over its steps and its drift response the sum
of the drive vectors carried through the later blocks: `momentum_segment_maps` forms both at once as
a product of 4x4 affine blocks on (e, f, delta_start, delta_end), per Ritz value and for h_perp.
With mu = 0 the e row is the plain recursion (f is then never read); the plain path below is kept
as it was (bit for bit) and the momentum path runs only for mu > 0.
Stability (constant eta, our derivation): the block's characteristic polynomial is
z^2 - (1 + mu - eta h) z + mu (heavy ball) or z^2 - (1 + mu)(1 - eta h) z + mu (1 - eta h)
(Nesterov); by the Jury conditions both roots lie inside the unit circle for 0 <= mu < 1 exactly
while 0 < eta h < 2 (1 + mu) (heavy ball) or 0 < eta h < 2 (1 + mu) / (1 + 2 mu) (Nesterov):
`stability_bound`.

Edge of stability (`unstable="equilibrium"` of MiniUnlearner, plain SGD; our formula): a Ritz
direction with eta_t * theta >= 2 at some step of a segment has |1 - eta_t theta| >= 1 there, so
the linear recursion does not contract and P(theta) grows without bound. Well-tuned SGD on real
networks trains at that edge (eta * lambda_max ~ 2), where the nonlinear dynamics keep the top
directions bounded instead. In such a direction we take the recursion's fixed point
e = -delta / theta (what the response of every stable direction tends to over a long segment:
P -> 0, Phi -> 1 / theta) in place of the diverging sum: P = 0, Phi = 1 / theta on the segment's
end drift. Stable directions and the complement are propagated as before, bit for bit.
"""
from __future__ import annotations

import torch

from .curvature import Spectrum

DELTA_RULES = ("end", "interp")
UNSTABLE = ("refuse", "equilibrium")


def segment_filters(etas: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, Phi_s, Phi_e) for each curvature value in h, over the steps with learning rates etas:
    Phi_s + Phi_e = Phi, split by the interpolation weights (1 - alpha_t, alpha_t)."""
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


def propagate_segment(e: torch.Tensor, spectrum: Spectrum, etas: torch.Tensor, delta_start: torch.Tensor | None,
                      delta_end: torch.Tensor, rule: str = "end", edge: float | None = None) -> torch.Tensor:
    """The gap after one segment (float64 vectors). rule "end" ignores delta_start. edge: with a
    value (2 for plain SGD), the Ritz directions with max eta_t * theta >= edge take the fixed point
    -delta / theta (`edge_directions`; module docstring); None propagates every direction."""
    if rule not in DELTA_RULES:
        raise ValueError(f"delta rule must be one of {DELTA_RULES}, got {rule!r}")
    U = spectrum.basis
    h = torch.cat([spectrum.thetas, torch.tensor([spectrum.h_perp], dtype=torch.float64)])
    P, Ps, Pe = segment_filters(etas, h)
    if rule == "end":  # the whole Phi on delta_end
        Ps, Pe = torch.zeros_like(Ps), Ps + Pe
        delta_start = torch.zeros_like(delta_end)
    k = spectrum.thetas.numel()
    if edge is not None:
        at_edge = edge_directions(spectrum, etas, edge)
        if at_edge.any():
            P, Ps, Pe = P.clone(), Ps.clone(), Pe.clone()
            inside = torch.zeros_like(P, dtype=torch.bool)
            inside[:k] = at_edge
            P[inside], Ps[inside], Pe[inside] = 0.0, 0.0, 1.0 / h[inside]

    def split(v):
        c = U.T @ v
        return c, v - U @ c

    (ce, pe), (cs, ps), (cd, pd) = split(e), split(delta_start), split(delta_end)
    inside = U @ (P[:k] * ce - Ps[:k] * cs - Pe[:k] * cd)
    return inside + P[k] * pe - Ps[k] * ps - Pe[k] * pd


def edge_directions(spectrum: Spectrum, etas: torch.Tensor, edge: float) -> torch.Tensor:
    """Which Ritz directions reach eta_t * theta >= edge at some step of `etas` (bool [k])."""
    if etas.numel() == 0:
        return torch.zeros(spectrum.thetas.numel(), dtype=torch.bool)
    return float(etas.double().max()) * spectrum.thetas >= edge


# ---- momentum (heavy ball / Nesterov, dampening 0): the pair (e, f) -----------------------------------

def stability_bound(momentum: float = 0.0, nesterov: bool = False, limit: float = 2.0) -> float:
    """The largest eta * h for which the linear response contracts: `limit` (2 for plain SGD) times
    (1 + mu) for heavy ball or (1 + mu) / (1 + 2 mu) for Nesterov (module docstring)."""
    mu = float(momentum)
    if nesterov:
        return limit * (1.0 + mu) / (1.0 + 2.0 * mu)
    return limit * (1.0 + mu)


def gap_bound_factor(momentum: float = 0.0) -> float:
    """How much the total learning rate Lambda grows for the ||e|| check: 1 / (1 - mu). In a flat
    direction (h -> 0) a constant drift delta builds the buffer gap up to delta / (1 - mu), so the
    gap moves by Lambda / (1 - mu) * ||delta|| at most (heavy ball and Nesterov alike). For h > 0
    we checked it numerically (constant eta, 1-200 steps, mu up to 0.99, the whole stable range of
    eta h): the response stayed below 0.96 of it. Our bound, not a theorem."""
    return 1.0 / (1.0 - float(momentum))


def momentum_step_blocks(etas: torch.Tensor, h: torch.Tensor, momentum: float, nesterov: bool) -> torch.Tensor:
    """The affine maps of single steps on (e, f, delta_start, delta_end), [L, m, 4, 4] float64, for
    each step's eta (L) and curvature value (m); the drift of step t is
    (1 - alpha_t) delta_start + alpha_t delta_end with alpha_t = t / L (as segment_filters)."""
    etas = etas.double().reshape(-1, 1)
    h = h.double().reshape(1, -1)
    L, m = etas.shape[0], h.shape[1]
    mu = float(momentum)
    gain = 1.0 + mu if nesterov else 1.0          # how much of g_t the step applies at once
    carry = mu * mu if nesterov else mu           # how much of the old buffer it applies
    alpha = (torch.arange(L, dtype=torch.float64) / L).reshape(-1, 1)
    G = torch.zeros(L, m, 4, 4, dtype=torch.float64)
    G[..., 0, 0] = 1.0 - gain * etas * h
    G[..., 0, 1] = (-carry * etas).expand(L, m)
    G[..., 1, 0] = h.expand(L, m)
    G[..., 1, 1] = mu
    drive_e, drive_f = (-gain * etas).expand(L, m), torch.ones(L, m, dtype=torch.float64)
    G[..., 0, 2], G[..., 1, 2] = drive_e * (1 - alpha), drive_f * (1 - alpha)
    G[..., 0, 3], G[..., 1, 3] = drive_e * alpha, drive_f * alpha
    G[..., 2, 2] = G[..., 3, 3] = 1.0
    return G


def chain(blocks: torch.Tensor) -> torch.Tensor:
    """blocks[L-1] @ ... @ blocks[0] (the later step on the left) over the first dimension, by pairwise
    products (log2 L batched matmuls instead of L sequential ones)."""
    while blocks.shape[0] > 1:
        if blocks.shape[0] % 2:  # an identity after the last step keeps the pairs aligned
            eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype).expand(1, *blocks.shape[1:])
            blocks = torch.cat([blocks, eye], dim=0)
        blocks = blocks[1::2] @ blocks[0::2]
    return blocks[0]


def propagate_segment_momentum(e: torch.Tensor, f: torch.Tensor, spectrum: Spectrum, etas: torch.Tensor,
                               delta_start: torch.Tensor | None, delta_end: torch.Tensor, momentum: float,
                               nesterov: bool, rule: str = "end") -> tuple[torch.Tensor, torch.Tensor]:
    """The gaps (e, f) of weights and momentum buffer after one segment (float64 vectors), for
    heavy-ball or Nesterov momentum mu > 0. rule "end" ignores delta_start."""
    if rule not in DELTA_RULES:
        raise ValueError(f"delta rule must be one of {DELTA_RULES}, got {rule!r}")
    U = spectrum.basis
    h = torch.cat([spectrum.thetas, torch.tensor([spectrum.h_perp], dtype=torch.float64)])
    A = chain(momentum_step_blocks(etas, h, momentum, nesterov))      # [m, 4, 4]
    if rule == "end":  # the whole drift response on delta_end
        A = A.clone()
        A[:, :2, 3] += A[:, :2, 2]
        A[:, :2, 2] = 0.0
        delta_start = torch.zeros_like(delta_end)

    def split(v):
        c = U.T @ v
        return c, v - U @ c

    parts = [split(v) for v in (e, f, delta_start, delta_end)]
    k = spectrum.thetas.numel()
    inside = [sum(A[:k, row, col] * parts[col][0] for col in range(4)) for row in (0, 1)]
    outside = [sum(A[k, row, col] * parts[col][1] for col in range(4)) for row in (0, 1)]
    return U @ inside[0] + outside[0], U @ inside[1] + outside[1]
