"""One policy for layers and losses, the same for every method (DESIGN section 13).

  * BatchNorm in training mode mixes the samples of a batch: a sample's gradient depends on the
    others, so per-sample quantities (PCMU's clipped sums) and replays of single samples' gradients
    (Mini-Unlearning, DeltaGrad) are undefined. Methods that need them refuse such a model when it
    is wrapped, naming the layers and the fix.
  * Stochastic layers (dropout): curvature and gradient replays run with the model in eval mode,
    and the report says so.
  * The loss: the user's batch loss must be the mean (or the sum) of per-sample losses; which one is
    found on a probe batch when the model is wrapped, and the per-sample form is derived from it
    (reduction='none'). Anything else is refused: a loss that is neither is never summed silently.
"""
from __future__ import annotations

import contextlib

import torch

from .per_sample.engine import per_sample_losses

BATCHNORM = (torch.nn.modules.batchnorm._BatchNorm,)
STOCHASTIC = (torch.nn.modules.dropout._DropoutNd, torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)


class UnsupportedModelError(ValueError):
    """A model, optimizer or loss that a method cannot serve (refused before any training)."""


def batchnorm_in_training(model: torch.nn.Module) -> list[str]:
    """Names of BatchNorm layers that use batch statistics (training mode, or no running stats)."""
    return [name or type(m).__name__ for name, m in model.named_modules()
            if isinstance(m, BATCHNORM) and (m.training or not m.track_running_stats)]


def stochastic_layers(model: torch.nn.Module) -> list[str]:
    return [name or type(m).__name__ for name, m in model.named_modules() if isinstance(m, STOCHASTIC) and m.p > 0]


def refuse_batchnorm_in_training(model: torch.nn.Module, method: str, needs: str) -> None:
    names = batchnorm_in_training(model)
    if names:
        raise UnsupportedModelError(
            f"{method} needs {needs}, which BatchNorm in training mode makes depend on the whole batch "
            f"(layers: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}). Use GroupNorm or LayerNorm, put the "
            "BatchNorm layers in eval mode (frozen statistics), or convert the model (e.g. opacus' "
            "ModuleValidator.fix replaces BatchNorm with GroupNorm); Top-K, Random-k, fine-tuning and retraining "
            "accept BatchNorm as it is")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """The model in eval mode (dropout off, BatchNorm on running statistics), each module's own
    training flag restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def loss_reduction(loss_fn, model: torch.nn.Module, x: torch.Tensor, y) -> str:
    """'mean' or 'sum': how `loss_fn` reduces per-sample losses, found on the batch (x, y) (two or
    more samples) in eval mode without gradients. Anything else raises UnsupportedModelError."""
    with torch.no_grad(), eval_mode(model):
        out = model(x)
        batch = loss_fn(out, y)
        try:
            per = per_sample_losses(loss_fn, out, y)
        except (TypeError, ValueError) as exc:
            raise UnsupportedModelError(f"cannot take per-sample losses from the loss {loss_fn!r}: {exc}") from None
    if not isinstance(batch, torch.Tensor) or batch.numel() != 1:
        raise UnsupportedModelError(f"the loss must return one number for a batch (mean or sum of per-sample "
                                    f"losses); it returned shape {tuple(getattr(batch, 'shape', ()))}")
    batch, per = batch.double(), per.double()
    for name, value in (("mean", per.mean()), ("sum", per.sum())):
        if torch.isclose(batch, value, rtol=1e-5, atol=1e-7):
            return name
    raise UnsupportedModelError(
        f"the loss is neither the mean nor the sum of its per-sample losses (batch {batch.item():.6g}, mean "
        f"{per.mean().item():.6g}, sum {per.sum().item():.6g}): give a loss with reduction='mean' whose "
        "reduction='none' form is per sample")


def per_sample_loss_of(loss_fn):
    """The per-sample form (shape [b]) of a batch loss (reduction='none', summed over any extra
    dimensions, e.g. tokens)."""
    def per_sample(outputs, targets):
        return per_sample_losses(loss_fn, outputs, targets)
    per_sample.__name__ = f"per_sample({getattr(loss_fn, '__name__', type(loss_fn).__name__)})"
    return per_sample
