"""Prompt deletion with a ledger (DESIGN section 4 and 10).

`PromptDeleter.forget(ids)` answers a deletion request from what training recorded:
  1. within the a-priori budget m* (every affected step's smallest radius beats k*C/b): certified
     at once, no computation;
  2. else the per-request check (pcmu.PCMUTrainer.check_request): certified exact, with evidence;
  3. else the fallback: training resumes without the ids from the first step that is not
     certified, which gives exactly the retrained model; the reason is in the answer.
Every request — including ones that change nothing — is appended to the ledger with its answer.

Defined answers: ids never trained on -> UnknownIdsError naming them, nothing recorded or changed;
duplicates inside a request -> counted once (listed in the answer); ids already forgotten -> listed as
repeats and not processed again; a request of only repeats -> status 'already-forgotten'.

Crash safety: the trainer state (weights, records, forgotten ids) is written to a new file first,
then the ledger (JSON, human-readable) is replaced atomically (write, fsync, rename, fsync the
directory) pointing at it. A crash at any point leaves the previous ledger and its state intact.
The state file is loaded with torch.load(weights_only=True): loading never runs code.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

import torch

from ..data import as_ids
from ..durable import atomic_write
from .trainer import PCMUTrainer

LEDGER = "ledger.json"
FORMAT = "unlearn_ext.pcmu-ledger/1"


class UnknownIdsError(ValueError):
    """A request named ids the model was never trained on."""


@dataclass
class DeletionAnswer:
    request: int                  # sequence number in the ledger
    ids: list                     # ids newly forgotten by this request
    status: str                   # 'certified' | 'retrained' | 'already-forgotten'
    how: str                      # 'a-priori (m*)' | 'per-request check' | 'resumed from step t0' | ''
    reason: str
    first_divergent_step: int | None = None
    duplicates: list = field(default_factory=list)
    repeats: list = field(default_factory=list)
    model_changed: bool = False
    check: dict | None = None
    seconds: float = 0.0
    steps_retrained: int = 0

    def __str__(self) -> str:
        extra = []
        if self.duplicates:
            extra.append(f"duplicates counted once: {self.duplicates}")
        if self.repeats:
            extra.append(f"already forgotten: {self.repeats}")
        tail = f" [{'; '.join(extra)}]" if extra else ""
        return f"request {self.request}: {self.status} ({self.how}) — {self.reason}{tail}"


class PromptDeleter:
    """Answers deletion requests for a PCMU-trained model and keeps the ledger in `directory`.

    Opening a directory that already holds a ledger restores the trainer to the ledger's state
    (after a restart, build the same trainer — model, data, configuration — and pass it here).
    """

    def __init__(self, trainer: PCMUTrainer, directory: str):
        self.trainer, self.directory = trainer, directory
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, LEDGER)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                self.ledger = json.load(f)
            if self.ledger.get("format") != FORMAT:
                raise ValueError(f"{path} is not a PCMU ledger (format {self.ledger.get('format')!r})")
            state = torch.load(os.path.join(directory, self.ledger["state"]), weights_only=True)
            trainer.load_state_dict(state)
        else:
            self.ledger = {"format": FORMAT, "fingerprint": trainer.fingerprint(), "requests": [],
                           "state": None, "version": 0}
            self._commit()

    @property
    def requests(self) -> list:
        return self.ledger["requests"]

    @property
    def forgotten(self) -> list:
        return self.trainer.forgotten.tolist()

    def _commit(self) -> None:
        """State file first (new name), then the ledger pointing at it, then drop the old state."""
        old = self.ledger.get("state")
        version = self.ledger["version"] + 1
        name = f"state-{version:06d}.pt"
        atomic_write(os.path.join(self.directory, name), lambda f: torch.save(self.trainer.state_dict(), f))
        self.ledger.update(state=name, version=version)
        text = json.dumps(self.ledger, indent=1, default=float).encode()
        atomic_write(os.path.join(self.directory, LEDGER), lambda f: f.write(text))
        if old and old != name:
            try:
                os.remove(os.path.join(self.directory, old))
            except FileNotFoundError:
                pass

    def forget(self, ids) -> DeletionAnswer:
        began = time.perf_counter()
        raw = as_ids(ids).tolist()
        if not raw:
            raise ValueError("empty deletion request: give at least one id")
        unknown = self.trainer.unknown_ids(torch.tensor(sorted(set(raw)), dtype=torch.int64))
        if unknown.numel():
            raise UnknownIdsError(f"ids never trained on (nothing was changed): {unknown.tolist()}")
        seen, duplicates = set(), []
        for i in raw:
            if i in seen and i not in duplicates:
                duplicates.append(i)
            seen.add(i)
        already = set(self.trainer.forgotten.tolist())
        repeats = sorted(seen & already)
        new = sorted(seen - already)
        answer = DeletionAnswer(len(self.requests), new, "", "", "", duplicates=duplicates, repeats=repeats)
        if not new:
            answer.status, answer.reason = "already-forgotten", "every id in the request was forgotten before"
        else:
            self._decide(answer, torch.tensor(new, dtype=torch.int64))
        answer.seconds = time.perf_counter() - began
        self.ledger["requests"].append(asdict(answer))
        self._commit()
        return answer

    def _decide(self, answer: DeletionAnswer, new: torch.Tensor) -> None:
        trainer = self.trainer
        union = torch.cat([trainer.forgotten, new]).unique()
        check = trainer.check_request(new)  # the ids forgotten so far are included by the check
        answer.check = check.to_dict()
        answer.first_divergent_step = check.first_divergent_step
        if check.certified:
            trainer.forgotten = union
            answer.status = "certified"
            answer.how = "a-priori (m*)" if check.steps_checked_exactly == 0 else "per-request check"
            answer.reason = check.reason
            return
        t0 = check.first_divergent_step
        end = trainer.steps_done
        trainer.resume_without(new, t0)
        answer.status, answer.how, answer.model_changed = "retrained", f"resumed from step {t0}", True
        answer.steps_retrained = end - t0
        answer.reason = (f"not certified at step {t0} ({check.status}: {check.reason}); training resumed "
                         f"without the ids from step {t0} of {end}, which equals retraining from scratch")
