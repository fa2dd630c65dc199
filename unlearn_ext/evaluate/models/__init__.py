"""Model factories of the harness, by name, and a user's own factory.

  logreg, mlp (tanh, hidden 64), mlp-wide (hidden 512)   tables (n x d)         tabular.py
  cnn, resnet (norm 'group' | 'batch')                    images / signals       vision.py
  transformer (dropout option)                            integer token sequences sequence.py
  causal-lm (dropout option; a decoder)                    documents (the corpus)  sequence.py
  package.module:factory                                  whatever the data are: factory(input_shape, classes)
                                                          must return a torch.nn.Module

Same seed -> same initial weights (the global torch RNG is seeded before building).
"""
from __future__ import annotations

import importlib
import os
import sys

import torch

from . import sequence, tabular, vision

# What each named model reads: 'table' (n x d floats), 'grid' (images C x H x W or signals C x L),
# 'tokens' (n x T integers), 'documents' (n x T token ids with next-token targets). A user's factory
# takes the data in their natural form.
READS = {"logreg": "table", "mlp": "table", "mlp-wide": "table", "cnn": "grid", "resnet": "grid",
         "transformer": "tokens", "causal-lm": "documents"}
NAMES = tuple(READS)
# The models of n x d tables: the families whose method settings differ from the networks'.
TABULAR = tuple(name for name, form in READS.items() if form == "table")


class ModelError(ValueError):
    """A model that cannot be built for these data, with what is wrong in the message."""


def is_user_factory(name: str) -> bool:
    return ":" in name


def reads(name: str) -> str | None:
    """The input form a named model reads; None for a user's factory."""
    if is_user_factory(name):
        return None
    if name not in READS:
        raise ModelError(f"unknown model {name!r}: choose one of {', '.join(NAMES)} or package.module:factory")
    return READS[name]


def load_factory(spec: str):
    """The callable named by 'package.module:factory' (importable as Python would import it, or from
    the current directory, as `python -m` finds modules)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelError(f"--model {spec!r}: expected package.module:factory")
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            if os.getcwd() in sys.path:
                raise
            sys.path.insert(0, os.getcwd())
            try:
                module = importlib.import_module(module_name)
            finally:
                sys.path.remove(os.getcwd())
    except Exception as exc:  # any import failure (missing module, syntax error, error at import)
        raise ModelError(f"--model {spec}: cannot import {module_name} ({type(exc).__name__}: {exc})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"--model {spec}: {module_name} has no callable {attr!r}")
    return factory


def make(name: str, input_shape, classes: int, seed: int, widths=None, *, norm: str = "group",
         dropout: float = 0.0, vocab: int | None = None) -> torch.nn.Module:
    """A fresh model for inputs of `input_shape` (one sample's shape; an int means (features,)) and
    `classes` outputs (for documents: the vocabulary, predicted at every position). vocab: the token
    count, for models that read tokens."""
    shape = (int(input_shape),) if isinstance(input_shape, int) else tuple(int(s) for s in input_shape)
    torch.manual_seed(seed)
    if is_user_factory(name):
        factory = load_factory(name)
        try:
            model = factory(shape, classes)
        except Exception as exc:  # the user's code: report what it raised, in one line
            raise ModelError(f"--model {name}: the factory raised {type(exc).__name__}: {exc}") from None
        if not isinstance(model, torch.nn.Module):
            raise ModelError(f"--model {name}: the factory returned {type(model).__name__}, not a torch.nn.Module")
        return model
    kind = reads(name)
    if kind == "table":
        if len(shape) != 1:
            raise ModelError(f"--model {name} reads tables (n x d), got samples of shape {shape}")
        if name == "logreg":
            return tabular.logreg(shape[0], classes)
        widths = list(widths or ([64] if name == "mlp" else [512]))
        return tabular.mlp(shape[0], classes, widths)
    if kind == "grid":
        if len(shape) not in (2, 3):
            raise ModelError(f"--model {name} reads images (C x H x W) or signals (C x L), got samples of shape {shape}")
        return vision.cnn(shape, classes) if name == "cnn" else vision.resnet(shape, classes, norm)
    if len(shape) != 1 or vocab is None:
        raise ModelError(f"--model {name} reads integer token sequences (n x T), got samples of shape {shape}")
    if kind == "documents":
        return sequence.CausalLM(vocab, shape[0], dropout=dropout, seed=seed)
    return sequence.TokenClassifier(vocab, shape[0], classes, dropout=dropout, seed=seed)


def check_outputs(model: torch.nn.Module, sample: torch.Tensor, classes: int, name: str,
                  per_position: bool = False) -> None:
    """Refuses a model whose outputs on two samples are not (2, classes) logits -- (2, T, classes)
    with per_position (a language model's next-token logits) -- before any training."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(sample[:2])
    except Exception as exc:
        raise ModelError(f"--model {name}: a forward pass on inputs of shape {tuple(sample.shape[1:])} failed "
                         f"({type(exc).__name__}: {exc})") from None
    finally:
        model.train(was_training)
    batch = min(2, len(sample))
    expected = (batch, sample.shape[1], classes) if per_position else (batch, classes)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        what = f"(batch, {sample.shape[1]}, {classes}) next-token logits" if per_position else \
            f"(batch, {classes}) logits"
        raise ModelError(f"--model {name}: outputs must be {what}, got {got}")
