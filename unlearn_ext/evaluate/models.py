"""Model factories of the harness: `logreg`, `mlp` (tanh, hidden 64 by default) and `mlp-wide`
(the memorizing setting's wide MLP, hidden 512). Same seed -> same initial weights."""
from __future__ import annotations

import torch

NAMES = ("logreg", "mlp", "mlp-wide")


def make(name: str, features: int, classes: int, seed: int, widths=None) -> torch.nn.Module:
    torch.manual_seed(seed)
    if name == "logreg":
        return torch.nn.Linear(features, classes)
    if name in ("mlp", "mlp-wide"):
        widths = list(widths or ([64] if name == "mlp" else [512]))
        layers, d = [], features
        for w in widths:
            layers += [torch.nn.Linear(d, w), torch.nn.Tanh()]
            d = w
        return torch.nn.Sequential(*layers, torch.nn.Linear(d, classes))
    raise ValueError(f"unknown model {name!r}: choose one of {', '.join(NAMES)}")
