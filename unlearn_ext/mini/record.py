"""Training side of the history methods: what an ordinary SGD run records (docs/design.md §6).

Mini-Unlearning needs K geometric anchors: at epochs a_k = round(E^(k/K)), k = 1..K (a_K = E), the
weights w_{a_k} and the full-data gradient g_k = grad L_D(w_{a_k}) (including weight_decay * w);
plus the learning-rate schedule, steps per epoch and the batch seed (store.run_info). We also
record epoch 0 (the initial weights) — our choice: epoch 0's weights are where the fallback
resumes (exact retraining), and the optional delta_rule="interp" (mini/propagate.py) uses its
drift; the default rule does not read it. Cost: (K + 1) * n sample-gradients; 2(K + 1)d
stored values.

DeltaGrad needs every step: the weights w_t before step t, the batch's mean loss gradient at w_t
(without weight decay, as `p.grad` holds it in a torch.optim.SGD loop recorded by HistoryRecorder),
the batch ids and the learning rate.

    store = mini_store(model, codec="fp32")                        # or tier="disk", path=...
    train_sgd(model, data, config, on_step=MiniRecorder(store, data, config))   # the added line
    # (MiniRecorder records the final anchor itself when the last step has run: see finish())

Both methods replay torch.optim.SGD with weight decay, plain or with heavy-ball / Nesterov momentum
(dampening 0); `check_replayable_sgd` refuses anything else with a message (Adam, dampening,
maximize, hyperparameters that differ between param groups) and returns the settings the replay
needs (`SGDSettings`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..data import SGDConfig, TrainingData
from ..history import HistoryStore
from .sharpness import SHARPNESS_KEY, estimate_eta_lambda
from .vectors import FlatModel

FULL_GRAD = "full_grad"   # Mini-Unlearning's anchor field: grad L_D(w) including weight decay


class UnsupportedOptimizerError(ValueError):
    """The recorded run did not use plain SGD (momentum, Nesterov, Adam, ...)."""


def anchor_epochs(epochs: int, count: int = 5) -> list:
    """[0] + the geometric anchors round(E^(k/K)), k = 1..K (duplicates merged; the last is E)."""
    if epochs < 1 or count < 1:
        raise ValueError(f"need epochs >= 1 and count >= 1, got epochs={epochs}, count={count}")
    return sorted({0} | {round(epochs ** (k / count)) for k in range(1, count + 1)})


def mini_store(model, codec: str = "fp32", **store_kw) -> HistoryStore:
    """A store for Mini-Unlearning's anchors: 'params' (closed-loop deltas for int codecs) and
    'full_grad', both in `codec`. store_kw: tier, path, keyframe_every, block_size."""
    return HistoryStore.for_model(model, params=codec, grads=None, extra={FULL_GRAD: codec}, **store_kw)


def step_store(model, params: str = "int8", grads: str = "int8", **store_kw) -> HistoryStore:
    """A store for DeltaGrad's per-step history (grads stored plainly: products run on the codes)."""
    return HistoryStore.for_model(model, params=params, grads=grads, **store_kw)


def _run_info(data: TrainingData, config: SGDConfig, recorded_by: str, **extra) -> dict:
    steps = config.steps(len(data))
    return {"optimizer": "SGD", "momentum": float(config.momentum), "nesterov": bool(config.nesterov), "dampening": 0.0,
            "weight_decay": float(config.weight_decay), "steps_per_epoch": math.ceil(len(data) / config.batch_size),
            "batch_seed": int(config.seed), "batch_size": int(config.batch_size), "epochs": int(config.epochs),
            "n": len(data), "lr_schedule": [config.lr_at(t) for t in range(steps)], "recorded_by": recorded_by,
            **extra}


