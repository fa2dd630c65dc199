"""One policy for layers and losses, the same for every method (docs/design.md §13).

  * BatchNorm in training mode mixes the samples of a batch: a sample's gradient depends on the
    others, so per-sample quantities (PCMU's clipped sums) and replays of single samples' gradients
    (Mini-Unlearning, DeltaGrad) are undefined. Methods that need them refuse such a model when it
    is wrapped, naming the layers and the fix.
  * Stochastic layers (dropout): curvature and gradient replays, and PCMU's per-sample clipped
    sums, run with the model in eval mode, and the report says so (`eval_mode_note`).
  * The loss: the user's batch loss must be the mean (or the sum) of per-sample losses; which one is
    found on a probe batch when the model is wrapped, and the per-sample form is derived from it
    (reduction='none'). Anything else is refused: a loss that is neither is never summed silently.
"""
from __future__ import annotations

import contextlib
import copy

import torch

from .forward import eval_mode, restored_training_flags

BATCHNORM = (torch.nn.modules.batchnorm._BatchNorm,)
STOCHASTIC = (torch.nn.modules.dropout._DropoutNd, torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)


class UnsupportedModelError(ValueError):
    """A model, optimizer or loss that a method cannot serve (refused before any training)."""


def stochastic_layers(model: torch.nn.Module) -> list[str]:
    return [name or type(m).__name__ for name, m in model.named_modules() if isinstance(m, STOCHASTIC) and m.p > 0]


def active_stochastic_layers(model: torch.nn.Module) -> list[str]:
    """The stochastic layers that draw random numbers now (in training mode)."""
    return [name or type(m).__name__ for name, m in model.named_modules()
            if isinstance(m, STOCHASTIC) and m.p > 0 and m.training]


def eval_mode_note(model: torch.nn.Module, what: str) -> str | None:
    """What a report says when `what` ran the model's stochastic layers in eval mode (None if it
    has none)."""
    names = stochastic_layers(model)
    if not names:
        return None
    return (f"{what} ran with the stochastic layers ({', '.join(names[:5])}{' ...' if len(names) > 5 else ''}) in "
            "eval mode (off): a sample's gradient must not depend on random draws")


def refuse_training_batch_norm(model, who: str, needs: str = "per-sample gradients") -> None:
    """Refuses BatchNorm layers that use batch statistics in `model` (a module, or an iterable of
    modules): they mix the samples of a batch, so `needs` are not defined (and every forward pass
    moves the running statistics). The message names the layers and the fixes."""
    named = model.named_modules() if isinstance(model, torch.nn.Module) else ((type(m).__name__, m) for m in model)
    names = [name or type(m).__name__ for name, m in named
             if isinstance(m, BATCHNORM) and (m.training or not m.track_running_stats)]
    if names:
        hint = (" (the model's own train() puts them in eval mode: call model.train() before wrapping, as the "
                "loop will)" if _own_train_freezes(model, names) else "")
        raise UnsupportedModelError(
            f"{who}: BatchNorm in training mode (layers: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}) "
            f"mixes the samples of a batch, so {needs} are not defined{hint}: use GroupNorm or LayerNorm, put the "
            "BatchNorm layers in eval mode (frozen statistics), or convert them before training (e.g. opacus' "
            "ModuleValidator.fix replaces BatchNorm with GroupNorm). Top-K, Random-k, fine-tuning and retraining "
            "accept BatchNorm as it is")


def _own_train_freezes(model, names: list[str]) -> bool:
    """Whether `model` (a module) overrides train() and its train() leaves the BatchNorm layers
    `names` frozen (a fine-tuning idiom): then the refusal says to call it, not to rebuild the model.
    Tried on a copy, which the refusal's path alone pays for."""
    if not isinstance(model, torch.nn.Module) or type(model).train is torch.nn.Module.train:
        return False
    try:
        trial = copy.deepcopy(model).train()
    except Exception:  # a model that cannot be copied (a lock, a non-leaf tensor attribute) or whose train()
        return False   # fails on a copy: no hint, and the refusal itself stands, not this error
    modules = dict(trial.named_modules())
    return all(name in modules and not modules[name].training and modules[name].track_running_stats
               for name in names)


