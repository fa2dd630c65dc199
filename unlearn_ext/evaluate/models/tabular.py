"""Models on tables (n x d inputs): logistic regression and the tanh MLPs the history methods'
linear response was first measured on."""
from __future__ import annotations

import torch


def logreg(features: int, classes: int) -> torch.nn.Module:
    return torch.nn.Linear(features, classes)


def mlp(features: int, classes: int, widths) -> torch.nn.Module:
    layers, d = [], features
    for w in widths:
        layers += [torch.nn.Linear(d, w), torch.nn.Tanh()]
        d = w
    return torch.nn.Sequential(*layers, torch.nn.Linear(d, classes))
