"""Keep the user's loop (the opacus convention): wrap the model, optimizer and data the user
already has, train with their own loop, answer deletion requests later.

    engine = ue.UnlearningEngine()
    model, optimizer, loader = engine.make_unlearnable(model, optimizer, train_loader, method="mini",
                                                       epochs=5, loss_fn=loss_fn)
    for epoch in range(5):                          # the user's loop, unchanged
        for x, y in loader:
            optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()
    report = engine.unlearner().unlearn([17, 42])

What wrapping does:
  * the data: the dataset becomes a `TrainingData` (ids: the index, or `ids=` e.g. database keys);
    the returned DataLoader keeps the user's settings (workers, collate_fn, pin_memory) and yields
    the batch schedule's batches (`batch_size`, `seed`; a loader with shuffle=False keeps the data's
    own order), so retraining can repeat them without F (sampling the schedule would silently
    replace -- weighted or custom samplers, drop_last -- is refused);
  * the recipe (optimizer class and per-group hyperparameters, scheduler, epochs, loss, the global
    RNG state) is captured now: retraining, fine-tuning and repairs train with it;
  * per method, what it records during training: Mini-Unlearning its anchors and DeltaGrad every
    step, through optimizer step hooks (the batch ids come from the schedule, every param group's
    lr from the optimizer, the momentum settings from the optimizer's groups); PCMU replaces the
    optimizer's step by its own (the returned optimizer is a PCMUOptimizer over the user's SGD,
    pcmu/optimizer.py); Top-K, Random-k, fine-tuning and retraining record nothing. The history
    methods need torch.optim.SGD, plain or with heavy-ball / Nesterov momentum (dampening 0).
A DistributedDataParallel model (history methods only; distributed/ddp.py): the checks, the recipe
and the recording use its replicated module; each rank's loader yields its equal share of every
batch; every rank records the (replicated) history into its own store, and `unlearner()` is
collective: on every rank it returns the distributed unlearner over the model's process group,
which refuses on every rank when the ranks' histories differ (their digests).
Every check that can refuse runs here, before training: the optimizer has not stepped, the loss is
the mean of per-sample losses, the layers suit the method (policy.py), the optimizer suits it.
What only the loop shows (undeclared clipping, accumulation, a scaled loss, another lr schedule,
other epochs) is refused by the run's LoopGuard (loop_guard.py) at the first step that leaves the
recipe, before its update.
"""
from __future__ import annotations

import copy
import inspect
import os

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .baselines import FinetuneUnlearner, RetrainUnlearner
from .checks import FLOAT_DTYPES
from .data import BatchSchedule, TrainingData
from .distributed.ddp import RankShareSampler, check_even_shares, ddp_placement, rank_history_path
from .distributed.history_methods import (DistributedDeltaGradUnlearner, DistributedMiniUnlearner,
                                          RankSplitFlatModel)
from .forward import eval_mode
from .history import HistoryRecorder, HistoryStore
from .loading import SeededDataset, checked_seed
from .loop_guard import LoopGuard
from .mini import DeltaGradUnlearner, MiniUnlearner
from .mini.options import positive_integer
from .mini.record import FULL_GRAD, mini_store, step_store
from .mini.resume import encode_rng_states
from .mini.vectors import FlatModel
from .parameters import trainable
from .pcmu import PCMUTrainer
from .pcmu.optimizer import SET_BY_THE_WRAP, PCMUOptimizer, check_pcmu_wrap
from .perturb import RandomKUnlearner, TopKUnlearner
from .policy import UnsupportedModelError, loss_reduction, per_sample_loss_of, refuse_training_batch_norm
from .recipe import OptimizerRecipe, loader_options, to_device
from .unlearner import Unlearner

METHODS = ("retrain", "finetune", "topk", "randomk", "mini", "deltagrad", "pcmu")
HISTORY_METHODS = ("mini", "deltagrad")
# The methods whose kernels (ops/) take the parameters themselves: float32, float16 or bfloat16 only.
KERNEL_METHODS = ("topk", "randomk", "pcmu")
# The methods that take one learning rate for every parameter at each step and every other
# hyperparameter as a constant of the run (the history methods replay them, PCMU steps with them).
SCHEDULE_CONSTANT_METHODS = ("mini", "deltagrad", "pcmu")
_METHOD_NAMES = {"mini": "Mini-Unlearning", "deltagrad": "DeltaGrad", "pcmu": "PCMU"}


