"""Top-K and Random-k perturbation unlearners (docs/design.md §7, our formulation).

A request F: (1) select K coordinates -- the exact global top K of a score over F (Top-K) or K
uniformly random ones (Random-k, the control for "does the score matter"); (2) perturb them in one
fused pass: reset (to 0, or to the stored initial weights), dampen (w *= beta), noise
(w += sigma * z) or normalized ascent (steps along grad L_F restricted to the selection, each of
L2 length `ascent_step`, stopped once F's mean loss reaches the held-out non-members' mean loss);
(3) repair on the retained data R -- mandatory: all coordinates by default, or only the selected
ones (masked: the masked-gradient op zeroes the rest of every gradient); with the labels of R
(cross-entropy) by default, or by distillation (`distill`, `masked-distill`) from the outputs the
model gave on R before this request (softened by `distill_temperature`): on a memorizing model
those outputs carry the memorized retained labels that a short repair on the labels does not
relearn. Fine-tuning alone, the control, is baselines.FinetuneUnlearner. With `guard=` set, every
answer is checked by the accuracy guard (perturb/guard.py: on `guard_data`, the user's held-out
data, or else a slice of R), repaired further and/or answered again at a smaller K until it holds.
"""
from __future__ import annotations

import math
import numbers

import torch

from .. import selection as sel_api
from ..checks import is_whole_number
from ..data import BatchSchedule, SGDConfig, TrainingData, retrain_cost, tensors_sha256
from ..forward import outputs
from ..loading import checked_seed
from ..model_state import load_model_state_, model_state
from ..parameters import parameter_shapes, trainable
from ..unlearner import Unlearner, UnlearnReport
from . import guard as accuracy_guard
from .scores import RATIO_FLOOR, RETAINED_SCORES, SCORES, forget_scores

PERTURBATIONS = ("reset", "dampen", "noise", "ascent")
REPAIRS = ("all", "masked", "distill", "masked-distill")