class MiniRecorder:
    """train_sgd's on_step callback recording Mini-Unlearning's anchors into `store`.

    anchors: K (geometric anchors, `anchor_epochs`) or an explicit list of epochs (0..E). An anchor
    at epoch a is the weights after a epochs, i.e. before step a * steps_per_epoch. on_step runs
    before a step, so the anchor at epoch E (after the last step) needs finish() after training;
    `train_recording_anchors` does both."""

    def __init__(self, store: HistoryStore, data: TrainingData, config: SGDConfig, anchors=5):
        if FULL_GRAD not in store.fields or "params" not in store.fields:
            raise ValueError(f"the store must record 'params' and {FULL_GRAD!r} (make it with mini_store)")
        self.store, self.data, self.config = store, data, config
        epochs = anchor_epochs(config.epochs, anchors) if isinstance(anchors, int) else sorted(set(anchors))
        if epochs[0] < 0 or epochs[-1] > config.epochs:
            raise ValueError(f"anchor epochs must lie in 0..{config.epochs}, got {epochs}")
        self.spe = math.ceil(len(data) / config.batch_size)
        self.anchor_steps = {a * self.spe: a for a in epochs}
        self.sample_gradients = 0
        self.sharpness = []  # [step, eta * lambda_max] at the anchors after epoch 0 (mini/sharpness.py)
        store.set_run_info(**_run_info(data, config, "unlearn_ext.mini.MiniRecorder", anchor_epochs=epochs))

    def __call__(self, t: int, ids, model) -> None:
        if t in self.anchor_steps:
            self.record_anchor(t, model)

    def finish(self, model) -> None:
        """Records the anchor after the last step (epoch E), if it is one."""
        end = self.config.epochs * self.spe
        if end in self.anchor_steps and (not self.store.steps or self.store.steps[-1] < end):
            self.record_anchor(end, model)

    def record_anchor(self, t: int, model) -> None:
        flat = FlatModel(model, self.data)
        w = flat.flat()
        g = flat.mean_loss_grad(w, self.data.ids) + self.config.weight_decay * w
        self.sample_gradients += len(self.data)
        last = self.config.steps(len(self.data)) - 1
        lr = self.config.lr_at(t) if t <= last else None
        self.store.record(t, {"params": flat.split(w), FULL_GRAD: flat.split(g)}, lr=lr)
        if t > 0:
            self.sample_gradients += record_sharpness(self.store, self.sharpness, flat, w, t,
                                                      self.config.lr_at(min(t, last)), self.config.weight_decay)


def record_sharpness(store: HistoryStore, values: list, flat, w, step: int, lr: float, weight_decay: float) -> int:
    """Appends [step, eta * lambda_max] (mini/sharpness.py) to `values`, writes the list to the
    store's run_info and returns the estimate's sample-gradient cost."""
    value, cost = estimate_eta_lambda(flat, w, lr, weight_decay, seed=step)
    values.append([int(step), value])
    store.set_run_info(**{SHARPNESS_KEY: values})
    return cost


def train_recording_anchors(model, data: TrainingData, config: SGDConfig, store: HistoryStore,
                            anchors=5) -> MiniRecorder:
    """train_sgd with Mini-Unlearning's anchors recorded into `store` (model trained in place)."""
    from ..data import train_sgd
    recorder = MiniRecorder(store, data, config, anchors)
    train_sgd(model, data, config, on_step=recorder)
    recorder.finish(model)
    return recorder


class StepRecorder:
    """train_sgd's on_step callback recording DeltaGrad's per-step history: w_t, the batch's mean
    loss gradient at w_t (no weight decay), batch ids and lr. Computing the gradient here doubles the
    training step's cost; in a torch.optim.SGD loop HistoryRecorder records p.grad for free."""

    def __init__(self, store: HistoryStore, data: TrainingData, config: SGDConfig):
        if "params" not in store.fields or "grads" not in store.fields:
            raise ValueError("the store must record 'params' and 'grads' (make it with step_store)")
        self.store, self.data, self.config = store, data, config
        spe = math.ceil(len(data) / config.batch_size)
        # The edge-of-stability estimate at the steps of Mini's geometric anchors and the last step.
        self.sharpness_steps = {a * spe for a in anchor_epochs(config.epochs) if a > 0} & set(
            range(config.steps(len(data)))) | {config.steps(len(data)) - 1}
        self.sharpness, self.sample_gradients = [], 0
        store.set_run_info(**_run_info(data, config, "unlearn_ext.mini.StepRecorder"))

    def __call__(self, t: int, ids, model) -> None:
        flat = FlatModel(model, self.data)
        w = flat.flat()
        g = flat.mean_loss_grad(w, ids)
        self.store.record(t, {"params": flat.split(w), "grads": flat.split(g)}, lr=self.config.lr_at(t),
                          batch_ids=ids)
        if t in self.sharpness_steps:
            self.sample_gradients += record_sharpness(self.store, self.sharpness, flat, w, t, self.config.lr_at(t),
                                                      self.config.weight_decay)