class UnlearningEngine:
    """Makes one training run unlearnable (one engine per run)."""

    def __init__(self):
        self.run: _Run | None = None

    def make_unlearnable(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, data, *, method: str,
                         epochs: int, loss_fn=None, scheduler=None, scheduler_step: str = "epoch",
                         batch_size: int | None = None, seed: int = 0, ids=None, augmentation_seed: int | None = None,
                         history=None, anchors: int = 5, clip_grad_norm: float | None = None, grad_scaler=None,
                         **method_options):
        """Returns (model, optimizer, loader) for the user's loop: the same model and optimizer
        objects (with step hooks where the method records) and a DataLoader over the schedule.

        data: the user's DataLoader (its dataset, batch size, order -- shuffled by `seed`, or the
            dataset's own with shuffle=False -- and settings are taken; a sampler other than plain
            shuffling or the sequential one, a batch sampler of its own or drop_last=True is refused:
            the schedule would replace it), a map-style Dataset (give batch_size; shuffled) or a
            TrainingData.
            Items are (input, target) pairs, or anything the DataLoader's collate_fn makes a pair of.
        loss_fn: the batch loss the loop uses (default: mean cross-entropy); it must reduce by mean
            (sum is accepted by the methods that do not replay gradients).
        scheduler: the user's LR scheduler, stepped once per epoch (scheduler_step="epoch") or per
            step ("step") in the loop; retraining repeats it.
        clip_grad_norm: the max_norm of the loop's torch.nn.utils.clip_grad_norm_(model.parameters(),
            max_norm) between backward and step; retraining, fine-tuning and repairs clip the same
            (retrain, finetune, topk, randomk; the history methods replay and PCMU takes unclipped
            batch gradients). Undeclared clipping is refused at the first step.
        grad_scaler: the loop's torch.amp.GradScaler, if it uses one (mixed precision): with
            clip_grad_norm= the clip is checked against the backward's gradients unscaled by the
            scaler's scale (the loop calls scaler.unscale_(optimizer) before clip_grad_norm_), and a
            step the scaler skips (inf/NaN gradients) is refused naming it (loop_guard.py).
        augmentation_seed: wrap the dataset in a SeededDataset so random augmentation is a function of
            (seed, epoch, id) and retraining sees the same augmentations.
        history: where the history methods record: a HistoryStore (mini_store / step_store make one),
            a path (a disk store there with the method's default codecs; under DistributedDataParallel
            each rank writes its own, `<path>.rank<r>`) or None (in memory, on every rank). PCMU: a path
            (a new disk store of its step records, pcmu/history.py) or None (in memory).
            anchors: Mini-Unlearning's anchor count.
        method_options: passed to the method's Unlearner (e.g. k=0.05 for Top-K); for PCMU to its
            trainer (clip_norm, tau, sigma, mode, max_request, ...; the step size is the optimizer's lr).
            An unlearner option named as an argument of this call (epochs, seed: the training run's)
            takes the prefix unlearn_: unlearn_epochs= for fine-tuning's epochs per request,
            unlearn_seed= for Mini-Unlearning's, Top-K's and Random-k's seed.
            Their names and values are checked here, before training (the unlearner's check_options).
        """
        if self.run is not None:
            raise RuntimeError("this engine already wraps a training run; make one engine per run")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        _check_method_options(method, method_options)
        method_options = _unlearner_names(method, method_options)
        checked_seed(seed)
        positive_integer("epochs", epochs)
        if batch_size is not None:
            positive_integer("batch_size", batch_size)
        if augmentation_seed is not None:
            checked_seed(augmentation_seed, "augmentation_seed")
        data, batch_size, options, shuffle = _training_data(data, batch_size, ids, augmentation_seed)
        user_model, ddp = model, ddp_placement(model)
        if ddp is not None:  # everything below works on the replicated module; the user keeps the DDP wrapper
            _check_ddp(method, len(data), batch_size, ddp)
            model = ddp.module
        loss_fn = torch.nn.CrossEntropyLoss() if loss_fn is None else loss_fn
        reduction = _probe_loss_reduction(loss_fn, model, data)
        data.loss = per_sample_loss_of(loss_fn)
        if clip_grad_norm is not None and method in SCHEDULE_CONSTANT_METHODS:
            hint = " (PCMU clips per-sample gradients itself: clip_norm=)" if method == "pcmu" else ""
            raise UnsupportedModelError(f"{_METHOD_NAMES[method]} works from the batch's unclipped mean gradient; "
                                        f"clip_grad_norm= (clipping in the loop) is for retrain, finetune, topk and "
                                        f"randomk{hint}")
        _check_grad_scaler(method, grad_scaler)
        recipe = OptimizerRecipe.capture(model, optimizer, epochs=epochs, batch_size=batch_size, seed=seed,
                                         loss=loss_fn, scheduler=scheduler, scheduler_step=scheduler_step,
                                         shuffle=shuffle, clip_grad_norm=clip_grad_norm)
        recipe.loader_options = options
        _check_method_option_values(method, method_options, model, optimizer, recipe)
        schedule = BatchSchedule(data.ids, batch_size, seed, shuffle)
        if method in SCHEDULE_CONSTANT_METHODS:  # first: a scheduler explains what the checks below would see
            _check_schedule_replayable(method, model, recipe, len(data), schedule.batches_per_epoch)
        if method in HISTORY_METHODS:
            _check_history_method(method, model, optimizer, reduction)
        if method in KERNEL_METHODS:
            _check_kernel_dtypes(method, model)
        if method == "pcmu":
            check_pcmu_wrap(model, optimizer)
        # Each pass starts at the loop's next optimizer step (the run's, once it exists).
        batches = data.loop_sampler(schedule, lambda: self.run.next_step(), recipe.epoch_rng_states)
        if ddp is not None:  # each rank loads its share of every batch
            batches = RankShareSampler(batches, ddp.rank, ddp.world)
        loader = DataLoader(data.items, batch_sampler=batches, **options)
        pcmu = None
        if method == "pcmu":  # before the run is set: its options may still be refused
            if history is not None:
                if not isinstance(history, (str, os.PathLike)):
                    raise TypeError(f"history for PCMU must be a path or None, got {type(history).__name__}")
                method_options = dict(method_options, history=_new_history_path(
                    history, "continue a recorded PCMU run with PCMUTrainer(..., history=path)"))
            pcmu = PCMUOptimizer(model, optimizer, data, batch_size=batch_size, seed=seed, shuffle=shuffle,
                                 steps=recipe.steps(len(data)), loss_fn=loss_fn, loss_reduction=reduction,
                                 first_batch_loss=_first_batch_loss(model, data, recipe, schedule), **method_options)
        if method in HISTORY_METHODS:
            history = _history_store(history, mini_store if method == "mini" else step_store, model, ddp)
        self.run = _Run(method, model, optimizer, data, recipe, schedule, copy.deepcopy(model), method_options)
        self.run.ddp = ddp
        if method != "pcmu":  # PCMU's optimizer holds its own loop to the schedule (pcmu/optimizer.py)
            # First, so that its refusals come before any method's recording in the same step.
            self.run.guard = LoopGuard(model, optimizer, self.run.initial, recipe, len(data),
                                       batches_per_epoch=schedule.batches_per_epoch, ddp=ddp,
                                       first_batch_loss=_first_batch_loss(model, data, recipe, schedule),
                                       grad_scaler=grad_scaler)
        if method == "mini":
            self.run.recorder = _AnchorRecorder(self.run, history, anchors)
        elif method == "deltagrad":
            self.run.recorder = _StepHistory(self.run, history)
        elif method == "pcmu":
            self.run.recorder = optimizer = pcmu
        return user_model, optimizer, loader

    @property
    def data(self) -> TrainingData:
        return self._require_run().data

    @property
    def recipe(self) -> OptimizerRecipe:
        return self._require_run().recipe

    @property
    def initial(self) -> torch.nn.Module:
        """A copy of the model as it was wrapped (what retraining starts from)."""
        return self._require_run().initial

    @property
    def trained(self) -> torch.nn.Module:
        """A copy of the model after training, before any request (to judge a result: doing nothing)."""
        run = self._require_run()
        if run.trained is None:
            raise RuntimeError("the trained model is taken when the unlearner is first asked for: call unlearner()")
        return run.trained

    def unlearner(self) -> Unlearner:
        """The method's Unlearner for the trained model (built once, after training; later calls
        return the same one). Under DistributedDataParallel the first call is collective: make it on
        every rank; each rank gets the distributed unlearner, whose requests are collective too."""
        run = self._require_run()
        if run.unlearner is None:
            if run.guard is not None:
                run.guard.check_finished()
            run.trained = copy.deepcopy(run.model)
            run.unlearner = run.build()
        return run.unlearner

    def _require_run(self) -> "_Run":
        if self.run is None:
            raise RuntimeError("nothing is wrapped yet: call make_unlearnable first")
        return self.run