def _real(value) -> bool:
    """A real number (not a bool, a string or None)."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real)


class PerturbUnlearner(Unlearner):
    """Shared body of Top-K and Random-k; subclasses choose the selection."""

    method = "perturb"
    trains_on_retained = "its answer is repaired on (and may be scored against) the retained data"

    def __init__(self, model: torch.nn.Module, data: TrainingData, config, *, k=0.05,
                 perturbation: str = "reset", score: str = "grad_abs", beta: float = 0.1, sigma: float = 0.01,
                 initial: torch.nn.Module | None = None, repair_epochs: int = 3, repair_lr_factor: float = 0.4,
                 repair: str = "all", per_tensor: bool = False, holdout: tuple | None = None,
                 ascent_step: float = 0.1, ascent_max_steps: int = 50, distill_temperature: float = 2.0,
                 distill_alpha: float = 0.0, ratio_floor: float = RATIO_FLOOR, guard: float | None = None,
                 guard_size: int = 256, guard_halvings: int = 3, guard_rounds: int = 2,
                 guard_budget: float | None = 1.0, guard_data: tuple | None = None, seed: int = 0):
        super().__init__(data)
        self.check_options(model=model, config=config, k=k, perturbation=perturbation, score=score, repair=repair,
                           distill_temperature=distill_temperature, distill_alpha=distill_alpha,
                           ratio_floor=ratio_floor, repair_epochs=repair_epochs, repair_lr_factor=repair_lr_factor,
                           holdout=holdout, per_tensor=per_tensor, guard=guard, guard_size=guard_size,
                           guard_halvings=guard_halvings, guard_rounds=guard_rounds, guard_budget=guard_budget,
                           guard_data=guard_data, beta=beta, sigma=sigma, ascent_step=ascent_step,
                           ascent_max_steps=ascent_max_steps, seed=seed)
        self.model, self.config = model, config
        self.k, self.perturbation, self.score, self.beta, self.sigma = k, perturbation, score, beta, sigma
        self.initial = None if initial is None else [p.detach().clone() for p in trainable(initial).values()]
        self.repair_epochs, self.repair_lr_factor, self.repair = int(repair_epochs), float(repair_lr_factor), repair
        self.per_tensor, self.holdout, self.seed = per_tensor, holdout, int(seed)
        self.ascent_step, self.ascent_max_steps = float(ascent_step), int(ascent_max_steps)
        self.distill_temperature, self.distill_alpha = float(distill_temperature), float(distill_alpha)
        self.ratio_floor = float(ratio_floor)
        self.guard, self.guard_size, self.guard_halvings = guard, guard_size, guard_halvings
        self.guard_rounds, self.guard_budget = guard_rounds, guard_budget
        self.guard_data = None if guard_data is None else (guard_data[0].detach(), guard_data[1].detach())
        self._guard_reference = None  # the original model's accuracy on guard_data (first guarded request)
        self._repair_inputs = None    # (selection, union, teacher) of the answer the guard is checking
        self._k_now = k          # the K of the answer being computed (the guard halves it)
        self.requests = 0        # requests answered (they key the noise and Random-k draws)
        self._in_flight = None   # the number of the request being answered (requests + 1)
        if self._distills():
            self._check_distillable()

    @staticmethod
    def check_options(*, model, config, k, perturbation, score, repair, distill_temperature, distill_alpha,
                      ratio_floor, repair_epochs, repair_lr_factor, holdout, per_tensor, guard, guard_size,
                      guard_halvings, guard_rounds, guard_budget, guard_data, beta, sigma, ascent_step,
                      ascent_max_steps, seed) -> None:
        """Refuses option values no request could use, naming the option; the constructor calls it,
        and make_unlearnable before training (the unlearner is built after it)."""
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"unknown perturbation {perturbation!r}; choose from {', '.join(PERTURBATIONS)}")
        if score not in SCORES:
            raise ValueError(f"unknown score {score!r}; choose from {', '.join(SCORES)}")
        if repair not in REPAIRS:
            raise ValueError(f"repair must be one of {', '.join(REPAIRS)}, got {repair!r}")
        if not distill_temperature > 0 or not 0.0 <= distill_alpha <= 1.0:
            raise ValueError(f"distill_temperature must be > 0 and distill_alpha in [0, 1], got "
                             f"{distill_temperature}, {distill_alpha}")
        if not (math.isfinite(ratio_floor) and ratio_floor >= 0):
            raise ValueError(f"ratio_floor (the ratio scores' floor, a fraction of R's mean term) must be a "
                             f"finite number >= 0, got {ratio_floor!r}")
        if repair_epochs < 0 or not repair_lr_factor > 0:
            raise ValueError("repair_epochs must be >= 0 and repair_lr_factor > 0")
        if repair != "all" and repair_epochs > 0 and not isinstance(config, SGDConfig):
            raise ValueError(f"repair={repair!r} runs its own plain-SGD steps (masked gradients or a distillation "
                             "loss); with your optimizer's recipe use repair='all'")
        # The perturbations' own values (each checked whichever perturbation is chosen: a value that
        # is never right is a mistake, and a later request may be asked with another perturbation).
        if not _real(beta) or not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta (dampen's factor, w *= beta) must be a number in [0, 1], got {beta!r}")
        if not _real(sigma) or not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma (noise's standard deviation) must be a finite number > 0, got {sigma!r}")
        if not _real(ascent_step) or not (math.isfinite(ascent_step) and ascent_step > 0):
            raise ValueError(f"ascent_step (each ascent step's length, a fraction of the selection's norm) must be "
                             f"a finite number > 0, got {ascent_step!r}")
        if not is_whole_number(ascent_max_steps, 1):
            raise ValueError(f"ascent_max_steps must be an int >= 1, got {ascent_max_steps!r}")
        checked_seed(seed)
        if perturbation == "ascent" and holdout is None:
            raise ValueError("normalized ascent stops at the held-out non-members' loss: give holdout=(x, y)")
        if per_tensor:  # a count is per tensor there (topk_per_tensor checks it)
            if isinstance(k, float) and not 0.0 <= k <= 1.0:
                raise ValueError(f"a fractional k must be in [0, 1], got {k}")
        else:  # a count out of range would otherwise be refused by the first request
            sel_api.resolve_k(k, sum(p.numel() for p in trainable(model).values()))
        accuracy_guard.check_options(guard, guard_size, guard_halvings, guard_rounds, guard_budget, guard_data)

    def _check_distillable(self) -> None:
        """Distillation reads (batch, classes) logits (softmax over the classes); a model with other
        outputs (a language model's per-position logits) is refused before any work."""
        x, _ = self.data.batch(self.data.ids[:1])
        shape = tuple(outputs(self.model, x).shape)
        if len(shape) != 2:
            raise ValueError(f"repair={self.repair!r} distills (batch, classes) logits, but the model's outputs have "
                             f"shape {shape} (e.g. per-position logits of a sequence model); use repair='all' or "
                             "'masked'")

    # ---- the request -------------------------------------------------------------------------------

    def _params(self) -> list[torch.Tensor]:
        return list(trainable(self.model).values())

    def _select(self, new: torch.Tensor):
        """(selection, sample gradients spent on scoring)."""
        raise NotImplementedError

    def _retained(self, new: torch.Tensor) -> torch.Tensor | None:
        """The retained set R of this request (every sample neither forgotten before nor in `new`)
        for the scores that weigh F against it; None for the others (they never read it)."""
        if self.score not in RETAINED_SCORES:
            return None
        return self.data.without(torch.cat([self.forgotten, new]))

    def _forget(self, new: torch.Tensor, report: UnlearnReport) -> None:
        if self.guard is None:
            self._answer(new, report)
        else:
            self._guarded(new, report)

    def _guarded(self, new: torch.Tensor, report: UnlearnReport) -> None:
        """Answers at K, checks the answer with the accuracy guard (perturb/guard.py) and, while it
        fails: repairs further (guard_rounds rounds of repair_epochs epochs), then answers again at K/2
        from the weights before the request, and so on, within guard_budget; keeps the last answer."""
        before, forgotten, requests = model_state(self.model), self.forgotten, self.requests
        union = torch.cat([forgotten, new]).unique()
        probe, reference, spent = self._guard_probe(new)
        cap = None if self.guard_budget is None else self.guard_budget * self.retrain_cost(union)
        fits = lambda cost: cap is None or spent + cost + probe.cost <= cap  # noqa: E731
        tried, k, stop = [], self.k, "met"
        try:
            for attempt in range(self.guard_halvings + 1):
                if attempt:  # every answer starts from the weights before the request
                    load_model_state_(self.model, before)
                    self._set_forgotten(forgotten)
                    self.requests = requests
                self._k_now = k
                self._answer(new, report)
                answer_cost = report.sample_gradients
                spent += answer_cost + probe.cost
                extra, accuracy = 0, probe(self.model)
                tried.append([k, extra, accuracy])
                for round_ in range(1, self.guard_rounds + 1 if self.repair_epochs else 1):
                    if reference - accuracy <= self.guard or not fits(self._repair_round_cost(union)):
                        break
                    spent += self._repair(*self._repair_inputs, round_=round_) + probe.cost
                    check_finite(self._params(), f"{self.method}: the parameters after the guard's repair round")
                    extra += self.repair_epochs
                    accuracy = probe(self.model)
                    tried.append([k, extra, accuracy])
                if reference - accuracy <= self.guard:
                    break
                if attempt == self.guard_halvings:
                    stop = "halvings"
                elif not fits(answer_cost):
                    stop = "budget"
                if stop != "met":
                    break
                k = accuracy_guard.halved(k)
        except BaseException:  # as for one answer: the request leaves no trace when anything fails
            load_model_state_(self.model, before)
            self._set_forgotten(forgotten)
            self.requests = requests
            raise
        finally:
            self._k_now = self.k
            self._repair_inputs = None
        met = reference - tried[-1][2] <= self.guard
        if not met and stop == "met":  # the repair rounds stopped for the budget
            stop = "budget"
        report.sample_gradients = spent
        report.details.update(k_chosen=tried[-1][0], guard_met=met, guard_probe=probe.name,
                              guard_accuracy_before=reference, guard_trials=tried,
                              guard_extra_repair_epochs=tried[-1][1], guard_stop="met" if met else stop,
                              guard_sample_gradients=probe.spent)
        why = {"met": "met", "halvings": "not met at the smallest K allowed",
               "budget": f"not met within its budget of {self.guard_budget:g}x retraining's cost"
               if self.guard_budget is not None else "not met"}["met" if met else stop]
        answers = sum(1 for t in tried if t[1] == 0)
        report.how = (f"{self.method}: K = {tried[-1][0]:g} + {tried[-1][1]} further repair epoch(s) after "
                      f"{answers} answer(s) ({probe.name} accuracy {tried[-1][2]:.3f} vs {reference:.3f} before; "
                      f"guard {why}); " + report.how)

    def _guard_probe(self, new: torch.Tensor):
        """(probe, reference accuracy, sample gradients spent on the reference): the held-out data if
        given (reference: the original model's accuracy, measured at the first guarded request),
        else a seeded slice of this request's R (reference: the accuracy just before the request)."""
        if self.guard_data is not None:
            probe = _Probe("held-out", lambda model: accuracy_guard.accuracy(model, *self.guard_data),
                           int(self.guard_data[0].shape[0]))
            spent = 0
            if self._guard_reference is None:
                self._guard_reference = probe(self.model)
                spent = probe.cost
            return probe, self._guard_reference, spent
        retained = self.data.without(torch.cat([self.forgotten, new]))
        ids = accuracy_guard.guard_slice(retained, self.guard_size, self.seed, self.requests + 1)
        probe = _Probe("retained-slice", lambda model: accuracy_guard.slice_accuracy(model, self.data, ids),
                       int(ids.numel()))
        return probe, probe(self.model), probe.cost

    def _answer(self, new: torch.Tensor, report: UnlearnReport) -> None:
        """One answer to the request; on any failure the model (parameters and buffers) is put back and the
        request counter is not advanced, so a retry draws what an uninterrupted request draws."""
        before, forgotten = model_state(self.model), self.forgotten
        try:
            check_finite(self._params(), f"{self.method}: the model's parameters before the request")
            self._in_flight = self.requests + 1
            self._perturb_and_repair(new, report)
            check_finite(self._params(), f"{self.method}: the parameters after perturbation and repair "
                                          "(non-finite losses or gradients on the retained data?)")
        except BaseException:
            load_model_state_(self.model, before)
            self._set_forgotten(forgotten)
            raise
        finally:
            self._in_flight = None
        self.requests += 1

    def _perturb_and_repair(self, new: torch.Tensor, report: UnlearnReport) -> None:
        union = torch.cat([self.forgotten, new]).unique()
        # The teacher of a distillation repair: this model's outputs before the request.
        teacher = self._teacher_outputs() if self._distills() else None
        selection, cost = self._select(new)
        params = self._params()
        details = {"selected": None, "perturbation": self.perturbation}
        with torch.no_grad():
            if self.perturbation == "reset":
                count, _ = selection.apply_(params, "reset", source=self.initial)
            elif self.perturbation == "dampen":
                count, _ = selection.apply_(params, "dampen", self.beta)
            elif self.perturbation == "noise":
                count, _ = selection.apply_(params, "noise", self.sigma, noise_seed=self.seed,
                                            noise_offset=self._in_flight)
            else:
                count = None
        if self.perturbation == "ascent":
            count, steps, loss, target = self._ascent(selection, new)
            cost += steps * int(new.numel())
            details.update(ascent_steps=steps, forget_loss=loss, holdout_loss=target)
        details["selected"] = int(count)
        if self.guard is not None:  # the guard may repair this answer further
            self._repair_inputs = (selection, union, teacher)
        repair_cost = self._repair(selection, union, teacher)
        self._set_forgotten(union)
        report.status, report.weights_changed = "unlearned", True
        report.how = (f"{self.method} {self.perturbation} of {count} coordinates + {self.repair_epochs} "
                      f"{self.repair} repair epoch(s)")
        report.sample_gradients = cost + repair_cost
        report.reason = "perturbed the selected coordinates, then repaired on the retained data (approximate)"
        details.update(scoring_sample_gradients=cost, repair_sample_gradients=repair_cost)
        report.details = details

    def _forget_loss(self, ids) -> float:
        with torch.no_grad():
            x, y = self.data.batch(ids)
            return float(self.data.loss(self.model(x), y).mean())

    def _ascent(self, selection, ids):
        """Normalized ascent on the forget loss restricted to the selection (our formulation): each
        step moves the selected coordinates by ascent_step * ||w_sel|| along grad L_F / ||grad L_F||,
        until F's mean loss reaches the held-out mean loss (no per-ratio tuning)."""
        hx, hy = self.holdout
        with torch.no_grad():
            target = float(self.data.loss(self.model(hx), hy).mean())
        params = self._params()
        probe = [p.detach().clone() for p in params]
        w_norm = math.sqrt(selection.mask_grad_(probe))  # ||w|| over the selected coordinates
        length = self.ascent_step * max(w_norm, 1e-12)
        steps, loss = 0, self._forget_loss(ids)
        count = selection.count
        while loss < target and steps < self.ascent_max_steps:
            x, y = self.data.batch(ids)
            grads = list(torch.autograd.grad(self.data.loss(self.model(x), y).mean(), params))
            sq = selection.mask_grad_(grads)
            if not sq > 0:
                break
            with torch.no_grad():
                count, _ = selection.apply_(params, "axpy", length / math.sqrt(sq), source=grads)
            steps += 1
            loss = self._forget_loss(ids)
        return count, steps, loss, target

    def _repair_lr(self) -> float:
        """repair_lr_factor x the training recipe's peak learning rate."""
        return self.repair_lr_factor * self.config.peak_lr(len(self.data))

    def _repair_config(self, union, round_: int = 0):
        """The repair's recipe: the training recipe's optimizer at repair_lr_factor x its peak lr; the
        guard's further rounds (round_ >= 1) draw other batch orders."""
        return self.config.tuned(self.repair_lr_factor, self.repair_epochs,
                                 self.config.seed + 104729 * (1 + len(union)) + round_, len(self.data))

    def _repair_round_cost(self, union) -> int:
        """Sample gradients of one repair (the guard's further rounds cost the same)."""
        teacher_cost = len(self.data) - len(union) if self._distills() else 0
        return retrain_cost(self.data, self._repair_config(union), union) + teacher_cost

    def _distills(self) -> bool:
        return self.repair in ("distill", "masked-distill") and self.repair_epochs > 0

    def _teacher_outputs(self) -> torch.Tensor:
        """Logits of the current model on every training row (row order), computed once."""
        if self.data.in_memory:
            return outputs(self.model, self.data.inputs)
        return torch.cat([outputs(self.model, x) for _, x, _ in self.data.chunks()])

    def _repair_loss(self, ids, teacher) -> torch.Tensor:
        x, y = self.data.batch(ids)
        logits = self.model(x)
        if teacher is None:
            return self.data.loss(logits, y).mean()
        t = self.distill_temperature
        soft = torch.softmax(teacher[self.data.rows(ids)] / t, 1)
        # t^2 keeps the gradient scale of the softened term comparable across temperatures (Hinton et al.).
        kl = torch.nn.functional.kl_div(torch.log_softmax(logits / t, 1), soft, reduction="batchmean") * t * t
        if self.distill_alpha == 0.0:
            return kl
        return (1 - self.distill_alpha) * kl + self.distill_alpha * self.data.loss(logits, y).mean()

    def _repair(self, selection, union, teacher=None, round_: int = 0) -> int:
        if self.repair_epochs == 0:
            return 0
        tune = self._repair_config(union, round_)
        if self.repair == "all":
            tune.train(self.model, self.data, exclude=union)
            return retrain_cost(self.data, tune, union)
        # masked and/or distilled: plain SGD over the same schedule; masked keeps only the selected
        # coordinates of every gradient.
        masked = self.repair.startswith("masked")
        params = self._params()
        schedule = BatchSchedule(self.data.ids, tune.batch_size, tune.seed)
        for step in schedule.steps(0, tune.steps(len(self.data)), union):
            if step.ids.numel() == 0:
                continue
            grads = list(torch.autograd.grad(self._repair_loss(step.ids, teacher), params))
            if tune.weight_decay:
                grads = [g + tune.weight_decay * p.detach() for g, p in zip(grads, params)]
            if masked:
                selection.mask_grad_(grads)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(tune.lr_at(step.step) * g)
        # The teacher's outputs on R: one forward pass per retained sample, counted (conservatively)
        # as one sample gradient each.
        teacher_cost = len(self.data) - len(union) if teacher is not None else 0
        return retrain_cost(self.data, tune, union) + teacher_cost

    # ---- persistence --------------------------------------------------------------------------------

    def fingerprint(self) -> dict:
        return {"method": self.method, "shapes": parameter_shapes(self.model),
                "k": self.k, "perturbation": self.perturbation, "score": self.score, "beta": self.beta,
                "sigma": self.sigma, "repair": self.repair, "repair_epochs": self.repair_epochs,
                "repair_lr_factor": self.repair_lr_factor, "distill_temperature": self.distill_temperature,
                "distill_alpha": self.distill_alpha, "per_tensor": self.per_tensor, "seed": self.seed,
                "batch_size": self.config.batch_size, **self.data.fingerprint(),
                # the repair's step: its learning rate (factor x the schedule's peak), decay and seed
                "repair_lr": self._repair_lr(), "recipe": self.config.fingerprint(),
                # only where they matter (ledgers saved before the fields above were added are refused,
                # naming them: their repair settings were not recorded)
                **({"ratio_floor": self.ratio_floor} if self.score in RETAINED_SCORES else {}),
                **({"guard": self.guard, "guard_size": self.guard_size, "guard_halvings": self.guard_halvings,
                    "guard_rounds": self.guard_rounds, "guard_budget": self.guard_budget}
                   if self.guard is not None else {}),
                **({"guard_data_sha256": tensors_sha256(self.guard_data)}
                   if self.guard is not None and self.guard_data is not None else {}),
                **({"ascent_step": self.ascent_step, "ascent_max_steps": self.ascent_max_steps}
                   if self.perturbation == "ascent" else {}),
                **({"holdout_sha256": tensors_sha256(self.holdout)} if self.holdout is not None else {}),
                **({"initial_sha256": tensors_sha256(self.initial)} if self.initial is not None else {})}

    def state_dict(self) -> dict:
        # buffers included: a repair in training mode moves BatchNorm's running statistics
        # the held-out guard's reference: the original model's accuracy, which the model no longer is
        reference = {} if self._guard_reference is None else \
            {"guard_reference": torch.tensor(self._guard_reference, dtype=torch.float64)}
        return {**model_state(self.model), "requests": torch.tensor(self.requests),
                "forgotten": self.forgotten.clone(), **reference}

    def load_state_dict(self, state: dict) -> None:
        load_model_state_(self.model, state)
        self.requests = int(state["requests"])
        self._set_forgotten(state["forgotten"])
        self._guard_reference = float(state["guard_reference"]) if "guard_reference" in state else None


class TopKUnlearner(PerturbUnlearner):
    """Top-K: the exact global top K of a score over F (default grad_abs, K = 5%), or per tensor."""

    method = "topk"

    def _select(self, new):
        with torch.enable_grad():
            scores, cost = forget_scores(self.model, self.data, new, self.score, self.config.batch_size,
                                         retained=self._retained(new), ratio_floor=self.ratio_floor)
        check_finite(scores, f"{self.method}: the scores over the forget set (non-finite gradients?)")
        if self.per_tensor:
            return sel_api.topk_per_tensor(scores, self._k_now), cost
        return sel_api.topk(scores, self._k_now), cost


class RandomKUnlearner(PerturbUnlearner):
    """Random-k: exactly K uniformly random coordinates (Philox keys at (seed, request number))."""

    method = "randomk"

    def _select(self, new):
        # Same (seed, request) keys for every K the guard tries: a smaller K selects a subset.
        return sel_api.random_k([p.detach() for p in self._params()], self._k_now, self.seed, self._in_flight), 0


class _Probe:
    """What the guard measures accuracy on: name, accuracy(model), and its cost per check (one
    forward pass per sample, counted as one sample gradient each); `spent` adds up the checks."""

    def __init__(self, name: str, measure, cost: int):
        self.name, self._measure, self.cost, self.spent = name, measure, cost, 0

    def __call__(self, model) -> float:
        self.spent += self.cost
        return self._measure(model)


def check_finite(tensors, what: str) -> None:
    """Refuses NaN/inf before it is selected on or answered as 'unlearned'."""
    bad = [i for i, t in enumerate(tensors) if not bool(torch.isfinite(t).all())]
    if bad:
        raise FloatingPointError(f"{what}: tensor(s) {bad} hold non-finite values; the request was refused "
                                 "and the model left as it was")