def training_modes(model: torch.nn.Module) -> dict[str, bool]:
    """Every module's training flag by name ('' is the model itself): what a loop trained in."""
    return {name: m.training for name, m in model.named_modules()}


def set_training_modes(model: torch.nn.Module, modes: dict[str, bool] | None) -> None:
    """Sets each module's training flag to `modes` (training_modes of a model of the same
    structure; a module it does not name trains); None: training mode throughout (model.train())."""
    if modes is None:
        model.train()
        return
    for name, m in model.named_modules():
        m.training = modes.get(name, True)


@contextlib.contextmanager
def in_training_modes(model: torch.nn.Module, modes: dict[str, bool] | None):
    """The model with each module's training flag set to `modes` (None: left as it is), every
    module's own flag restored afterwards."""
    with restored_training_flags(model):
        if modes is not None:
            set_training_modes(model, modes)
        yield model


def changed_modes(modes: dict[str, bool], model: torch.nn.Module) -> list[str]:
    """The modules (named, '(model)' for the model itself) whose training flag differs from `modes`."""
    return [name or "(model)" for name, m in model.named_modules() if m.training != modes.get(name, m.training)]


def loss_reduction(loss_fn, model: torch.nn.Module, x: torch.Tensor, y) -> str:
    """How `loss_fn` reduces its per-sample losses: 'mean', 'sum' or 'other' (e.g. a class-weighted
    mean, which divides by the batch's total weight, or a mean over the targets ignore_index does
    not skip), found on the batch (x, y) (the data's first two or more samples) in eval mode
    without gradients; a non-finite loss there is refused, unless it is such a mean over samples
    none of whose targets counts (every per-sample loss 0, the mean 0 / 0 = NaN: 'other'). Each
    method decides what it accepts (the history methods replay mean gradients: 'mean' only). A loss
    without a per-sample form (reduction='none') raises UnsupportedModelError."""
    from .per_sample.engine import per_sample_losses  # (per_sample imports this module)
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
    if not torch.isfinite(batch):
        if torch.isnan(batch) and bool((per == 0).all()):
            # 0 / 0: a mean over counted targets, none counted in these samples (all ignore_index, or
            # of classes weighing 0) -- no fault of the data, and no plain mean of per-sample losses.
            return "other"
        # Not a reduction to classify (NaN compares unequal to everything): the data or the model.
        raise UnsupportedModelError(f"the loss of the first {len(per)} items is {float(batch)} at the initial "
                                    "weights: their inputs or targets hold NaN or infinite values, or the model "
                                    "overflows on them; training would step on it")
    if getattr(loss_fn, "weight", None) is not None and getattr(loss_fn, "reduction", None) == "mean":
        # A class-weighted mean: on a probe whose samples share one class of weight 1 it would pass
        # for a plain mean, so it is classified by what it is.
        return "other"
    batch, per = batch.double(), per.double()
    for name, value in (("mean", per.mean()), ("sum", per.sum())):
        if torch.isclose(batch, value, rtol=1e-5, atol=1e-7):
            return name
    return "other"


class PerSampleLoss:
    """The per-sample form (shape [b]) of a batch loss (reduction='none', summed over any extra
    dimensions, e.g. tokens). `batch_loss` is the loss it wraps: mini/layer_chain.py recognizes
    torch's default cross-entropy behind it (a class, not a closure, so that it can be looked at)."""

    def __init__(self, batch_loss):
        from .per_sample.engine import per_sample_losses  # (per_sample imports this module)
        self.batch_loss, self._per_sample_losses = batch_loss, per_sample_losses
        self.__name__ = f"per_sample({getattr(batch_loss, '__name__', type(batch_loss).__name__)})"

    def __call__(self, outputs, targets):
        return self._per_sample_losses(self.batch_loss, outputs, targets)


def per_sample_loss_of(loss_fn) -> PerSampleLoss:
    """The per-sample form of a batch loss (PerSampleLoss)."""
    return PerSampleLoss(loss_fn)