class _Run:
    def __init__(self, method, model, optimizer, data, recipe, schedule, initial, options):
        self.method, self.model, self.optimizer, self.data = method, model, optimizer, data
        self.recipe, self.schedule, self.initial, self.options = recipe, schedule, initial, options
        self.recorder = None
        self.unlearner = None
        self.trained = None
        self.ddp = None  # the DDPPlacement of a DistributedDataParallel model
        self.guard: LoopGuard | None = None  # holds the user's loop to the recipe (every method but PCMU)

    def next_step(self) -> int:
        """The schedule step the user's loop takes next (the loader's pass starts there)."""
        return self.recorder.trainer.steps_done if self.method == "pcmu" else self.guard.step

    def build(self) -> Unlearner:
        m, o = self.method, self.options
        if m == "retrain":
            return RetrainUnlearner(self.model, self.initial, self.data, self.recipe)
        if m == "finetune":
            return FinetuneUnlearner(self.model, self.data, self.recipe, **o)
        if m in ("topk", "randomk"):
            cls = TopKUnlearner if m == "topk" else RandomKUnlearner
            return cls(self.model, self.data, self.recipe, **{"initial": self.initial, **o})
        if m == "pcmu":  # its options went to its trainer when wrapping
            return self.recorder.unlearner()
        return self.recorder.unlearner(**o)


