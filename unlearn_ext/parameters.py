"""Which parameters of a model count, and how they are described: the one definition every layer
of the library shares (per-sample gradients, history, metrics, every unlearner's state and
fingerprint).

  * a model's *trainable* parameters are those with requires_grad, by name, in registration order;
    frozen parameters are neither trained, recorded nor unlearned;
  * `parameter_shapes` is how a fingerprint names them: {name: [sizes]}, so saved state of a model
    with the same shapes under other names (or in another order) is refused.
"""
from __future__ import annotations

import torch


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require gradients, by name."""
    return {k: v for k, v in model.named_parameters() if v.requires_grad}


def parameter_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    """{name: shape as a list} of the trainable parameters (JSON-serializable; fingerprints use it)."""
    return {k: list(v.shape) for k, v in trainable(model).items()}
