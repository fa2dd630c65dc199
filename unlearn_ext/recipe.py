"""The user's training recipe, so that retraining, fine-tuning and every repair train the way the
user trained (docs/design.md §13).

A recipe is anything with `epochs`, `batch_size`, `seed`, `steps(n)`, `train(model, data, exclude=,
on_step=)`, `tuned(lr_factor, epochs, seed, n)` and `fingerprint()`. Two kinds exist:

  * `SGDConfig` (data.py): the library's own plain-SGD loop (the history methods' setting);
  * `OptimizerRecipe` (here): any torch optimizer, its per-group hyperparameters, an LR scheduler
    stepped per epoch or per step, the user's batch loss and DataLoader options. Its loop is the
    ordinary one -- for each epoch, for each batch: zero_grad, loss(model(x), y).backward(), step --
    run over the batch schedule through a DataLoader, from the global RNG state captured when the
    recipe was taken, so retraining without forgotten ids reproduces the user's own loop bit for
    bit on a deterministic CPU.

`OptimizerRecipe.capture(model, optimizer, ...)` takes the recipe from the user's objects before
training (the optimizer must not have stepped yet).
"""
from __future__ import annotations

import copy
import inspect
import logging
import math
import warnings
from typing import Callable

import torch
from torch.utils.data import DataLoader

from .data import BatchSchedule, TrainingData, as_ids
from .policy import set_training_modes

SCHEDULER_STEPS = ("epoch", "step")
log = logging.getLogger("unlearn_ext")

# DataLoader settings a recipe repeats (the sampler and dataset are the schedule's and the data's).
LOADER_OPTIONS = ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn",
                  "multiprocessing_context", "prefetch_factor", "persistent_workers", "in_order")


class _OptimizerSlot:
    """Stands for the optimizer inside a scheduler snapshot (swapped for the new one on rebuild)."""


def loader_options(loader: DataLoader) -> dict:
    """The settings of a user's DataLoader a recipe repeats."""
    opts = {k: getattr(loader, k) for k in LOADER_OPTIONS if hasattr(loader, k)}
    if opts.get("num_workers", 0) == 0:  # only valid with workers
        opts.pop("prefetch_factor", None)
        opts.pop("persistent_workers", None)
    return opts


