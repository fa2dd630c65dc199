"""Smoothed ternary quantization of gradients (docs/design.md §4) — the public API over the ops.

Our formulation (the paper's abstract gives no formulas): each coordinate v is quantized by
q_tau(v + sigma * Z) with Z standard normal. Two modes:

* ``analytic``: outputs the most likely class (ties to 0). That is a deterministic threshold
  quantizer at +-beta(tau, sigma), with beta solving p+ = p0, and its certified radius is the exact
  distance | |v| - beta | to the decision boundary. **In this mode smoothing only moves the
  threshold**: no noise is drawn, and the kernel is bandwidth-bound.
* ``mc``: Cohen et al.'s CERTIFY, per coordinate: n0 selection draws pick the class c_A, n further
  draws count k_A, and if the Clopper-Pearson lower bound pA_low of k_A / n (confidence 1 - alpha)
  exceeds 1/2 the code is c_A with radius sigma * PhiInv(pA_low); else the coordinate abstains
  (code 0, radius 0). Radii hold with probability 1 - alpha per coordinate.

Randomness follows the RNG contract (docs/design.md §3): explicit seed and offset; an ``mc`` call
consumes ceil((n0 + n) / 4) Philox blocks per element, and `SmoothedQuantizer` advances its offset
by that much per call so every step draws fresh numbers and a run replays from (seed, step).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Sequence
import numpy as np
import torch

from .. import ops as _ops
from ..checks import as_tensor_list, check_count, check_float_list, seed_args
from ..rng import blocks_for_draws, call_offset

MODES = ("analytic", "mc")
NONFINITE_POLICIES = ("error", "skip")


# ---- host-side constants ------------------------------------------------------------------------

@functools.lru_cache(maxsize=256)
def analytic_threshold(tau: float, sigma: float) -> float:
    """beta(tau, sigma): where p+ = p0 for v >= 0, solved in float64 (bisection).

    0 <= beta <= tau; beta = 0 (a plain sign quantizer) when tau / sigma <= ~0.4307, because class 0
    then never wins; beta -> tau as tau / sigma grows.
    """
    from scipy.special import ndtr

    _check_tau_sigma(tau, sigma)

    def excess(v: float) -> float:  # p+ - p0 at v >= 0; p0 from the tails so it keeps precision
        p_pos = ndtr((v - tau) / sigma)
        p_zero = 1.0 - ndtr((v - tau) / sigma) - ndtr((-tau - v) / sigma)
        return p_pos - p_zero

    if tau == 0.0 or excess(0.0) >= 0.0:
        return 0.0
    lo, hi = 0.0, float(tau)  # excess(lo) < 0 <= excess(hi)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if excess(mid) < 0.0:
            lo = mid
        else:
            hi = mid
    return hi


@functools.lru_cache(maxsize=64)
def _radius_table_np(n: int, alpha: float) -> np.ndarray:
    from scipy.special import ndtri
    from scipy.stats import beta as beta_dist

    k = np.arange(n + 1)
    # One-sided Clopper-Pearson lower bound of k / n at confidence 1 - alpha.
    with np.errstate(all="ignore"):
        p_low = np.where(k > 0, beta_dist.ppf(alpha, np.maximum(k, 1), n - k + 1), 0.0)
    phi_inv = np.where(p_low > 0.5, ndtri(np.clip(p_low, 0.5, 1.0)), -1.0)
    table = phi_inv.astype(np.float32)
    # Round toward zero so a float32 entry never exceeds the float64 value (radii stay sound).
    too_big = table.astype(np.float64) > phi_inv
    table[too_big] = np.nextafter(table[too_big], np.float32(-np.inf))
    return table


def radius_table(n: int, alpha: float = 1e-3, device="cpu") -> torch.Tensor:
    """PhiInv(Clopper-Pearson lower bound of k / n) for k = 0..n, float32, rounded down.

    Entries <= 0 mean pA_low <= 1/2: the kernel abstains there.
    """
    n = check_count(n, "n")
    if n < 1:
        raise ValueError(f"n (estimation draws) must be >= 1, got {n}")
    if n > MAX_DRAWS:  # before numpy allocates (n + 1)-entry tables
        raise ValueError(f"n must be at most {MAX_DRAWS}, got {n}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return torch.from_numpy(_radius_table_np(int(n), float(alpha)).copy()).to(device)


def blocks_per_element(mode: str, n0: int, n: int) -> int:
    """Philox blocks one call consumes per element (the offset advance per step)."""
    return 0 if mode == "analytic" else blocks_for_draws(n0 + n)


# ---- argument checks ----------------------------------------------------------------------------

def _check_tau_sigma(tau: float, sigma: float) -> None:
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau >= 0):
        raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")


def _check_mode(mode: str, n0: int, n: int) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "mc":
        n0, n = check_count(n0, "n0"), check_count(n, "n")
        if n0 < 1:
            raise ValueError(f"n0 (selection draws) must be >= 1, got {n0}")
        if n < 1:
            raise ValueError(f"n (estimation draws) must be >= 1, got {n}")
        if n0 + n > MAX_DRAWS:  # checked before the radius table is built
            raise ValueError(f"n0 + n must be at most {MAX_DRAWS}, got {n0 + n}")


# The kernels count draws in int32 (and the C++ checks refuse more).
MAX_DRAWS = 1 << 30


def check_smoothing_config(tau: float, sigma: float, mode: str = "analytic", n0: int = 16, n: int = 64,
                           alpha: float = 1e-3) -> None:
    """Raises ValueError unless (tau, sigma, mode, n0, n, alpha) is a usable smoothing
    configuration; what a trainer or SmoothedQuantizer checks when built, not at its first step."""
    _check_tau_sigma(tau, sigma)
    _check_mode(mode, n0, n)
    if not (isinstance(alpha, (int, float)) and 0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if mode == "mc" and int(n0) + int(n) > MAX_DRAWS:
        raise ValueError(f"n0 + n must be at most {MAX_DRAWS}, got {int(n0) + int(n)}")


def _check_policy(nonfinite: str) -> None:
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")


# ---- results ------------------------------------------------------------------------------------

@dataclass
class SmoothingStats:
    """Statistics of one smoothing op, kept as tensors (no device sync until read): `min_radius_t`
    is a float32 scalar, `counts` = [abstained, nonfinite, radii below count_below]."""
    min_radius_t: torch.Tensor
    counts: torch.Tensor

    @property
    def min_radius(self) -> float:
        return float(self.min_radius_t)

    @property
    def abstained(self) -> int:
        return int(self.counts[0])

    @property
    def nonfinite(self) -> int:
        return int(self.counts[1])

    @property
    def below(self) -> int:
        return int(self.counts[2])


@dataclass
class QuantizeResult(SmoothingStats):
    """Codes (int8, shaped like each gradient) and certified radii (float32), with the statistics."""
    codes: list = field(default_factory=list)
    radii: list = field(default_factory=list)

    @classmethod
    def from_op(cls, out) -> "QuantizeResult":
        """From an op's (codes, radii, min_radius, counts) tuple."""
        return cls(out[2], out[3], list(out[0]), list(out[1]))


