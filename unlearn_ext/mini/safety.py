"""The history methods' shared check against an answer worse than doing nothing (ours).

Retraining trains on the retained set R alone, so it lowers the retained objective (mean loss +
wd/2 ||w||^2) from the weights before the request; an approximate answer that raises it clearly
went uphill on the very objective retraining minimizes — typically farther from the retrained
weights than doing nothing. Measured on a seeded uniform subsample S of R (the same S the
curvature uses in Mini-Unlearning), it costs two forward passes over S.

Calibration (Mini-Unlearning, tanh MLP on digits): the requests that ended farther from retraining
than w* (d/d0 0.98 and 1.29) rose by 72% and 216%, while every held-out request with d/d0 < 0.65
(seeds 100-102, 1-30%) stayed below +12%; hence the default limit of 25%, used by DeltaGrad too.
"""
from __future__ import annotations

import torch

DEFAULT_LOSS_RISE_LIMIT = 0.25


def retained_loss_rise(flat, ids: torch.Tensor, w_before: torch.Tensor, w_after: torch.Tensor,
                       weight_decay: float) -> float:
    """(L_S(w_after) - L_S(w_before)) / L_S(w_before) for the retained objective on rows `ids`."""
    def objective(w):
        return flat.mean_loss(w, ids) + 0.5 * weight_decay * float(w.double().norm() ** 2)

    before = objective(w_before)
    return (objective(w_after) - before) / max(abs(before), 1e-12)
