"""The edge-of-stability estimate recorded during training (ours): eta_t * lambda_max at chosen steps.

Both history methods need eta_t * h < 2 (plain SGD; the momentum bounds of mini/propagate.py) along
every curvature direction h their linear or quasi-Newton model uses, and well-tuned SGD on real
networks trains right at that edge (eta * lambda_max ~ 2). Measuring it only when a request arrives
means paying for the anchor drifts and the curvature (Mini-Unlearning) or for part of the replay
(DeltaGrad) before learning that the request falls back to retraining, so a fallback cost more than
retraining. The recorders therefore estimate lambda_max of the training objective (mean loss +
weight decay) at a few steps while training runs: `SHARPNESS_STEPS` Lanczos steps from a seeded
random start on a seeded subsample of `SHARPNESS_SAMPLES` samples (the top Ritz value of a Krylov
space is a lower bound of lambda_max that is tight after a few steps; the subsample makes it an
estimate). Cost per estimate: 2 * SHARPNESS_SAMPLES * SHARPNESS_STEPS sample-gradients.

They store [[step, eta_t * lambda_max], ...] in the history's run_info under `SHARPNESS_KEY`; an
unlearner reads the largest value (`recorded_edge`) and decides before any work.
"""
from __future__ import annotations

import torch

from .curvature import lanczos_spectrum, subsample

SHARPNESS_KEY = "eta_lambda_max"
SHARPNESS_SAMPLES = 256
SHARPNESS_STEPS = 6


def estimate_eta_lambda(flat, w: torch.Tensor, lr: float, weight_decay: float, seed: int = 0) -> tuple[float, int]:
    """(eta * lambda_max estimate at flat weights w, its sample-gradient cost)."""
    ids = subsample(flat.data.ids, SHARPNESS_SAMPLES, seed)
    start = torch.randn(flat.dim, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
    spec = lanczos_spectrum(flat, w, ids, weight_decay, start, SHARPNESS_STEPS, seed)
    top = float(spec.thetas.max()) if spec.thetas.numel() else 0.0
    return float(lr) * top, spec.sample_gradients


def recorded_edge(run_info: dict) -> tuple[float, int] | None:
    """(the largest recorded eta_t * lambda_max, its step), or None where the run recorded none
    (e.g. a history written by a HistoryRecorder attached by hand)."""
    values = run_info.get(SHARPNESS_KEY)
    if not values:
        return None
    step, value = max(values, key=lambda sv: sv[1])
    return float(value), int(step)
