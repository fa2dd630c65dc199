"""The training recipe of a harness run: the command line's `--optimizer`, `--lr`, `--momentum`,
`--weight-decay`, `--schedule`, `--epochs` and `--batch-size` over each model's defaults (or a
named setting's), built into what the run trains, retrains and repairs with.

Plain SGD (`sgd`) is an `SGDConfig`: every method can serve it. `momentum` (heavy ball, torch's
SGD with momentum, default 0.9) and `adam` are an `OptimizerRecipe` (unlearn_ext/recipe.py):
retraining, fine-tuning and the repairs train with it; methods that need plain SGD (the history
methods) refuse it, and the harness records the refusal. Defaults per model (DEFAULTS) were fixed
before any evaluation, never tuned on reported seeds; with adam the default learning rate is
ADAM_LR whatever the model. The schedules are ours:
  constant  lr at every step
  cosine    lr * (1 + cos(pi * t / T)) / 2 over the run's T steps (to 0 at the end)
  step      lr, then lr / 10 from half the epochs on and lr / 100 from three quarters on
A schedule is a function of the step t of the original batch schedule, so retraining without F
(same steps, F removed inside its batches) sees the same learning rate at every step.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..data import SGDConfig
from ..recipe import OptimizerRecipe

OPTIMIZERS = ("sgd", "momentum", "adam")
SCHEDULES = ("constant", "cosine", "step")

DEFAULTS = {  # model: SGD fields (epochs, batch_size, lr, weight_decay)
    "logreg": dict(epochs=20, batch_size=64, lr=0.1, weight_decay=1e-3),
    "mlp": dict(epochs=30, batch_size=64, lr=0.1, weight_decay=1e-4),
    "mlp-wide": dict(epochs=150, batch_size=32, lr=0.05, weight_decay=0.0),  # the memorizing setting's
    "cnn": dict(epochs=20, batch_size=64, lr=0.1, weight_decay=1e-4),
    "resnet": dict(epochs=15, batch_size=64, lr=0.05, weight_decay=1e-4),
    "transformer": dict(epochs=20, batch_size=32, lr=0.1, weight_decay=0.0),
    "causal-lm": dict(epochs=30, batch_size=16, lr=0.3, weight_decay=0.0),
}
USER_MODEL_DEFAULTS = dict(epochs=20, batch_size=64, lr=0.05, weight_decay=0.0)  # package.module:factory
DEFAULT_MOMENTUM = 0.9
ADAM_LR = 1e-3  # torch's default: SGD's learning rates are far too large a step for Adam


class RecipeError(ValueError):
    """Recipe options that cannot be trained, with what is wrong in the message."""


@dataclass(frozen=True)
class CosineLR:
    lr: float
    total_steps: int

    def __call__(self, t: int) -> float:
        return self.lr * 0.5 * (1 + math.cos(math.pi * min(t, self.total_steps) / max(1, self.total_steps)))


@dataclass(frozen=True)
class StepLR:
    lr: float
    steps_per_epoch: int
    epochs: int

    def __call__(self, t: int) -> float:
        epoch = t // self.steps_per_epoch
        return self.lr * (0.01 if epoch >= 0.75 * self.epochs else 0.1 if epoch >= 0.5 * self.epochs else 1.0)


@dataclass(frozen=True)
class ScaledLR:
    """lr times a schedule's factor at step t (SGDConfig's learning rate as a function of the step)."""
    lr: float
    factor: object

    def __call__(self, t: int) -> float:
        return self.lr * self.factor(t)


@dataclass(frozen=True)
class TorchOptimizer:
    """optimizer_factory of an OptimizerRecipe: torch's SGD with momentum, or Adam."""
    kind: str
    lr: float
    weight_decay: float
    momentum: float | None = None

    def __call__(self, params):
        if self.kind == "momentum":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)


@dataclass(frozen=True)
class StepScheduler:
    """scheduler_factory of an OptimizerRecipe: the schedule's factor at every step (LambdaLR)."""
    factor: object

    def __call__(self, optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, self.factor)


@dataclass(frozen=True)
class RecipeOptions:
    """What the command line asked for; None: the model's default (or the named setting's)."""
    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    schedule: str = "constant"
    epochs: int | None = None
    batch_size: int | None = None

    def check(self) -> None:
        """Refuses, before any work, options no run could train with (one line, naming the option)."""
        if self.optimizer not in OPTIMIZERS:
            raise RecipeError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise RecipeError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise RecipeError(f"--lr must be a positive finite number, got {self.lr}")
        if self.weight_decay is not None and not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise RecipeError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")
        if self.momentum is not None and self.optimizer != "momentum":
            raise RecipeError(f"--momentum applies to --optimizer momentum, not {self.optimizer}")
        if self.momentum is not None and not 0 <= self.momentum < 1:
            raise RecipeError(f"--momentum must be in [0, 1), got {self.momentum}")

    def resolved(self, model: str, base: dict | None = None) -> dict:
        """Every field of the run's recipe: the options over `base` (a named setting's SGD fields)
        or the model's defaults."""
        fields = dict(base) if base is not None else dict(DEFAULTS.get(model, USER_MODEL_DEFAULTS))
        for key in ("lr", "weight_decay", "epochs", "batch_size"):
            if getattr(self, key) is not None:
                fields[key] = getattr(self, key)
        if self.optimizer == "adam" and self.lr is None:
            fields["lr"] = ADAM_LR
        momentum = (DEFAULT_MOMENTUM if self.momentum is None else self.momentum) if self.optimizer == "momentum" else None
        return {"optimizer": self.optimizer, **fields, "momentum": momentum, "schedule": self.schedule}

    def build(self, model: str, seed: int, samples: int, base: dict | None = None):
        """The run's recipe for `samples` training samples and training seed `seed`: an SGDConfig
        for plain SGD, else an OptimizerRecipe."""
        self.check()
        r = self.resolved(model, base)
        steps_per_epoch = math.ceil(samples / r["batch_size"])
        schedule = {"constant": None, "cosine": CosineLR(1.0, r["epochs"] * steps_per_epoch),
                    "step": StepLR(1.0, steps_per_epoch, r["epochs"])}[self.schedule]  # a factor of lr
        if self.optimizer == "sgd":
            lr = r["lr"] if schedule is None else ScaledLR(r["lr"], schedule)
            return SGDConfig(epochs=r["epochs"], batch_size=r["batch_size"], lr=lr, weight_decay=r["weight_decay"],
                             seed=seed)
        make = TorchOptimizer(self.optimizer, r["lr"], r["weight_decay"], r["momentum"])
        return OptimizerRecipe(make, epochs=r["epochs"], batch_size=r["batch_size"], seed=seed,
                               scheduler_factory=None if schedule is None else StepScheduler(schedule),
                               scheduler_step="step", description={k: v for k, v in r.items() if k != "epochs"})

    def record(self) -> dict:
        return asdict(self)
