"""How well a model forgot, measured against retraining (docs/design.md §7 and §8).

The definitions of the forgetting rate and the memory retention rate are **our** formulations
(the perturbation paper's abstract names the measures without formulas):

  FR      = (A_orig(F) - A_new(F)) / (A_orig(F) - A_retrain(F))   retrain-normalized; 1 = as retraining,
                                                                   > 1 = over-forgetting
  raw FR  = (A_orig(F) - A_new(F)) / A_orig(F)
  MRR     = A_new(R) / A_orig(R)                                    memory retention on retained data
  d/d0    = ||w - w_retrain|| / ||w_orig - w_retrain||             0 perfect, 1 did nothing, > 1 harm

FR is reported only where the original and retrained models differ on at least `MIN_FR_GAP`
forget samples; otherwise it is None and `fr_note` says why (a ratio of two near-zero numbers
means nothing).
"""
from __future__ import annotations

import math

import torch

from .forward import outputs
from .parameters import trainable

MIN_FR_GAP = 2  # samples


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    if x.shape[0] == 0:
        return math.nan
    return float((outputs(model, x).argmax(1) == y).double().mean())


def per_sample_losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(outputs(model, x), y, reduction="none")


def distance_ratio(model: torch.nn.Module, original: torch.nn.Module, retrained: torch.nn.Module) -> float:
    """d/d0 over all trainable parameters."""
    flat = lambda m: torch.cat([p.detach().double().reshape(-1) for p in trainable(m).values()])  # noqa: E731
    w, w0, wr = flat(model), flat(original), flat(retrained)
    d0 = float(torch.linalg.vector_norm(w0 - wr))
    return float(torch.linalg.vector_norm(w - wr)) / d0 if d0 > 0 else math.nan


def forgetting_rate(acc_orig_f: float, acc_new_f: float, acc_retrain_f: float,
                    forget_size: int, unit: str = "samples") -> tuple[float | None, float | None, str]:
    """(FR, raw FR, note). FR is None when the original-vs-retrain gap on F is under MIN_FR_GAP
    of the units the accuracy counts (forget_size of them: samples, or a language model's tokens);
    raw FR is None when the original model gets nothing of F right."""
    raw = (acc_orig_f - acc_new_f) / acc_orig_f if acc_orig_f > 0 else None
    gap_samples = (acc_orig_f - acc_retrain_f) * forget_size
    if gap_samples < MIN_FR_GAP - 1e-9:
        return None, raw, (f"n/a: original and retrained models differ on {gap_samples:.1f} of {forget_size} "
                           f"forget {unit} (< {MIN_FR_GAP})")
    return (acc_orig_f - acc_new_f) / (acc_orig_f - acc_retrain_f), raw, f"gap of {gap_samples:.0f} {unit}"


def retention_rate(acc_new_r: float, acc_orig_r: float) -> float:
    """MRR = A_new(R) / A_orig(R)."""
    return acc_new_r / acc_orig_r if acc_orig_r > 0 else math.nan
