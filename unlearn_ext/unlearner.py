"""The one interface every unlearning method implements (docs/design.md §2), and its report.

An `Unlearner` is built from a model, its `TrainingData` and whatever the method recorded during
training; `unlearn(ids)` makes the model forget those samples and returns an `UnlearnReport`. The
base class owns what every method must answer the same way (id hygiene, timing, the request
sequence), so a method only writes `_forget(new_ids, report)`:

  * ids are integers (floats and bools are refused: 1.5 must not become id 1); an empty request is
    an error;
  * ids that name no training sample -> UnknownIdsError naming them, nothing changed;
  * duplicates inside a request are counted once and listed; ids forgotten by earlier requests are
    listed as repeats and not processed again; a request of only repeats answers
    'already-forgotten' and changes nothing (so repeated requests are idempotent).

Every report's cost is counted against retraining: `retrain_cost(forgotten)` is the one place that
says what retraining without the forgotten ids costs, and `unlearn` fills it into the report.

Persistence, the same shape for every method: `state_dict()` returns a snapshot (later requests
must not change it) split into named parts, so the ledger can write only the parts a request
changed -- the model's weights and buffers by name as `model_state` takes them ("params",
"buffers"), "forgotten", and whatever else the method keeps; `load_state_dict()` restores one;
`fingerprint()` says what must match for saved state to belong to this unlearner, the model's
parameters always as {"shapes": {name: shape}} (`parameters.parameter_shapes`).
A part that grows with training (PCMU's step records) can be a `StepLog` named by `logs()`: the
ledger then tracks it through the log's own change marks instead of a snapshot, so a request costs
what it changed.
"""
from __future__ import annotations

import json
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field

import torch

from .data import TrainingData, as_ids, retrain_cost


log = logging.getLogger("unlearn_ext")


class UnknownIdsError(ValueError):
    """A request named ids the model was never trained on."""


# Outcomes a report may carry. certified: provably what retraining gives (PCMU); retrained: exact
# retraining (in full or from a step); unlearned: an approximation (history and perturbation
# methods); fallback: a safety check failed and the method fell back (reason says which);
# already-forgotten: nothing to do.
STATUSES = ("certified", "retrained", "unlearned", "fallback", "already-forgotten")


@dataclass
class UnlearnReport:
    method: str
    ids: list                          # ids newly forgotten by this request
    status: str = ""
    how: str = ""                      # the route taken, e.g. 'a-priori (m*)', 'resumed from step 12'
    reason: str = ""
    weights_changed: bool = False
    seconds: float = 0.0
    sample_gradients: int = 0          # per-sample gradient evaluations this request cost
    retrain_sample_gradients: int = 0  # what retraining without every forgotten id would cost
    history_bytes_read: int = 0        # bytes the history store read (DeltaGrad: read-ahead included)
    duplicates: list = field(default_factory=list)
    repeats: list = field(default_factory=list)
    details: dict = field(default_factory=dict)  # method-specific evidence (certificate, Ritz values...)

    @property
    def cost_vs_retrain(self) -> float | None:
        """Sample-gradient cost relative to retraining (None when retraining's cost is unknown)."""
        if self.retrain_sample_gradients <= 0:
            return None
        return self.sample_gradients / self.retrain_sample_gradients

    def to_dict(self) -> dict:
        out = asdict(self)
        out["cost_vs_retrain"] = self.cost_vs_retrain
        return out

    def __str__(self) -> str:
        extra = []
        if self.duplicates:
            extra.append(f"duplicates counted once: {self.duplicates}")
        if self.repeats:
            extra.append(f"already forgotten: {self.repeats}")
        tail = f" [{'; '.join(extra)}]" if extra else ""
        how = f" ({self.how})" if self.how else ""
        return f"{self.method}: {self.status}{how} — {self.reason}{tail}"