# The Unlearner each method's unlearner() builds after training, whose keyword options method_options are.
# PCMU's options go to its trainer when wrapping (and are checked there).
_UNLEARNER_CLASSES = {"retrain": RetrainUnlearner, "finetune": FinetuneUnlearner, "topk": TopKUnlearner,
                      "randomk": RandomKUnlearner, "mini": MiniUnlearner, "deltagrad": DeltaGradUnlearner}


# The prefix of an unlearner option whose name make_unlearnable takes itself (the training run's
# epochs and seed): make_unlearnable(method="finetune", epochs=5, unlearn_epochs=2).
SHADOWED_PREFIX = "unlearn_"


def _make_unlearnable_names() -> set:
    return {name for name, p in inspect.signature(UnlearningEngine.make_unlearnable).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _option_names(cls) -> dict:
    """The keyword options of an unlearner's constructor with their defaults, by the names
    make_unlearnable takes them under (SHADOWED_PREFIX before a name it takes itself)."""
    own = _make_unlearnable_names()
    return {(SHADOWED_PREFIX + name if name in own else name): default
            for name, default in _keyword_defaults(cls).items()}


def _unlearner_names(method: str, options: dict) -> dict:
    """make_unlearnable's method options by the unlearner's own names (SHADOWED_PREFIX taken off)."""
    if method == "pcmu":
        return options
    own = _make_unlearnable_names()
    return {(name[len(SHADOWED_PREFIX):] if name.startswith(SHADOWED_PREFIX) and name[len(SHADOWED_PREFIX):] in own
             else name): value for name, value in options.items()}


def _check_grad_scaler(method: str, scaler) -> None:
    if scaler is None:
        return
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler (the loop's), got {type(scaler).__name__}")
    if method == "pcmu":  # its per-sample sums are taken in the backward, at the scaled loss, before unscale_
        raise UnsupportedModelError("PCMU takes per-sample gradients inside the backward, before GradScaler "
                                    "unscales them: grad_scaler= (mixed precision with loss scaling) is for "
                                    "retrain, finetune, topk, randomk, mini and deltagrad")


def _check_method_options(method: str, options: dict) -> None:
    """A method option the unlearner does not take, refused when wrapping: the unlearner is built
    after training, which a misspelt option would otherwise cost before its TypeError. PCMU's
    options go to its trainer, built when wrapping: one it does not take, or a required one missing,
    is named here as an option of this call (the trainer's TypeError would name its constructor)."""
    call = f"make_unlearnable(method={method!r})"
    if method == "pcmu":
        given = next((k for k in SET_BY_THE_WRAP if k in options), None)
        if given is not None:
            raise ValueError(f"{given}= is not an option of {call}: the step size is the optimizer's lr; the data, "
                             "ids, order, steps, loss and history are those given to make_unlearnable")
        defaults = {k: v for k, v in _keyword_defaults(PCMUTrainer).items() if k not in SET_BY_THE_WRAP}
        missing = [k for k, v in defaults.items() if v is inspect.Parameter.empty and k not in options]
        if missing:
            raise TypeError(f"{call} needs the PCMU option(s) {', '.join(k + '=' for k in missing)} (e.g. "
                            "clip_norm=1.0, tau=0.006, sigma=0.01; docs/design.md §4)")
        unknown = sorted(set(options) - set(defaults))
    else:
        defaults = _option_names(_UNLEARNER_CLASSES[method])
        unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"{call} takes no option {', '.join(map(repr, unknown))}; its options: "
                        f"{', '.join(sorted(defaults)) or 'none'}")


def _check_method_option_values(method: str, options: dict, model, optimizer, recipe) -> None:
    """The option values the unlearner would refuse when built after training (k out of range,
    burn_in < 0, ...), refused when wrapping by the unlearner's own check_options, which its
    constructor calls too: the options given over the constructor's defaults, plus the model, the
    recipe and the optimizer's momentum for the checks that read them (Top-K's count of elements,
    its repair's optimizer, Mini's unstable='equilibrium', derived for plain SGD)."""
    cls = _UNLEARNER_CLASSES.get(method)
    check = getattr(cls, "check_options", None)
    if check is None:
        return
    momentum = float(optimizer.param_groups[0].get("momentum", 0.0) or 0.0)
    values = {**_keyword_defaults(cls), **options, "model": model, "config": recipe, "momentum": momentum}
    check(**{name: values[name] for name in inspect.signature(check).parameters})


def _keyword_defaults(cls) -> dict:
    """The keyword-only options of an unlearner's constructor, with their defaults."""
    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _training_data(data, batch_size, ids, augmentation_seed):
    """(TrainingData, batch size, DataLoader options, shuffle) from what the user gave; shuffle is
    False for a DataLoader drawing the data's own order (shuffle=False), True otherwise."""
    options, shuffle = {}, True
    if isinstance(data, DataLoader):
        if isinstance(data.dataset, torch.utils.data.IterableDataset):
            raise TypeError("the DataLoader streams an IterableDataset: deletion requests name items by index or "
                            "id, so wrap a map-style dataset (with __len__ and __getitem__)")
        plain_batch_size, shuffle = _plain_batch_size(data)  # checked even when batch_size= is given
        batch_size = batch_size or plain_batch_size
        options = loader_options(data)
        data = data.dataset
    if isinstance(data, TrainingData):
        if ids is not None:
            raise ValueError("the TrainingData has its ids already; do not pass ids=")
        if augmentation_seed is not None:
            raise ValueError("augmentation_seed wraps a dataset: wrap it before making the TrainingData")
        training = data
    elif isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        items = data if augmentation_seed is None else SeededDataset(data, augmentation_seed)
        training = TrainingData(items, ids=ids)
    else:
        raise TypeError(f"data must be a DataLoader, a map-style Dataset or a TrainingData, got {type(data).__name__}")
    if batch_size is None:
        raise ValueError("give batch_size= (or pass the DataLoader the loop uses)")
    if "collate_fn" in options:
        training.collate = options["collate_fn"]
    return training, int(batch_size), options, shuffle


# Integer class targets torch's class-index losses (cross_entropy, nll_loss) refuse; they take int64 and uint8.
NARROW_INTEGER_TARGETS = (torch.int8, torch.int16, torch.int32)


def _probe_loss_reduction(loss_fn, model, data: TrainingData) -> str:
    """How the loss reduces (policy.loss_reduction), found on the first items before training.
    Targets of a narrow integer dtype that the loss refuses are named, with the fix: torch's message
    alone would not say that the dataset's labels are the cause. They are not converted: the loop
    feeds the loss the same batches, and a conversion the user did not write would hide it."""
    if len(data) < 2:
        return "mean"
    with torch.random.fork_rng(devices=[]):  # the probe (loading included) must not move the user's RNG
        x, y = data.batch(data.ids[:32])
        try:
            return loss_reduction(loss_fn, model, x, y)
        except RuntimeError as exc:
            _refuse_narrow_integer_targets(y, exc)
            raise


def _refuse_narrow_integer_targets(y, exc: RuntimeError) -> None:
    if isinstance(y, torch.Tensor) and y.dtype in NARROW_INTEGER_TARGETS:
        raise TypeError(f"the dataset's targets are {y.dtype} and the loss refuses them ({exc}); torch's "
                        "class-index losses take int64 (or uint8): make the dataset or collate_fn return "
                        "torch.long labels (torch.as_tensor(y, dtype=torch.long))") from None


def _plain_batch_size(loader: DataLoader) -> tuple[int, bool]:
    """(batch size, shuffle) of a loader whose batches the schedule can take over, refused otherwise.

    The returned loader draws the schedule's batches: every item once per epoch, in a seeded order
    or in the data's own order (what retraining repeats). Plain shuffling only sets an order (`seed=`
    decides it); a SequentialSampler (shuffle=False) is kept: the schedule's order is then the
    dataset's, every epoch. A sampler that weights, repeats or subsets items, a batch sampler
    of the user's, or dropping the last short batch would be silently replaced, so they are refused."""
    how = (" Pass a DataLoader with batch_size= and shuffle=True or shuffle=False (or the dataset with "
           "batch_size=)")
    batches = loader.batch_sampler
    if batches is None:
        raise ValueError("the DataLoader has batch_size=None: it yields single items, unbatched; the unlearner "
                         "trains and retrains on the batch schedule's batches." + how)
    if type(batches) is not torch.utils.data.BatchSampler:
        raise ValueError(f"the DataLoader's batch_sampler ({type(batches).__name__}) decides which items each batch "
                         "holds; unlearning needs the batch schedule's batches (a seeded order cut into fixed "
                         "batches), which retraining repeats without the forgotten items." + how)
    sampler = batches.sampler
    if not _orders_every_item_once(sampler, len(loader.dataset)):
        hint = ("; under DistributedDataParallel give the whole step's batch size: each rank's loader then yields "
                "its share" if isinstance(sampler, DistributedSampler) else "")
        raise ValueError(f"the DataLoader's sampler ({type(sampler).__name__}) decides which items each epoch "
                         "draws; unlearning needs the batch schedule's draw, every item once per epoch in a "
                         "seeded order (seed=), which retraining repeats without the forgotten items." + how + hint)
    if batches.drop_last:
        raise ValueError("the DataLoader has drop_last=True; the batch schedule keeps every item in every epoch "
                         "(an epoch's last batch may be shorter), and retraining repeats that schedule. Pass "
                         "drop_last=False")
    return batches.batch_size, type(sampler) is not torch.utils.data.SequentialSampler


def _orders_every_item_once(sampler, n: int) -> bool:
    if type(sampler) is torch.utils.data.SequentialSampler:
        return True
    return (type(sampler) is torch.utils.data.RandomSampler and not sampler.replacement
            and sampler.num_samples == n)


def _check_kernel_dtypes(method: str, model: torch.nn.Module) -> None:
    """Refused when wrapping: otherwise the kernel's dtype check would fail the first request (Top-K,
    Random-k) or the first step (PCMU), after the user trained."""
    other = [(n, p.dtype) for n, p in trainable(model).items() if p.dtype not in FLOAT_DTYPES]
    if other:
        name, dtype = other[0]
        raise UnsupportedModelError(f"method={method!r} runs its kernels on the parameters, which take float32, "
                                    f"float16 or bfloat16; parameter {name!r} is {dtype}. Train in float32 "
                                    "(model.float()), or use mini, deltagrad, finetune or retrain, which take "
                                    "float64 models")


def _check_ddp(method: str, n: int, batch_size: int, ddp) -> None:
    """What a DistributedDataParallel model in the user's loop supports (distributed/ddp.py)."""
    if method not in HISTORY_METHODS:
        hint = (" (PCMU computes its own update across ranks: unlearn_ext.distributed.DistributedPCMUTrainer)"
                if method == "pcmu" else "")
        raise UnsupportedModelError(f"a DistributedDataParallel model is supported for the history methods "
                                    f"({', '.join(HISTORY_METHODS)}), not for method={method!r}{hint}")
    check_even_shares(n, batch_size, ddp.world)


def _check_schedule_replayable(method: str, model, recipe: OptimizerRecipe, n: int, batches_per_epoch: int) -> None:
    """Refuses, before training, a scheduler that gives the param groups different learning rates at
    some step (per-group lambdas, a list of max_lr) or changes another hyperparameter during the run
    (OneCycleLR / CyclicLR cycle momentum by default): the history methods would replay it as a
    constant, silently wrong, and PCMU would stop mid-run. The recipe's schedule is run alone,
    over every step, on an optimizer that never steps (recipe.scheduled_param_groups)."""
    if recipe.scheduler_factory is None:  # constant hyperparameters: the method's own checks cover them
        return
    name, scheduler = _METHOD_NAMES[method], recipe.description["scheduler"]
    others = "retrain, finetune, topk and randomk repeat any schedule"
    first = None
    for t, groups in recipe.scheduled_param_groups(model, recipe.steps(n), batches_per_epoch):
        lrs = [float(g["lr"]) for g in groups]
        if any(lr != lrs[0] for lr in lrs):
            raise UnsupportedModelError(
                f"{name} takes one learning rate for every parameter at each step; the scheduler {scheduler} gives "
                f"the optimizer's param groups the rates {lrs} at step {t}: use one schedule for every group (or one "
                f"group), or another method ({others})")
        settings = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in groups]
        if first is None:
            first = settings
            continue
        for now, before in zip(settings, first):
            changed = next((k for k in before if not _same_value(now.get(k), before[k])), None)
            if changed is not None:
                hint = f" (pass cycle_momentum=False to {scheduler})" if changed in ("momentum", "betas") else ""
                raise UnsupportedModelError(
                    f"{name} takes the optimizer's {changed} as a constant of the run; the scheduler {scheduler} "
                    f"changes it from {before[changed]!r} at step 0 to {now.get(changed)!r} at step {t}: keep it "
                    f"constant{hint}, or use another method ({others})")