def train_recording_steps(model, data: TrainingData, config: SGDConfig, store: HistoryStore) -> StepRecorder:
    from ..data import train_sgd
    recorder = StepRecorder(store, data, config)
    train_sgd(model, data, config, on_step=recorder)
    return recorder


@dataclass(frozen=True)
class SGDSettings:
    """What the history methods replay of a recorded torch.optim.SGD run: one weight decay and one
    momentum for every parameter, heavy ball or Nesterov (dampening 0); momentum 0 is plain SGD."""
    weight_decay: float = 0.0
    momentum: float = 0.0
    nesterov: bool = False

    def describe(self) -> dict:
        """The momentum settings for reports and fingerprints (empty for plain SGD, whose records
        stay as they were)."""
        return {"momentum": self.momentum, "nesterov": self.nesterov} if self.momentum else {}


def check_replayable_sgd(run_info: dict, method: str, parameters: int | None = None) -> SGDSettings:
    """The recorded run's SGD settings, after refusing what the linear response and DeltaGrad's
    replay cannot reproduce: any optimizer but SGD, dampening, maximize, momentum outside [0, 1),
    and weight decay, momentum or Nesterov that differ between param groups. The replayed update is
    g = grad + wd w; b = mu b + g (b = g at the first step); w -= lr b (heavy ball) or
    w -= lr (g + mu b) (Nesterov); mu = 0 is w -= lr g. One learning rate for every group too (the
    replay steps every parameter with it). `parameters`: how many trainable tensors the model has;
    an optimizer that updated only some of them is refused (a replay would move parameters
    training never moved)."""
    name = run_info.get("optimizer")
    if name is None:
        raise UnsupportedOptimizerError(f"{method}: the history records no optimizer (store.run_info); record "
                                        "with MiniRecorder/StepRecorder or HistoryRecorder")
    if name != "SGD":
        raise UnsupportedOptimizerError(
            f"{method} replays torch.optim.SGD (plain, heavy-ball or Nesterov momentum, with weight decay); the "
            f"recorded run used {name}, which it cannot replay" + (
                ": Adam-type optimizers scale each coordinate by a running average of past squared gradients, "
                "so the retrained run's steps depend nonlinearly on the whole gradient history" if "Adam" in name
                else ""))
    groups = run_info.get("param_groups") or [run_info]

    def shared(key, default):
        values = [g.get(key, default) for g in groups]
        values = [default if v is None else v for v in values]
        if any(v != values[0] for v in values):
            raise UnsupportedOptimizerError(f"{method}: parameter groups use different {key} ({values}); one value "
                                            "for every parameter is supported")
        return values[0]

    weight_decay = float(shared("weight_decay", 0.0))
    momentum = float(shared("momentum", 0.0))
    nesterov = bool(shared("nesterov", False))
    dampening = float(shared("dampening", 0.0))
    if shared("maximize", False):
        raise UnsupportedOptimizerError(f"{method} replays gradient descent; the recorded run used maximize=True")
    if not 0.0 <= momentum < 1.0:
        raise UnsupportedOptimizerError(f"{method}: momentum={momentum} is outside [0, 1): the momentum buffer "
                                        "never forgets, so the trajectory gap does not contract")
    if momentum and dampening:
        raise UnsupportedOptimizerError(f"{method} replays momentum with dampening 0; the recorded run used "
                                        f"momentum={momentum} with dampening={dampening}")
    if nesterov and not momentum:
        raise UnsupportedOptimizerError(f"{method}: the recorded run has nesterov=True without momentum")
    shared("lr", None)
    if parameters is not None and "param_groups" in run_info:
        covered = {i for g in groups for i in g.get("param_indices", ())}
        missing = sorted(set(range(parameters)) - covered)
        if missing:
            raise UnsupportedOptimizerError(
                f"{method}: the recorded optimizer updated only some of the model's trainable parameters (not "
                f"the trainable parameters at positions {missing}); a replay would move parameters training "
                "never moved: give the optimizer every trainable parameter, or freeze the others "
                "(requires_grad=False) before recording")
    return SGDSettings(weight_decay, momentum, nesterov)
