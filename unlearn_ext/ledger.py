"""The deletion ledger: every request to any `Unlearner`, durably, with its answer (docs/design.md
§2 and §10).

    ledger = ue.DeletionLedger(unlearner, "deletions/")   # opens or creates; restores after a restart
    report = ledger.forget([17, 42])                      # an UnlearnReport, committed before return

Id hygiene is the Unlearner's (unknown ids named and nothing recorded, duplicates once, repeats
reported, 'already-forgotten' requests recorded too). The ledger adds:

  * Durability: a request takes effect only once committed. The unlearner's state is split into
    parts (weights, records, forgotten ids...); a commit writes a new file only for each part whose
    content changed (a certified PCMU deletion writes the forgotten ids, not the weights), then
    replaces `ledger.json` atomically (write, fsync, rename, fsync the directory) pointing at the
    new files, then removes files no longer referenced. A crash at any point leaves the previous
    ledger and every file it names intact.
  * No half-applied requests: if the commit fails (full disk, read-only directory), the unlearner
    is restored to its state before the request and the error is raised, so a retry starts from the
    same place. A directory that cannot be written is refused before any work is done.
  * Restart: opening a directory that holds a ledger restores the unlearner to the ledger's state
    (build the same unlearner — model, data, configuration — and pass it). State of another method
    or configuration is refused, naming the fields that differ. Files load with
    torch.load(weights_only=True): loading never runs code.
  * One writer: the directory is locked (fcntl) while a ledger is open; a second process gets a
    clear error instead of interleaving commits.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os

import torch

from .durable import atomic_write
from .unlearner import Unlearner, UnlearnReport

LEDGER = "ledger.json"
LOCK = "ledger.lock"
FORMAT = "unlearn_ext.ledger/2"


class LedgerInUseError(RuntimeError):
    """Another open ledger (in this or another process) holds the directory."""


def _serialize(value) -> bytes:
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


class DeletionLedger:
    def __init__(self, unlearner: Unlearner, directory: str):
        self.unlearner, self.directory = unlearner, directory
        os.makedirs(directory, exist_ok=True)
        self._lock_file = self._lock(directory)
        path = os.path.join(directory, LEDGER)
        try:
            if os.path.exists(path):
                self._restore(path)
            else:
                self.ledger = {"format": FORMAT, "method": unlearner.method,
                               "fingerprint": unlearner.fingerprint(), "requests": [], "parts": {},
                               "digests": {}, "version": 0}
                self._check_writable()
                self._commit(unlearner.state_dict())
        except BaseException:
            self.close()
            raise

    # ---- opening --------------------------------------------------------------------------------

    @staticmethod
    def _lock(directory: str):
        f = open(os.path.join(directory, LOCK), "a+b")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise LedgerInUseError(f"the ledger in {directory} is open elsewhere (another process or "
                                   "another DeletionLedger); close it first") from None
        return f

    def _restore(self, path: str) -> None:
        with open(path, encoding="utf-8") as f:
            ledger = json.load(f)
        if ledger.get("format") != FORMAT:
            raise ValueError(f"{path} is not a deletion ledger of this version (format "
                             f"{ledger.get('format')!r}, expected {FORMAT!r})")
        want = {"method": self.unlearner.method, **self.unlearner.fingerprint()}
        have = {"method": ledger.get("method"), **ledger.get("fingerprint", {})}
        # JSON turns tuples into lists: compare through one JSON round trip.
        want = json.loads(json.dumps(want, default=float))
        differs = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if differs:
            raise ValueError(f"the ledger in {self.directory} belongs to another model or configuration "
                             f"(differs in: {', '.join(differs)})")
        state = {part: torch.load(os.path.join(self.directory, name), weights_only=True)
                 for part, name in ledger["parts"].items()}
        self.unlearner.load_state_dict(state)
        self.ledger = ledger

    def _check_writable(self) -> None:
        if not os.access(self.directory, os.W_OK):
            raise PermissionError(f"the ledger directory {self.directory} is not writable: no request "
                                  "can be committed (nothing was changed)")

    # ---- requests -------------------------------------------------------------------------------

    @property
    def requests(self) -> list:
        return self.ledger["requests"]

    @property
    def forgotten(self) -> list:
        return self.unlearner.forgotten.tolist()

    def forget(self, ids) -> UnlearnReport:
        """Answers one deletion request through the unlearner and commits it before returning."""
        self._check_open()
        self._check_writable()
        before = self.unlearner.state_dict()
        report = self.unlearner.unlearn(ids)  # unknown / empty / malformed requests raise here
        entry = {"request": len(self.requests), **report.to_dict()}
        try:
            self._commit(self.unlearner.state_dict(), entry)
        except BaseException:
            self.unlearner.load_state_dict(before)  # the request did not happen
            raise
        return report

    def _check_open(self) -> None:
        if self._lock_file is None:
            raise RuntimeError("this DeletionLedger was closed")

    def _commit(self, state: dict, entry: dict | None = None) -> None:
        """Changed parts to new files, then the ledger pointing at them, then drop replaced files."""
        version = self.ledger["version"] + 1
        parts, digests = dict(self.ledger["parts"]), dict(self.ledger["digests"])
        written = []
        try:
            for part, value in state.items():
                blob = _serialize(value)
                digest = hashlib.sha256(blob).hexdigest()
                if digests.get(part) == digest and part in parts:
                    continue  # unchanged: the file the ledger names already holds it
                name = f"{part}-{version:06d}.pt"
                atomic_write(os.path.join(self.directory, name), lambda f, b=blob: f.write(b))
                written.append(name)
                parts[part], digests[part] = name, digest
            ledger = dict(self.ledger, parts=parts, digests=digests, version=version,
                          requests=self.requests + ([entry] if entry is not None else []))
            text = json.dumps(ledger, indent=1, default=float).encode()
            atomic_write(os.path.join(self.directory, LEDGER), lambda f: f.write(text))
        except BaseException:
            for name in written:  # not referenced by any ledger: safe to drop
                _remove(os.path.join(self.directory, name))
            raise
        replaced = set(self.ledger["parts"].values()) - set(parts.values())
        self.ledger = ledger
        for name in replaced:
            _remove(os.path.join(self.directory, name))

    # ---- closing --------------------------------------------------------------------------------

    def close(self) -> None:
        """Releases the directory lock (a process that exits releases it too)."""
        if getattr(self, "_lock_file", None) is not None:
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> "DeletionLedger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
