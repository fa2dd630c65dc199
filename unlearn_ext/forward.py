"""A model's outputs as measurements and repairs read them: eval mode (dropout off, BatchNorm on
its running statistics), no autograd, in chunks so that large inputs fit; each module's training
flag is put back afterwards (a frozen BatchNorm in a training model stays frozen). Shared by the
metrics, membership inference and perturbation's distillation teacher, so that they all see the
same outputs."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def restored_training_flags(model: torch.nn.Module):
    """Every module's own training flag put back on exit, whatever the body set (flags, not
    model.train(mode): a module frozen on its own stays frozen)."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """The model in eval mode (dropout off, BatchNorm on running statistics), each module's own
    training flag restored afterwards."""
    with restored_training_flags(model):
        model.eval()
        yield model


@torch.no_grad()
def outputs(model: torch.nn.Module, x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    with eval_mode(model):
        return torch.cat([model(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)]) if x.shape[0] else \
            model(x)