def _json_value(v):
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return float(v)
    if isinstance(v, (tuple, list)):
        return [_json_value(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return repr(v)


class OptimizerRecipe:
    """optimizer_factory(params) -> optimizer over the model's trainable parameters;
    scheduler_factory(optimizer) -> an LR scheduler or None, stepped once per epoch or per step
    (`scheduler_step`); loss(outputs, targets) -> the batch loss (default: the mean of the data's
    per-sample loss); rng_state: torch's global RNG state to train from (dropout draws); shuffle:
    the batch schedule's order (False: the data's own order every epoch, as a DataLoader with
    shuffle=False draws it); clip_grad_norm: the max_norm of torch.nn.utils.clip_grad_norm_ over the
    model's parameters between backward and step (None: no clipping)."""

    def __init__(self, optimizer_factory: Callable, *, epochs: int, batch_size: int, seed: int = 0,
                 loss: Callable | None = None, scheduler_factory: Callable | None = None,
                 scheduler_step: str = "epoch", loader_options: dict | None = None,
                 rng_state: torch.Tensor | None = None, description: dict | None = None, shuffle: bool = True,
                 clip_grad_norm: float | None = None):
        if int(epochs) < 1 or int(batch_size) < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
        if scheduler_step not in SCHEDULER_STEPS:
            raise ValueError(f"scheduler_step must be one of {SCHEDULER_STEPS}, got {scheduler_step!r}")
        self.optimizer_factory, self.scheduler_factory = optimizer_factory, scheduler_factory
        self.epochs, self.batch_size, self.seed = int(epochs), int(batch_size), int(seed)
        self.shuffle = bool(shuffle)
        if clip_grad_norm is not None and not float(clip_grad_norm) > 0:
            raise ValueError(f"clip_grad_norm must be > 0 (or None), got {clip_grad_norm}")
        self.clip_grad_norm = None if clip_grad_norm is None else float(clip_grad_norm)
        self.loss, self.scheduler_step = loss, scheduler_step
        self.loader_options = dict(loader_options or {})
        self.rng_state = None if rng_state is None else rng_state.clone()
        # torch's RNG state at the start of each epoch of the user's loop, {epoch: state}, filled while
        # it trains (loading.LoopSampler): train() starts each epoch from it, so draws the loop made
        # between epochs (a validation pass) do not make retraining differ from the loop.
        self.epoch_rng_states: dict = {}
        # Every module's training flag at the user's loop's steps ({name: bool}, policy.training_modes;
        # the engine's LoopGuard takes it at the first step and holds the loop to it): train() trains
        # in those modes (e.g. frozen BatchNorm, the model in eval mode). None: training mode throughout.
        self.train_modes: dict | None = None
        self.description = description or {"optimizer": getattr(optimizer_factory, "__name__", "factory")}

    # ---- taking the recipe from the user's objects -----------------------------------------------

    @classmethod
    def capture(cls, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, epochs: int, batch_size: int,
                seed: int = 0, loss: Callable | None = None, scheduler=None, scheduler_step: str = "epoch",
                loader: DataLoader | None = None, shuffle: bool = True,
                clip_grad_norm: float | None = None) -> "OptimizerRecipe":
        """The recipe of `optimizer` (class, defaults, every group's hyperparameters, its parameters
        by name in `model`) and `scheduler` as they are now -- before the first step. shuffle: the
        batch schedule's order (BatchSchedule)."""
        if any(optimizer.state.values()):
            raise ValueError("the optimizer has already taken steps (its state is not empty): wrap it before "
                             "training, so that retraining can start from the same place")
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise ValueError("ReduceLROnPlateau steps on a validation metric that retraining cannot repeat; use a "
                             "schedule that depends on the step or epoch only")
        if scheduler is not None and getattr(scheduler, "optimizer", None) is not optimizer:
            raise ValueError("the scheduler drives another optimizer than the one given")
        names = {id(p): n for n, p in model.named_parameters()}
        groups = []
        for i, group in enumerate(optimizer.param_groups):
            missing = [p for p in group["params"] if id(p) not in names]
            if missing:
                raise ValueError(f"optimizer group {i} holds {len(missing)} tensor(s) that are not parameters of the "
                                 "model: the recipe rebuilds the optimizer over the model's parameters by name")
            groups.append(({k: copy.deepcopy(v) for k, v in group.items() if k != "params"},
                           [names[id(p)] for p in group["params"]]))
        opt_class, defaults = type(optimizer), _constructor_defaults(optimizer)

        def make_optimizer(model_now: torch.nn.Module):
            params = dict(model_now.named_parameters())
            return opt_class([{**hp, "params": [params[n] for n in group_names]} for hp, group_names in groups],
                             **defaults)

        make_optimizer.takes_model = True
        scheduler_factory = None
        if scheduler is not None:
            slot = _OptimizerSlot()
            snapshot = copy.deepcopy(scheduler, memo={id(optimizer): slot})

            def scheduler_factory(opt):
                return copy.deepcopy(snapshot, memo={id(slot): opt})

        description = {"optimizer": opt_class.__name__,
                       "param_groups": [{k: _json_value(v) for k, v in hp.items()} for hp, _ in groups],
                       "scheduler": None if scheduler is None else type(scheduler).__name__,
                       "scheduler_step": scheduler_step,
                       "loss": None if loss is None else getattr(loss, "__name__", type(loss).__name__)}
        options = {} if loader is None else loader_options(loader)
        return cls(make_optimizer, epochs=epochs, batch_size=batch_size, seed=seed, loss=loss,
                   scheduler_factory=scheduler_factory, scheduler_step=scheduler_step, loader_options=options,
                   rng_state=torch.get_rng_state(), description=description, shuffle=shuffle,
                   clip_grad_norm=clip_grad_norm)

    # ---- the recipe interface -----------------------------------------------------------------------

    def steps(self, n: int) -> int:
        return self.epochs * math.ceil(n / self.batch_size)

    def peak_lr(self, n: int) -> float:
        """The largest learning rate of any group before scheduling (a scheduler's initial_lr)."""
        groups = self.description.get("param_groups")
        if groups is None:  # a factory's recipe: ask it for an optimizer over a stand-in parameter
            groups = self.optimizer_factory([torch.nn.Parameter(torch.zeros(1))]).param_groups
        return max(float(g.get("initial_lr", g["lr"])) for g in groups)

    def make_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        if getattr(self.optimizer_factory, "takes_model", False):
            return self.optimizer_factory(model)
        return self.optimizer_factory([p for p in model.parameters() if p.requires_grad])

    def scheduled_param_groups(self, model: torch.nn.Module, steps: int, batches_per_epoch: int):
        """Yields (t, param_groups) for t = 0..steps-1: the recipe's own optimizer over `model`'s
        parameters, never stepped, with every hyperparameter the scheduler gives step t (lr, and
        momentum or betas where a scheduler cycles them) -- what retraining trains step t with.
        The groups are live: read them before asking for the next step."""
        optimizer = self.make_optimizer(model)
        # Warnings are silenced around each scheduler call, not across a yield (the filters are global):
        # the optimizer never steps, and torch warns about the order.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scheduler = None if self.scheduler_factory is None else self.scheduler_factory(optimizer)
        for t in range(steps):
            if t and scheduler is not None and (self.scheduler_step == "step" or t % batches_per_epoch == 0):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    scheduler.step()  # as train() steps it: after each step, or after each epoch
            yield t, optimizer.param_groups

    def batch_loss(self, data: TrainingData, outputs: torch.Tensor, targets) -> torch.Tensor:
        return data.loss(outputs, targets).mean() if self.loss is None else self.loss(outputs, targets)

    def train(self, model: torch.nn.Module, data: TrainingData, *, exclude=None,
              on_step: Callable | None = None) -> torch.nn.Module:
        """Trains `model` in place over the batch schedule minus `exclude`. on_step(t, ids, model)
        runs before step t's forward pass. A batch left empty by `exclude` makes no update (the
        scheduler still counts it when stepped per step)."""
        excluded = as_ids([] if exclude is None else exclude)
        schedule = BatchSchedule(data.ids, self.batch_size, self.seed, self.shuffle)
        optimizer = self.make_optimizer(model)
        scheduler = None if self.scheduler_factory is None else self.scheduler_factory(optimizer)
        loader = DataLoader(data.items, batch_sampler=data.sampler(schedule, excluded), **self.loader_options)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        spe = schedule.batches_per_epoch
        set_training_modes(model, self.train_modes)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # a rebuilt scheduler's optimizer was not patched by the scheduler's constructor: torch
            # warns that step() "has been overridden", which here it has not.
            warnings.filterwarnings("ignore", message=".*optimizer.step\\(\\)` has been overridden.*")
            if self.rng_state is not None:
                torch.set_rng_state(self.rng_state)
            for epoch in range(self.epochs):
                batches = iter(loader)
                if epoch in self.epoch_rng_states:  # after iter(): the loop's pass began after its seed draw
                    torch.set_rng_state(self.epoch_rng_states[epoch])
                for step in schedule.steps(epoch * spe, (epoch + 1) * spe, excluded):
                    if step.ids.numel():
                        x, y = next(batches)
                        if on_step is not None:
                            on_step(step.step, step.ids, model)
                        optimizer.zero_grad()
                        self.batch_loss(data, model(to_device(x, device)), to_device(y, device)).backward()
                        if self.clip_grad_norm is not None:
                            torch.nn.utils.clip_grad_norm_(model.parameters(), self.clip_grad_norm)
                        optimizer.step()
                    if scheduler is not None and self.scheduler_step == "step":
                        scheduler.step()
                if scheduler is not None and self.scheduler_step == "epoch":
                    scheduler.step()
                log.info("trained epoch %d of %d (%s)", epoch + 1, self.epochs, self.description.get("optimizer"))
        return model

    def tuned(self, lr_factor: float, epochs: int, seed: int, n: int) -> "OptimizerRecipe":
        """The short run fine-tuning and repairs use: the user's optimizer and hyperparameters with
        every group's learning rate scaled by lr_factor and held constant (no scheduler: a repair
        of a few epochs does not replay a schedule made for the whole run), another batch order (a
        seeded shuffle, also after a run in the data's own order: a repair is not a replay)."""
        base = self

        def make_tuned(model):
            optimizer = base.make_optimizer(model)
            for group in optimizer.param_groups:
                group["lr"] = lr_factor * float(group.get("initial_lr", group["lr"]))
            return optimizer

        make_tuned.takes_model = True
        # Dropout masks from a generator seeded by `seed`: a repair's answer is a function of the run
        # and the request, not of the process's RNG state when it is asked.
        rng_state = torch.Generator().manual_seed(int(seed)).get_state()
        tuned = OptimizerRecipe(make_tuned, epochs=epochs, batch_size=self.batch_size, seed=seed, loss=self.loss,
                               loader_options=self.loader_options, rng_state=rng_state,
                               clip_grad_norm=self.clip_grad_norm,
                               description={**self.description, "scheduler": None, "param_groups": [
                                   {**g, "lr": lr_factor * float(g.get("initial_lr", g["lr"])), "initial_lr": None}
                                   for g in self.description.get("param_groups") or []] or None})
        tuned.train_modes = self.train_modes  # a repair trains the modules as the loop did (frozen BatchNorm...)
        return tuned

    def fingerprint(self) -> dict:
        # Keys a run without them never had, so its fingerprint stays as before.
        order = {} if self.shuffle else {"shuffle": False}
        clip = {} if self.clip_grad_norm is None else {"clip_grad_norm": self.clip_grad_norm}
        return {**{k: v for k, v in self.description.items()}, "epochs": self.epochs,
                "batch_size": self.batch_size, "seed": self.seed, **order, **clip}


def _constructor_defaults(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's defaults its class's constructor takes back as keywords. Some classes keep a
    default the constructor does not accept (torch's AdamW stores decoupled_weight_decay=True, which it
    sets itself); the groups carry every hyperparameter anyway."""
    try:
        accepted = inspect.signature(type(optimizer).__init__).parameters
    except (TypeError, ValueError):  # no signature to read: give everything, as before
        return copy.deepcopy(optimizer.defaults)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return copy.deepcopy(optimizer.defaults)
    return {k: copy.deepcopy(v) for k, v in optimizer.defaults.items() if k in accepted}


def to_device(value, device: torch.device):
    """A batch element on `device` (tensors moved; anything else, e.g. a list of strings, as it is)."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    return value