@dataclass
class StepStats(SmoothingStats):
    """Statistics of one fused quantized step; `applied` is False when a non-finite gradient made
    the step skip (policy 'skip'), in which case no parameter changed."""

    @property
    def applied(self) -> bool:
        return self.nonfinite == 0


def _empty_stats(device="cpu"):
    return (torch.tensor(float("inf"), device=device),
            torch.zeros(3, dtype=torch.int64, device=device))


def _raise_nonfinite(count: int, what: str) -> None:
    raise FloatingPointError(
        f"unlearn_ext: {count} gradient entries are NaN or Inf; {what}. Pass nonfinite='skip' to "
        "skip such steps instead of raising.")


# ---- functional API -----------------------------------------------------------------------------

def smooth_quantize(grads, *, tau: float, sigma: float, mode: str = "analytic", n0: int = 16,
                    n: int = 64, alpha: float = 1e-3, seed: int = 0, offset: int = 0,
                    count_below: float = 0.0, nonfinite: str = "error") -> QuantizeResult:
    """Smoothed ternary codes and certified radii of a list of gradients (one long vector).

    nonfinite='error' raises on NaN/Inf; 'skip' gives those coordinates code 0 and radius 0 and
    reports their number in `counts[1]`.
    """
    grads = as_tensor_list(grads, "grads")
    _check_tau_sigma(tau, sigma)
    _check_mode(mode, n0, n)
    _check_policy(nonfinite)
    check_float_list(grads, "grads")
    s_seed, s_offset = seed_args(seed, offset)
    if not grads:
        return QuantizeResult(*_empty_stats())
    if grads[0].device.type == "meta":  # the radii and counts are data; call the op to trace without values
        raise ValueError("unlearn_ext: smooth_quantize returns the smallest radius and the abstained and "
                         "non-finite counts, which meta tensors do not hold; use "
                         "torch.ops.unlearn_ext.quantize_analytic / quantize_mc instead")
    if mode == "analytic":
        out = _ops.quantize_analytic(grads, analytic_threshold(float(tau), float(sigma)), float(count_below))
    else:
        table = radius_table(int(n), float(alpha), grads[0].device)
        out = _ops.quantize_mc(grads, float(tau), float(sigma), int(n0), int(n), table, s_seed,
                               s_offset, float(count_below))
    result = QuantizeResult.from_op(out)
    if nonfinite == "error" and result.nonfinite:
        _raise_nonfinite(result.nonfinite, "their codes were set to 0")
    return result


