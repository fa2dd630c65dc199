"""Curvature of the retained objective at given weights (docs/design.md §6, step 2).

H v ~ (1/|S|) sum_{i in S} hess l_i(w) v + weight_decay * v, S drawn uniformly at random (seeded)
from the retained samples (all of them when |R| <= m): an unbiased sample of the retained Hessian.
Each product is one forward-over-reverse pass (torch.func.jvp of torch.func.grad) over the whole
subsample at once — batched, no loop per sample — costing 2|S| sample-gradient equivalents.

`lanczos` runs k steps with full reorthogonalization and returns the Ritz pairs; `exact_spectrum`
builds the whole Hessian (small models only: tests compare the two).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.func import grad, jvp

from .vectors import FlatModel


@dataclass
class Spectrum:
    """Ritz pairs of the curvature: basis [d, k] (orthonormal, float64), thetas [k] (clipped at 0),
    h_perp (the smallest positive Ritz value: the curvature assumed in the complement of the
    basis), raw Ritz values before clipping, and the HVPs' sample-gradient cost."""
    basis: torch.Tensor
    thetas: torch.Tensor
    h_perp: float
    ritz: list
    sample_gradients: int = 0


def subsample(retained: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """`size` retained ids drawn uniformly without replacement (all of them when fewer), sorted."""
    if size < 1:
        raise ValueError(f"curvature subsample size must be >= 1, got {size}")
    if retained.numel() <= size:
        return retained.clone()
    rng = np.random.default_rng([int(seed), 0x4D494E49])  # "MINI": a stream of its own
    pick = torch.from_numpy(rng.choice(retained.numel(), size, replace=False))
    return retained[pick].sort().values


class HessianOperator:
    """v -> H v of the mean loss over `ids` plus weight_decay * v, at flat weights w (float64 in/out)."""

    def __init__(self, flat: FlatModel, w: torch.Tensor, ids: torch.Tensor, weight_decay: float):
        self.flat, self.w, self.wd = flat, w.detach().float(), float(weight_decay)
        self.x, self.y = flat.data.batch(ids)
        self.count = int(ids.numel())
        self.products = 0
        self._grad = grad(lambda p: flat.loss_sum(p, self.x, self.y) / self.count)
        self._forward_mode = True  # forward-over-reverse while every kernel supports it

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.products += 1
        # Fused attention kernels (flash, memory-efficient) have neither forward-mode nor double
        # derivatives; the math kernel computes the same attention and has both.
        with sdpa_kernel([SDPBackend.MATH]):
            return self._product(v)

    def _product(self, v: torch.Tensor) -> torch.Tensor:
        if self._forward_mode:
            try:
                hv = jvp(self._grad, (self.w,), (v.float(),))[1]
                return hv.double() + self.wd * v.double()
            except (RuntimeError, NotImplementedError) as exc:
                # Where torch's forward mode cannot go through an operation -- one without a
                # forward-mode derivative, one torch.func cannot transform (an old-style
                # autograd.Function), a decomposition that rejects what the ordinary kernel takes
                # (uint8 class targets, channels_last inputs) -- torch raises exactly RuntimeError or
                # NotImplementedError; from then on reverse-over-reverse (double backward) gives the
                # same product. An error class of the model's or the loss's own (a subclass)
                # propagates untouched, and one that double backward raises too is raised as it
                # first came.
                if type(exc) not in (RuntimeError, NotImplementedError):
                    raise
                try:
                    hv = self._reverse_over_reverse(v)
                except (RuntimeError, NotImplementedError):
                    raise exc from None
                self._forward_mode = False
                return hv
        return self._reverse_over_reverse(v)

    def _reverse_over_reverse(self, v: torch.Tensor) -> torch.Tensor:
        leaf = self.w.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(self.flat.loss_sum(leaf, self.x, self.y) / self.count, leaf, create_graph=True)
        (hv,) = torch.autograd.grad(g @ v.float(), leaf)
        return hv.double() + self.wd * v.double()

    @property
    def sample_gradients(self) -> int:
        return 2 * self.count * self.products


def lanczos(op, start: torch.Tensor, steps: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """k-step Lanczos with full reorthogonalization (two Gram-Schmidt passes against every earlier
    vector) from `start`. Returns (Q [d, k] orthonormal, T [k, k] tridiagonal), float64. When the
    Krylov space is exhausted (beta ~ 0) it continues from a seeded random vector orthogonal to Q,
    so k = d gives a full basis."""
    d = start.numel()
    k = min(int(steps), d)
    if k < 1:
        raise ValueError(f"Lanczos needs >= 1 step, got {steps}")
    gen = torch.Generator().manual_seed(int(seed))
    Q = torch.zeros(d, k, dtype=torch.float64)
    alpha, beta = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    q = start.double()
    if q.norm() == 0:
        q = torch.randn(d, generator=gen, dtype=torch.float64)
    q = q / q.norm()
    for j in range(k):
        Q[:, j] = q
        r = op(q)
        alpha[j] = torch.dot(q, r)
        for _ in range(2):  # full reorthogonalization, twice ("twice is enough")
            r = r - Q[:, :j + 1] @ (Q[:, :j + 1].T @ r)
        if j + 1 == k:
            break
        b = r.norm()
        scale = max(abs(float(alpha[j])), 1.0)
        if b <= 1e-10 * scale:  # invariant subspace found: restart orthogonally, no coupling
            beta[j] = 0.0
            r = torch.randn(d, generator=gen, dtype=torch.float64)
            for _ in range(2):
                r = r - Q[:, :j + 1] @ (Q[:, :j + 1].T @ r)
            q = r / r.norm()
        else:
            beta[j] = b
            q = r / b
    T = torch.diag(alpha) + torch.diag(beta[:k - 1], 1) + torch.diag(beta[:k - 1], -1)
    return Q, T


def ritz_spectrum(Q: torch.Tensor, T: torch.Tensor, sample_gradients: int = 0) -> Spectrum:
    """Ritz pairs of (Q, T); thetas clipped at 0; h_perp the smallest positive Ritz value (clipping
    it to 0 would leave the complement without contraction: docs/design.md §6)."""
    evals, evecs = torch.linalg.eigh(T)
    positive = evals[evals > 0]
    h_perp = float(positive.min()) if positive.numel() else 0.0
    return Spectrum(Q @ evecs, evals.clamp(min=0.0), h_perp, evals.tolist(), sample_gradients)


def lanczos_spectrum(flat: FlatModel, w: torch.Tensor, ids: torch.Tensor, weight_decay: float,
                     start: torch.Tensor, steps: int, seed: int = 0, hessian=HessianOperator) -> Spectrum:
    """hessian: the operator class (HessianOperator; across ranks, one summing the ranks' products)."""
    op = hessian(flat, w, ids, weight_decay)
    Q, T = lanczos(op, start, steps, seed)
    return ritz_spectrum(Q, T, op.sample_gradients)


def exact_spectrum(flat: FlatModel, w: torch.Tensor, ids: torch.Tensor, weight_decay: float,
                   hessian=HessianOperator) -> Spectrum:
    """The whole Hessian (d HVPs), eigendecomposed: every direction is in the basis (small d only)."""
    op = hessian(flat, w, ids, weight_decay)
    H = torch.stack([op(e) for e in torch.eye(flat.dim, dtype=torch.float64)], dim=1)
    H = (H + H.T) / 2
    return ritz_spectrum(torch.eye(flat.dim, dtype=torch.float64), H, op.sample_gradients)
