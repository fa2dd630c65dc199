"""PCMU's rounding margin (our derivation): how far the per-request check's estimate of a retrained
step's value, v - delta, can be from what retraining computes, v'.

The check compares, per fragile coordinate, fl64(v_f32 - delta) with beta_f32 = float32(beta), where
  v_f32 = fl32(v), v = S(batch)/b, delta = S(F)/b, v' = S(batch - F)/b, S = `clipped_sum64`,
and retraining outputs code(fl32(v')) with the same float32 comparison. Three error sources:

1. float32 (proven). |v - v_f32| <= 2^-24 |v|, and |v| <= beta + M C/b + margin at a coordinate
   that can land near the threshold. fl32 is monotone and beta_f32 representable, so
   code(fl32(v')) = code(v') unless |v' - beta_f32| <= half an ulp <= 2^-24 beta. Together:
   2^-24 (2 beta + M C/b) (plus 2^-24 * margin, folded into term 3).
2. float64 sums (proven for layers without positions, T = 1). The factors a, b are float32, so
   a*b is exact in float64; c_i*(a*b) and each addition round once (unit u = 2^-53). For a sum of
   n such terms, |fl - exact| <= gamma_{n+1} sum_i c_i |b_ij a_ik| with gamma_n = n u / (1 - n u)
   (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., section 3.1, any summation
   order, also with FMA). With T = 1, |b_ij a_ik| <= ||g_i|| and c_i ||g_i|| <= C, so the error of a
   sum over the batch divided by the nominal b is <= gamma_{n+1} C. The squared norms are sums of
   non-negative exact squares (relative error <= gamma_n each factor), so the clip factors carry a
   relative error <= gamma_{2n+4}, moving S/b by at most that times C. v, v' and delta each:
   (gamma_{n+1} + gamma_{2n+4}) C, times 3. n is bounded by `MAX_SUM_TERMS` (the trainer checks).
   With positions (T > 1: sequences, convolutions) cancellation between positions can make
   sum_t |b_t||a_t| exceed ||g_i||; we do not bound that ratio: term 3 covers it.
3. the forward/backward pass (an allowance, our choice, not proven). The float32 activations and
   output gradients of one sample depend on the batch's shape (a float32 matrix product's row for
   1, 2, 3, 5 or 9 rows differs from the same row inside 350 rows: measured on this machine's
   oneDNN/MKL), so S(batch - F) is not S(batch) - S(F) exactly even in exact summation. Measured
   on the digits models (tests/test_pcmu_margin.py; benchmarks/RESULTS.md): <= 2e-10 C for a
   logistic regression and a 64-64-10 MLP. We allow 2^-20 C ~ 9.5e-7 C, ~5000x that, and 8x
   below the fixed 2^-17 C used before.
"""
from __future__ import annotations

FLOAT32_UNIT = 2.0**-24
FLOAT64_UNIT = 2.0**-53
# The most terms any float64 sum of per_sample's may add for the margin's float64 term to hold
# (b * positions for the clipped-sum product, the widest layer for the norms).
MAX_SUM_TERMS = 2**26
# Term 3: the forward/backward pass's dependence on the batch's shape, times C (our choice).
FORWARD_ALLOWANCE = 2.0**-20


def gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u) for float64."""
    return n * FLOAT64_UNIT / (1.0 - n * FLOAT64_UNIT)


def float64_sum_error(terms: int) -> float:
    """Bound on |S/b computed - exact| / C for one clipped sum of `terms`-term float64 sums (term 2)."""
    return gamma(terms + 1) + gamma(2 * terms + 4)


def rounding_margin(clip_norm: float, batch_size: int, beta: float, max_request: int) -> float:
    """The margin added to k*C/b wherever a radius or a re-quantized value is compared (terms 1-3)."""
    float32 = FLOAT32_UNIT * (2.0 * beta + max_request * clip_norm / batch_size)
    float64 = 3.0 * float64_sum_error(MAX_SUM_TERMS) * clip_norm
    return float32 + float64 + FORWARD_ALLOWANCE * clip_norm