def smooth_quantize_step_(params, grads, *, step_size: float, tau: float, sigma: float,
                          mode: str = "analytic", n0: int = 16, n: int = 64, alpha: float = 1e-3,
                          seed: int = 0, offset: int = 0, count_below: float = 0.0,
                          nonfinite: str = "error") -> StepStats:
    """In place: params <- params - step_size * code(grads), statistics reduced in the same pass.

    A gradient holding NaN/Inf leaves every parameter untouched; nonfinite='error' then raises,
    'skip' returns stats with applied=False.
    """
    params, grads = as_tensor_list(params, "params"), as_tensor_list(grads, "grads")
    _check_tau_sigma(tau, sigma)
    _check_mode(mode, n0, n)
    _check_policy(nonfinite)
    if not math.isfinite(step_size):
        raise ValueError(f"step_size must be finite, got {step_size}")
    if len(params) != len(grads):
        raise ValueError(f"params has {len(params)} tensors but grads has {len(grads)}")
    check_float_list(grads, "grads")
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.shape != g.shape or p.dtype != g.dtype or p.device != g.device:
            raise ValueError(f"params[{i}] ({tuple(p.shape)}, {p.dtype}, {p.device}) does not match "
                             f"grads[{i}] ({tuple(g.shape)}, {g.dtype}, {g.device})")
    s_seed, s_offset = seed_args(seed, offset)
    if not grads:
        return StepStats(*_empty_stats())
    with torch.no_grad():
        if mode == "analytic":
            out = _ops.quantized_step_analytic_(params, grads, analytic_threshold(float(tau), float(sigma)),
                                                float(step_size), float(count_below), True)
        else:
            table = radius_table(int(n), float(alpha), grads[0].device)
            out = _ops.quantized_step_mc_(params, grads, float(tau), float(sigma), int(n0), int(n), table,
                                          s_seed, s_offset, float(step_size), float(count_below), True)
    stats = StepStats(out[0], out[1])
    if nonfinite == "error" and stats.nonfinite:
        _raise_nonfinite(stats.nonfinite, "no parameter was changed")
    return stats


# ---- the training-loop helper -------------------------------------------------------------------

