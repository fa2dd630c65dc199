"""A model's state as unlearning sees it: the trainable parameters *and* every buffer.

Buffers are state too: BatchNorm's running statistics decide eval-mode outputs, and a repair run in
training mode moves them. Every unlearner's `state_dict` / `load_state_dict` (and so the deletion
ledger, and the ledger's rollback of a failed request) goes through these two functions, so a
restored model gives exactly the outputs it gave when its state was taken.

    state = model_state(model)          # {"params": {name: tensor}, "buffers": {name: tensor}}
    load_model_state_(model, state)     # in place; the model keeps its identity
"""
from __future__ import annotations

import torch

from .parameters import trainable


def model_state(model: torch.nn.Module) -> dict:
    """Detached clones of the trainable parameters and of every buffer, by name."""
    return {"params": {k: v.detach().clone() for k, v in trainable(model).items()},
            "buffers": {k: v.detach().clone() for k, v in model.named_buffers()}}


def load_model_state_(model: torch.nn.Module, state: dict) -> None:
    """Copies a `model_state` snapshot into `model` in place. A snapshot whose names or shapes
    differ from the model's is refused, naming them, before anything is copied."""
    targets = check_model_state(model, state)
    with torch.no_grad():
        for kind, have in targets.items():
            for name, tensor in have.items():
                tensor.copy_(state[kind][name])


def check_model_state(model: torch.nn.Module, state: dict) -> dict:
    """Refuses (ValueError, naming them) a `model_state` snapshot whose names or shapes differ from
    the model's; else the model's tensors by kind and name. For callers that change other things
    before loading the snapshot and must refuse it first."""
    targets = {"params": trainable(model), "buffers": dict(model.named_buffers())}
    for kind, have in targets.items():
        given = state.get(kind)
        if not isinstance(given, dict):
            raise ValueError(f"the saved model state has no {kind!r} entry (a state saved before buffers were "
                             "part of the model's state, or not a model state)")
        missing, extra = sorted(set(have) - set(given)), sorted(set(given) - set(have))
        if missing or extra:
            raise ValueError(f"the saved model state does not match the model's {kind}: "
                             + "; ".join(s for s in (f"missing {missing}" if missing else "",
                                                     f"unexpected {extra}" if extra else "") if s))
        for name, tensor in have.items():
            value = given[name]
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(tensor.shape):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                what = "parameter" if kind == "params" else "buffer"
                raise ValueError(f"the saved model state's {what} {name!r} has shape {shape}; the model's "
                                 f"is {tuple(tensor.shape)}")
    return targets