def _same_value(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def _check_history_method(method: str, model, optimizer, reduction: str) -> None:
    """What the history methods' linear response and replay assume, refused before training."""
    name = "Mini-Unlearning" if method == "mini" else "DeltaGrad"
    refuse_training_batch_norm(model, name, "the gradients of single samples and of subsets it replays")
    if reduction != "mean":
        what = "sums over the batch" if reduction == "sum" else (
            "is neither the mean nor the sum of its per-sample losses (e.g. a class-weighted mean, or a mean over "
            "tokens with ignore_index, which divides by the batch's count of targets)")
        raise UnsupportedModelError(f"{name} replays mean batch gradients; the loss {what}. Use a loss with "
                                    "reduction='mean' over unweighted per-sample losses")
    if type(optimizer) is not torch.optim.SGD:
        why = (": Adam-type optimizers scale each coordinate by running averages of past gradients, so a "
               "retrained run's steps depend nonlinearly on its whole gradient history"
               if "Adam" in type(optimizer).__name__ else "")
        raise UnsupportedModelError(f"{name} replays torch.optim.SGD (plain, heavy-ball or Nesterov momentum, with "
                                    f"weight decay); got {type(optimizer).__name__}, whose update it cannot replay"
                                    f"{why}. Top-K, Random-k, fine-tuning and retraining accept any optimizer")
    groups = optimizer.param_groups
    for key in ("lr", "weight_decay", "momentum", "nesterov", "dampening", "maximize"):
        values = [g.get(key) for g in groups]
        if any(v != values[0] for v in values):
            raise UnsupportedModelError(f"{name} replays one {key} for every parameter; the optimizer's groups "
                                        f"use {values}")
    group = groups[0]
    if group.get("maximize"):
        raise UnsupportedModelError(f"{name} replays gradient descent; the optimizer has maximize=True")
    momentum = float(group.get("momentum", 0.0))
    if not 0.0 <= momentum < 1.0:
        raise UnsupportedModelError(f"{name} needs momentum in [0, 1) (the trajectory gap must contract); the "
                                    f"optimizer has momentum={momentum}")
    if momentum and group.get("dampening", 0):
        raise UnsupportedModelError(f"{name} replays momentum with dampening 0; the optimizer has "
                                    f"dampening={group['dampening']!r}")
    covered = {id(p) for g in groups for p in g["params"]}
    missing = [n for n, p in trainable(model).items() if id(p) not in covered]
    if missing:
        raise UnsupportedModelError(f"{name}: the optimizer does not train every trainable parameter (missing: "
                                    f"{', '.join(missing[:5])}); freeze them (requires_grad=False) or add them")


class _StepCounter:
    """An optimizer step pre-hook that records at the schedule's step t (the run's LoopGuard counts
    the steps and refuses a loop that leaves the recipe, before this hook runs)."""

    def __init__(self, run: _Run):
        self.run = run
        self.lrs: list[float] = []
        self.weight_decay = float(run.optimizer.param_groups[0].get("weight_decay", 0.0))
        self.sharpness: list = []  # [step, eta_t * lambda_max] (record_sharpness)
        self.sharpness_cost = 0    # sample-gradients the estimates took during training
        run.optimizer.register_step_pre_hook(self._before_step)

    def _before_step(self, optimizer, args, kwargs):
        t = self.run.guard.step
        self.lrs.append(float(optimizer.param_groups[0]["lr"]))
        self.on_step(t)

    def on_step(self, t: int) -> None:
        raise NotImplementedError

    def run_info(self, **extra) -> dict:
        r, n = self.run.recipe, len(self.run.data)
        order = {} if r.shuffle else {"batch_shuffle": False}  # read by the exact fallback (mini/resume.py)
        # The loop's RNG state at each epoch's start, which retraining starts each epoch from: the
        # history methods' exact fallback does too (mini/resume.py, Randomness).
        rng = {"epoch_rng_states": encode_rng_states(r.epoch_rng_states)} if r.epoch_rng_states else {}
        # The modules' training modes of the loop's steps, which the fallback trains in (mini/resume.py).
        modes = {} if r.train_modes is None else {"train_modes": r.train_modes}
        return {"steps_per_epoch": self.run.schedule.batches_per_epoch, "batch_seed": r.seed, "batch_size": r.batch_size,
                "epochs": r.epochs, "n": n, "lr_schedule": self.lrs, **order, **rng, **modes, **extra}

    def record_sharpness(self, flat, w, t: int, lr: float | None = None) -> None:
        """eta_t * lambda_max at step t into the history's run_info (mini/sharpness.py), as the
        library's own recorders do: an unlearner that will fall back then knows it before any work,
        so the fallback costs what retraining costs. Seeded by t, so the user's RNG is untouched."""
        from .mini.record import record_sharpness
        with eval_mode(self.run.model):
            self.sharpness_cost += record_sharpness(self.store, self.sharpness, flat, w, t,
                                                    self.lrs[t] if lr is None else lr, self.weight_decay)


class _AnchorRecorder(_StepCounter):
    """Mini-Unlearning's anchors from the user's loop: at each anchor step the weights and the
    full-data gradient (eval mode, plus weight decay), recorded before the update."""

    def __init__(self, run: _Run, store, anchors: int):
        from .mini.record import anchor_epochs
        self.store = store
        self.spe = run.schedule.batches_per_epoch
        self.anchor_epochs = anchor_epochs(run.recipe.epochs, anchors)
        self.anchor_steps = {a * self.spe for a in self.anchor_epochs}
        # Hooks run in registration order: ours (attaching the anchor's gradient) before the recorder's.
        super().__init__(run)
        self.recorder = HistoryRecorder(self.store, run.model, run.optimizer, steps=self.anchor_steps)

    def full_gradient(self):
        flat = _flat_model(self.run)
        w = flat.flat()
        with eval_mode(self.run.model):
            g = flat.mean_loss_grad(w, self.run.data.ids) + self.weight_decay * w
        return flat, w, g

    def on_step(self, t: int) -> None:
        # Under DDP the ranks take the full-data gradient together (_flat_model), in the same step.
        if t in self.anchor_steps:
            refuse_training_batch_norm(self.run.model, "Mini-Unlearning", "the gradients it replays")
            flat, w, g = self.full_gradient()
            self.recorder.attach(**{FULL_GRAD: flat.split(g)})
            if t > 0:
                self.record_sharpness(flat, w, t)

    def unlearner(self, **options):
        end = self.run.recipe.steps(len(self.run.data))
        if end in self.anchor_steps and (not self.store.steps or self.store.steps[-1] < end):
            flat, w, g = self.full_gradient()
            self.store.record(end, {"params": flat.split(w), FULL_GRAD: flat.split(g)}, lr=None)
            if end > 0:  # at the trained weights, with the last step's lr (as MiniRecorder does)
                self.record_sharpness(flat, w, end, lr=self.lrs[-1])
        self.store.set_run_info(**self.run_info(anchor_epochs=self.anchor_epochs,
                                                recorded_by="unlearn_ext.UnlearningEngine"))
        return _history_unlearner(self.run, MiniUnlearner, DistributedMiniUnlearner, self.store, options)


class _StepHistory(_StepCounter):
    """DeltaGrad's per-step history from the user's loop: w_t, the batch's mean gradient (p.grad
    after the user's backward), every group's lr and the schedule's batch ids."""

    def __init__(self, run: _Run, store):
        from .mini.record import anchor_epochs
        self.store = store
        super().__init__(run)  # first: the batch ids must be set before the recorder's hook runs
        self.recorder = HistoryRecorder(self.store, run.model, run.optimizer)
        # The edge-of-stability estimate where the library's StepRecorder takes it: at Mini's
        # geometric anchor epochs and at the last step.
        spe, total = run.schedule.batches_per_epoch, run.recipe.steps(len(run.data))
        self.sharpness_steps = {a * spe for a in anchor_epochs(run.recipe.epochs) if 0 < a * spe < total} | {total - 1}

    def on_step(self, t: int) -> None:
        self.recorder.batch(self.run.schedule.step(t).ids)  # the whole batch (under DDP this rank loaded a share)
        if t in self.sharpness_steps:
            flat = _flat_model(self.run)
            self.record_sharpness(flat, flat.flat(), t)

    def unlearner(self, **options):
        self.store.set_run_info(**self.run_info(recorded_by="unlearn_ext.UnlearningEngine"))
        return _history_unlearner(self.run, DeltaGradUnlearner, DistributedDeltaGradUnlearner, self.store, options)


def _history_store(history, make, model, ddp):
    """The store this rank records into (make_unlearnable's `history`), refused before training
    when it is neither a HistoryStore, a path nor None."""
    if history is None:
        return make(model)
    if isinstance(history, HistoryStore):
        return history
    if isinstance(history, (str, os.PathLike)):
        path = _new_history_path(history if ddp is None else rank_history_path(history, ddp.rank),
                                 f"pass history=ue.{make.__name__}(model, tier='disk', path=..., overwrite=True)")
        return make(model, tier="disk", path=path)
    raise TypeError(f"history must be a HistoryStore, a path or None, got {type(history).__name__}")


def _new_history_path(history, hint: str) -> str:
    """make_unlearnable's history path, refused when a file is there: the run records anew (the
    store refuses it too, but its hint, HistoryStore.open, does not apply to a run started here)."""
    path = os.fspath(history)
    if os.path.exists(path):
        raise FileExistsError(f"history={path!r} exists: make_unlearnable records this run's history there "
                              f"anew. Remove it (a run trained again after a restart records it again), or {hint}")
    return path


def _first_batch_loss(model, data: TrainingData, recipe: OptimizerRecipe, schedule: BatchSchedule):
    """() -> the loss retraining backpropagates at step 0: the schedule's first batch loaded as
    retraining loads it (the recipe's collate_fn, in this process), through the model and the
    recipe's loss (what LoopGuard compares the loop's first gradients with, loss_probe.py)."""
    def loss() -> torch.Tensor:
        collate = {k: v for k, v in recipe.loader_options.items() if k == "collate_fn"}
        x, y = next(iter(DataLoader(data.items, batch_sampler=data.sampler(schedule), **collate)))
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return recipe.batch_loss(data, model(to_device(x, device)), to_device(y, device))
    return loss


def _flat_model(run: _Run) -> FlatModel:
    """The flat view the recorders take full-data gradients and sharpness estimates with. Under DDP
    a mean gradient is split: each rank computes its slice of the ids and the ranks' sums are added
    in rank order, so every rank records the same bits at 1/world of the sample-gradients each. The
    sharpness estimate's Hessian products (a small subsample) run whole on every rank, the same
    arithmetic on the same weights; the digest check at unlearner() catches a rank that differs."""
    if run.ddp is None:
        return FlatModel(run.model, run.data)
    return RankSplitFlatModel(run.model, run.data, run.ddp.group)


def _history_unlearner(run: _Run, single, distributed, store, options) -> Unlearner:
    """The unlearner over the recorded history: under DDP the distributed one on every rank, over
    the model's process group (its construction refuses on every rank when the ranks' history
    digests, weights, data or options differ)."""
    if run.ddp is None:
        return single(run.model, run.data, store, **options)
    return distributed(run.model, run.data, store, group=run.ddp.group, **options)
