"""The measures of a causal language model on documents (the `corpus` data, `causal-lm` model):
outputs are next-token logits [b, T, V], targets [b, T] token ids with IGNORE at padded positions.

* per_sequence_cross_entropy: a document's loss, the mean next-token cross-entropy over its own
  (unpadded) tokens; the training loss is the mean of these over the batch, so every document
  weighs the same whatever its length (our choice: a deletion request names documents, and the
  per-document loss is what the membership inference reads);
* token_accuracy: the fraction of next tokens predicted right (argmax), over every unpadded token
  of a set of documents;
* sequence_features: per document, [loss, mean confidence in the true next token, mean entropy]
  (the per-sample features of mia.features, averaged over the document's tokens).
"""
from __future__ import annotations

import math

import torch

from ..forward import outputs
from .corpus import IGNORE


def per_sequence_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[b]: each sequence's mean next-token cross-entropy over its positions whose target is not IGNORE."""
    tokens = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE,
                                               reduction="none")  # [b, T], 0 where ignored
    return tokens.sum(1) / (targets != IGNORE).sum(1)


def sequence_losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return per_sequence_cross_entropy(outputs(model, x), y)


def token_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    if x.shape[0] == 0:
        return math.nan
    valid = y != IGNORE
    return float((outputs(model, x).argmax(-1) == y)[valid].double().mean())


def sequence_features(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    """[loss, confidence, entropy] per document (numpy, float64)."""
    logp = torch.log_softmax(outputs(model, x).double(), -1)
    valid = y != IGNORE
    true = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # IGNORE positions are masked below
    entropy = -(logp.exp() * logp).sum(-1)
    per_doc = lambda v: (v * valid).sum(1) / valid.sum(1)  # noqa: E731
    return torch.stack([per_doc(-true), per_doc(true.exp()), per_doc(entropy)], 1).cpu().numpy()