class Unlearner(ABC):
    """Base of every method family. Subclasses set `method`, `data` and `model` (the module whose
    weights unlearning changes, in place) and implement `_forget`, `fingerprint`, `state_dict` and
    `load_state_dict`; `forgotten` is kept by this base."""

    method: str = "unlearner"
    data: TrainingData
    model: torch.nn.Module
    # What the method trains on the retained data, for the methods whose answer is that training
    # (fine-tuning, perturbation's repair): a request that would forget every sample leaves them
    # nothing to train on, and is refused before any work rather than answered by training on nothing.
    trains_on_retained: str | None = None

    def __init__(self, data: TrainingData):
        self.data = data
        self._forgotten = torch.empty(0, dtype=torch.int64)

    # ---- the request sequence ---------------------------------------------------------------------

    @property
    def forgotten(self) -> torch.Tensor:
        """Every id forgotten so far (sorted int64)."""
        return self._forgotten

    def _set_forgotten(self, ids: torch.Tensor) -> None:
        self._forgotten = as_ids(ids).unique()

    def unknown_ids(self, ids) -> torch.Tensor:
        """Ids of the request that name no training sample (sorted, each once)."""
        return self.data.unknown_ids(as_ids(ids)).unique()

    def split_request(self, ids) -> tuple[list, list, list]:
        """(new ids, duplicates, repeats) of a request, after refusing empty and unknown requests.
        Raises without changing anything."""
        raw = checked_request(self.data, ids).tolist()
        seen, duplicates = set(), []
        for i in raw:
            if i in seen and i not in duplicates:
                duplicates.append(i)
            seen.add(i)
        already = set(self.forgotten.tolist())
        return sorted(seen - already), duplicates, sorted(seen & already)

    def unlearn(self, ids) -> UnlearnReport:
        """Forgets `ids` (see the module docstring for duplicates, repeats and unknown ids)."""
        began = time.perf_counter()
        new, duplicates, repeats = self.split_request(ids)
        report = UnlearnReport(self.method, new, duplicates=duplicates, repeats=repeats)
        if not new:
            report.status, report.reason = "already-forgotten", "every id in the request was forgotten before"
        else:
            self._refuse_forgetting_everything(len(new))
            log.info("%s: forgetting %d id(s) (%d forgotten before)", self.method, len(new), self.forgotten.numel())
            self._forget(torch.tensor(new, dtype=torch.int64), report)
            if report.status not in STATUSES:
                raise RuntimeError(f"{type(self).__name__} reported unknown status {report.status!r}")
            report.retrain_sample_gradients = self.retrain_cost(self.forgotten)
        report.seconds = time.perf_counter() - began
        log.info("%s (%.3f s)", report, report.seconds)
        return report

    def _refuse_forgetting_everything(self, new_count: int) -> None:
        """Refuses a request after which no training sample would be retained, for a method whose
        answer trains on the retained data (trains_on_retained): it would report success for a
        model trained on nothing. Retraining (RetrainUnlearner) answers it: the initial weights."""
        if self.trains_on_retained is None or self.forgotten.numel() + new_count < len(self.data):
            return
        raise ValueError(f"{self.method}: the request would forget every one of the {len(self.data)} training samples, "
                         f"but {self.trains_on_retained}, and none would be left. Retraining on no data gives the "
                         "initial weights: use method='retrain' (RetrainUnlearner) for it")

    def retrain_cost(self, forgotten) -> int:
        """Sample-gradient evaluations that retraining without `forgotten` costs: each retained
        sample once per epoch of the run (`data.retrain_cost`; a method whose training may stop
        mid-epoch counts its own schedule instead)."""
        return retrain_cost(self.data, self.training_epochs(), forgotten)

    def training_epochs(self) -> int:
        """Epochs of the training run that retraining repeats."""
        return self.config.epochs

    @abstractmethod
    def _forget(self, new_ids: torch.Tensor, report: UnlearnReport) -> None:
        """Forget `new_ids` (known, unique, none forgotten before), fill in `report`, and add them to
        `forgotten` (via _set_forgotten) once the model reflects the deletion."""

    # ---- persistence --------------------------------------------------------------------------------

    @abstractmethod
    def fingerprint(self) -> dict:
        """JSON-serializable facts that must match for saved state to belong to this unlearner."""

    @abstractmethod
    def state_dict(self) -> dict:
        """A snapshot {part name: tensors/lists/numbers}; `forgotten` must be one of the parts."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restores a snapshot taken by state_dict (all parts; a part that logs() names may be absent:
        that log is then kept as it is). A log part arrives as the list of its entries' to_state()."""

    def logs(self) -> dict:
        """{part name: StepLog}: the parts of state_dict() that are live logs (none by default)."""
        return {}

    def state_dict_without_logs(self) -> dict:
        """state_dict() without the parts logs() names: what the ledger snapshots per request.
        Methods with logs override it so that it costs nothing per recorded step."""
        state = self.state_dict()
        for part in self.logs():
            state.pop(part, None)
        return state


def fingerprint_differences(saved: dict, mine: dict) -> list[str]:
    """The names whose values differ between two fingerprints (sorted), compared as JSON stores
    them: one round trip each, so a tuple equals the list it was saved as and a float the number."""
    saved, mine = (json.loads(json.dumps(f, default=float)) for f in (saved, mine))
    return sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))


def checked_request(data: TrainingData, ids, name: str = "ids") -> torch.Tensor:
    """The ids of a request as int64, after refusing what no method can answer: non-integers
    (`as_ids`), an empty request, and ids that name no training sample (UnknownIdsError naming
    them). The one place these refusals are made, for the base class and PCMU's check alike;
    `name` is what the messages call the ids."""
    ids = as_ids(ids, name)
    if not ids.numel():
        raise ValueError("empty deletion request: give at least one id")
    unknown = data.unknown_ids(ids).unique()
    if unknown.numel():
        raise UnknownIdsError(f"ids never trained on (nothing was changed): {unknown.tolist()}")
    return ids