class SmoothedQuantizer:
    """Holds a smoothing configuration and the RNG position across training steps.

    >>> q = SmoothedQuantizer(tau=0.1, sigma=0.05, mode="mc", seed=1234)
    >>> stats = q.step_(model.parameters(), [p.grad for p in model.parameters()], step_size=0.1)

    Each `quantize`/`step_` call uses the current offset and advances it by the blocks it consumed,
    so a run replays exactly from (seed, step index); `state_dict` / `load_state_dict` keep that.
    """

    def __init__(self, tau: float, sigma: float, mode: str = "analytic", n0: int = 16, n: int = 64,
                 alpha: float = 1e-3, seed: int = 0, nonfinite: str = "error"):
        check_smoothing_config(tau, sigma, mode, n0, n, alpha)
        _check_policy(nonfinite)
        seed_args(seed, 0)
        self.tau, self.sigma, self.mode = float(tau), float(sigma), mode
        self.n0, self.n, self.alpha, self.seed = int(n0), int(n), float(alpha), int(seed)
        self.nonfinite = nonfinite
        self.offset = 0
        self.steps = 0

    @property
    def beta(self) -> float:
        """The analytic-mode threshold (also informative in mc mode: the noise-free argmax)."""
        return analytic_threshold(self.tau, self.sigma)

    @property
    def blocks_per_call(self) -> int:
        return blocks_per_element(self.mode, self.n0, self.n)

    def _kwargs(self, count_below: float) -> dict:
        return dict(tau=self.tau, sigma=self.sigma, mode=self.mode, n0=self.n0, n=self.n,
                    alpha=self.alpha, seed=self.seed, offset=self.offset, count_below=count_below,
                    nonfinite=self.nonfinite)

    def _advance(self) -> None:
        self.offset = call_offset(1, self.blocks_per_call, self.offset)
        self.steps += 1

    def quantize(self, grads, count_below: float = 0.0) -> QuantizeResult:
        result = smooth_quantize(grads, **self._kwargs(count_below))
        self._advance()
        return result

    def step_(self, params, grads, step_size: float, count_below: float = 0.0) -> StepStats:
        stats = smooth_quantize_step_(list(params), list(grads), step_size=step_size,
                                      **self._kwargs(count_below))
        self._advance()  # a skipped step still consumes its draws, so replays stay aligned
        return stats

    def state_dict(self) -> dict:
        return {"tau": self.tau, "sigma": self.sigma, "mode": self.mode, "n0": self.n0, "n": self.n,
                "alpha": self.alpha, "seed": self.seed, "offset": self.offset, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.__init__(state["tau"], state["sigma"], state["mode"], state["n0"], state["n"],
                      state["alpha"], state["seed"], self.nonfinite)
        self.offset, self.steps = int(state["offset"]), int(state["steps"])


# ---- framework D: data smoothing with vote counters ----------------------------------------------

def vote_accumulate_(votes, grads, *, tau: float) -> int:
    """Adds one gradient sample's ternary votes into int16/int32 counters of shape (2, *g.shape)."""
    votes, grads = as_tensor_list(votes, "votes"), as_tensor_list(grads, "grads")
    _check_tau_sigma(tau, 1.0)
    check_float_list(grads, "grads")
    if len(votes) != len(grads):
        raise ValueError(f"votes has {len(votes)} tensors but grads has {len(grads)}")
    if not grads:
        return 0
    if grads[0].device.type == "meta":  # the count is data; call the op to trace without values
        raise ValueError("unlearn_ext: vote_accumulate_ returns how many gradient entries are non-finite, "
                         "which meta tensors do not hold; use torch.ops.unlearn_ext.vote_accumulate_ instead")
    return int(_ops.vote_accumulate_(votes, grads, float(tau)))


def vote_finalize(selection_votes, estimation_votes, *, n0: int, n: int, sigma: float,
                  alpha: float = 1e-3, count_below: float = 0.0) -> QuantizeResult:
    """Codes and radii (sigma = the data-noise scale, so radii are in input-noise units) from counts."""
    sel, est = as_tensor_list(selection_votes, "selection_votes"), as_tensor_list(estimation_votes, "estimation_votes")
    _check_tau_sigma(0.0, sigma)
    _check_mode("mc", n0, n)
    if len(sel) != len(est):
        raise ValueError(f"selection_votes has {len(sel)} tensors but estimation_votes has {len(est)}")
    if not sel:
        return QuantizeResult(*_empty_stats())
    for name, votes, total in (("selection_votes", sel, n0), ("estimation_votes", est, n)):
        for i, v in enumerate(votes):
            if v.numel() and v.device.type != "meta" and (int(v.min()) < 0 or int(v.sum(0).max()) > total):
                raise ValueError(f"{name}[{i}] holds counts outside [0, {total}] per coordinate; "
                                 f"were exactly {total} samples accumulated into it?")
    _ops.check_device(sel[0].device)
    table = radius_table(int(n), float(alpha), sel[0].device)
    out = _ops.vote_finalize(sel, est, int(n0), int(n), table, float(sigma), float(count_below))
    return QuantizeResult.from_op(out)


class VoteCounter:
    """Framework D bookkeeping: n0 selection samples, then n estimation samples, then finalize.

    Counters are int16 when n0 and n fit (half the memory), else int32.
    """

    def __init__(self, like: Sequence[torch.Tensor], *, tau: float, sigma_data: float, n0: int,
                 n: int, alpha: float = 1e-3):
        _check_tau_sigma(tau, sigma_data)
        _check_mode("mc", n0, n)
        if max(n0, n) >= 2**31:
            raise ValueError("n0 and n must be < 2^31")
        dtype = torch.int16 if max(n0, n) < 2**15 else torch.int32
        like = as_tensor_list(like, "like")
        self.selection = [torch.zeros((2, *t.shape), dtype=dtype, device=t.device) for t in like]
        self.estimation = [torch.zeros((2, *t.shape), dtype=dtype, device=t.device) for t in like]
        self.tau, self.sigma_data, self.n0, self.n, self.alpha = tau, sigma_data, n0, n, alpha
        self.added = 0
        self.nonfinite = 0

    def add(self, grads) -> None:
        """Votes of one noisy-data gradient: the first n0 go to selection, the next n to estimation."""
        if self.added >= self.n0 + self.n:
            raise RuntimeError(f"VoteCounter already holds n0 + n = {self.n0 + self.n} samples")
        target = self.selection if self.added < self.n0 else self.estimation
        self.nonfinite += vote_accumulate_(target, grads, tau=self.tau)
        self.added += 1

    def finalize(self, count_below: float = 0.0) -> QuantizeResult:
        if self.added != self.n0 + self.n:
            raise RuntimeError(f"VoteCounter holds {self.added} samples; finalize needs n0 + n = "
                               f"{self.n0 + self.n}")
        return vote_finalize(self.selection, self.estimation, n0=self.n0, n=self.n,
                             sigma=self.sigma_data, alpha=self.alpha, count_below=count_below)
