"""One deletion ledger for a job whose unlearner runs on every rank of a process group
(docs/design.md §12; the ledger itself is ledger.py's `DeletionLedger`).

Every rank builds the same unlearner (a collective one, such as `PCMUUnlearner` over a
`DistributedPCMUTrainer`, or any unlearner whose state is replicated) and a `DistributedLedger`
over it; only rank 0 opens the directory and writes. A request goes:
  1. rank 0's ids are broadcast (their count in an agreement, so ids that are not integers, or a
     ledger that cannot take a request -- closed, its directory not writable, its commit of what
     changed since its last commit, such as more training, failed -- are refused on every rank,
     then the int64 ids): the request is decided once, whatever the other ranks passed;
  2. every rank runs the unlearner on them;
  3. the ranks agree (one all_gather): every rank succeeded and holds the same state (a sha256 of
     its state dict) -- or the request failed;
  4. rank 0 commits, and broadcasts whether the commit succeeded.
A failure at 2, 3 or 4 on any rank makes every rank restore its state from before the request and
raise, and the ledger on disk stays at the previous request. A rank that dies makes the others'
pending collective raise within the process group's timeout (`init_process_group(timeout=...)`;
gloo usually notices a closed connection at once); they roll back the same way.

Once every rank has agreed (3), the commit on disk is the outcome, also when the decision (4)
cannot reach a rank: forget() returns on a rank only if the request is committed, and raises only
if this rank holds the state from before it.
  * Rank 0, its commit durable, cannot tell another rank (that rank died after agreeing): it
    returns the report (its ledger and its state hold the request), with a warning.
  * A rank that does not receive rank 0's decision (rank 0 died, after its commit or before it)
    reads the ledger on disk itself, when it can (the directory on a shared file system): it keeps
    the request if the ledger holds it, else rolls back and raises. If it cannot read the ledger
    it rolls back and raises, saying that the outcome is unknown: reopening the DistributedLedger
    on every rank restores every rank to the committed state.
(A rank 0 still alive but slower to commit than the group's timeout may commit after such a rank
has read the ledger; the group's timeout must exceed a commit's duration. And the rank must see
rank 0's durable writes when it opens the files: a file system with close-to-open consistency, as
NFS by default; a client cache that serves an older ledger.json or journal makes it roll back a
committed request. In either case reopening on every rank restores the committed state.)

Opening: rank 0 opens (or restores) the ledger and broadcasts the restored state to the others,
as the bytes the ledger stores it in (loaded with weights_only=True, so loading runs no code).
An opening refused on some rank (rank 0 cannot open the directory, another rank cannot load the
state) raises on every rank and leaves every rank's unlearner as it was, the directory unlocked.
Every exchange is a tensor collective on the group's device: no object collective (which pickles,
and under nccl needs torch.cuda.set_device on every rank first).
"""
from __future__ import annotations

import hashlib
import logging

import torch
import torch.distributed as dist

from ..data import as_ids
from ..ledger import DeletionLedger, read_ledger, state_bytes, state_from_bytes
from ..unlearner import UnlearnReport
from .group import agree, broadcast_values, exchange_device, require_group

logger = logging.getLogger("unlearn_ext")


def state_digest(state) -> int:
    """A 63-bit digest of a state dict's content (tensors by dtype, shape and bytes), equal on two
    ranks iff (up to hash collisions) their states are."""
    h = hashlib.sha256()

    def walk(value):
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            # (flattened first: a 0-dim tensor cannot be viewed as bytes; the shape is hashed above)
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(value, dict):
            h.update(b"D")
            for k in sorted(value, key=repr):
                h.update(repr(k).encode())
                walk(value[k])
        elif isinstance(value, (list, tuple)):
            h.update(f"L{len(value)}".encode())
            for v in value:
                walk(v)
        else:
            h.update(repr(value).encode())
    walk(state)
    return int.from_bytes(h.digest()[:8], "little") >> 1


class _AgreedUnlearner:
    """Rank 0's unlearner as DeletionLedger sees it: its unlearn() returns only after every rank
    agreed on the outcome (so the ledger commits nothing that another rank failed)."""

    def __init__(self, inner, group):
        self.inner, self.group, self.agreed = inner, group, False

    def __getattr__(self, name):  # method, fingerprint, state_dict, load_state_dict, forgotten ...
        return getattr(self.inner, name)

    def unlearn(self, ids) -> UnlearnReport:
        self.agreed = False
        report = _unlearn_and_agree(self.inner, ids, self.group)
        self.agreed = True
        return report


def _unlearn_and_agree(unlearner, ids, group) -> UnlearnReport:
    """Runs the request on this rank, then agrees with the others: all succeeded and hold the same
    state, or every rank raises (DistributedRefusal names the ranks that failed or differ)."""
    reports = []

    def run():
        reports.append(unlearner.unlearn(ids))
        return (state_digest(unlearner.state_dict()),)
    agree(run, shared=("the unlearner's state after the request",), group=group)
    return reports[0]


class DistributedLedger:
    """DeletionLedger semantics for a job of several ranks (module docstring): construct and call
    forget() on every rank, in the same order."""

    def __init__(self, unlearner, directory: str, group=None):
        self.group = require_group(group)
        self.rank = dist.get_rank(self.group)
        self.unlearner, self.directory = unlearner, directory
        self._src = dist.get_global_rank(self.group, 0)
        self._ledger = None
        self._agreed = _AgreedUnlearner(unlearner, self.group) if self.rank == 0 else None

        blob, before = [], []  # before: this rank's state, for a refused opening to return to

        def open_on_rank0():
            if self.rank != 0:
                return (0,)
            before.append(unlearner.state_dict())
            self._ledger = DeletionLedger(self._agreed, directory)
            try:
                blob.append(state_bytes(unlearner.state_dict()))
            except BaseException:
                self._undo_opening(before)
                raise
            return (len(blob[0]),)
        # A refused directory (or state) is refused on every rank; the state's size crosses with it.
        sizes = agree(open_on_rank0, shared=(), local=("the restored state's size",), group=self.group)

        def load_on_the_others():
            if self.rank != 0:
                own = unlearner.state_dict()
                try:
                    unlearner.load_state_dict(state_from_bytes(data.numpy().tobytes()))
                except BaseException:
                    unlearner.load_state_dict(own)  # a refused state leaves it as it was (as DeletionLedger)
                    raise
                before.append(own)
            return ()
        try:  # a rank that cannot load it refuses on every rank, and every rank undoes the opening
            data = torch.frombuffer(bytearray(blob[0]), dtype=torch.uint8) if self.rank == 0 else None
            data = broadcast_values(data, int(sizes[0, 0]), torch.uint8, self._src, self.group)
            agree(load_on_the_others, shared=(), group=self.group, failed="could not load rank 0's state")
        except BaseException:
            self._undo_opening(before)
            raise

    def _undo_opening(self, before: list) -> None:
        """A refused opening leaves every rank as it was: rank 0 closes its ledger, and a rank whose
        unlearner took a state (rank 0: the one it restored; another: rank 0's) gets its own back."""
        self.close()
        if before:
            self.unlearner.load_state_dict(before[0])

    @property
    def requests(self) -> list:
        """The committed requests (rank 0 reads its ledger; the others hold none and get [])."""
        return self._ledger.requests if self._ledger is not None else []

    def forget(self, ids=None) -> UnlearnReport:
        """One deletion request, decided by rank 0's `ids` (the other ranks may pass None)."""
        ids, requests_before = self._rank0_ids(ids)
        if self.rank == 0:
            return self._forget_on_rank0(ids)
        before = self.unlearner.state_dict()
        try:
            report = _unlearn_and_agree(self.unlearner, ids, self.group)
            self._receive_decision(report, requests_before)
        except BaseException:
            self.unlearner.load_state_dict(before)
            raise
        return report

    def _receive_decision(self, report: UnlearnReport, requests_before: int) -> None:
        """Returns if rank 0 committed the request (its decision, or when that cannot arrive, the
        ledger on disk: module docstring); raises otherwise (the caller rolls back)."""
        decision = self._commit_flag(0)
        try:
            dist.broadcast(decision, src=self._src, group=self.group)
        except Exception as lost:
            self._follow_the_disk(report, requests_before, lost)
            return
        if not int(decision[0]):
            raise RuntimeError("rank 0 could not commit the request to the ledger; rolled back on every rank")

    def _follow_the_disk(self, report: UnlearnReport, requests_before: int, lost: Exception) -> None:
        """Rank 0's decision did not arrive (`lost`): returns if the ledger on disk holds the request
        as its next one after `requests_before` (the same ids), raises otherwise."""
        try:
            requests = read_ledger(self.directory)["requests"]
        except Exception as exc:
            raise RuntimeError(
                f"rank 0's commit decision did not arrive ({lost}) and this rank cannot read the ledger in "
                f"{self.directory} ({type(exc).__name__}: {exc}): whether the request was committed is unknown. This "
                "rank holds its state from before the request; reopen the DistributedLedger on every rank to "
                "restore every rank to the committed state") from lost
        if len(requests) > requests_before and requests[requests_before].get("ids") == list(report.ids):
            logger.warning("ledger: rank 0's commit decision did not arrive (%s); the ledger in %s holds the "
                           "request, so this rank keeps it", lost, self.directory)
            return
        raise RuntimeError(f"rank 0's commit decision did not arrive ({lost}) and the ledger in {self.directory} does "
                           "not hold the request: rolled back") from lost

    def _rank0_ids(self, ids) -> tuple[torch.Tensor, int]:
        """Rank 0's request as int64 ids, and the number of requests its ledger holds, on every
        rank: rank 0 checks that its ledger can take a request (open, its directory writable:
        DeletionLedger.forget would refuse on rank 0 alone, before the others' agreement, leaving
        them waiting in it) and that the ids are integers, refused on every rank if not; the ids'
        count and the requests' cross in that agreement, then the ids."""
        decided = []

        def check():
            if self.rank != 0:
                return 0, 0
            if self._ledger is None:
                raise RuntimeError("this DistributedLedger was closed")
            decided.append(as_ids(ids))
            self._ledger._prepare_request()  # (what DeletionLedger.forget does before the unlearner)
            return decided[0].numel(), len(self._ledger.requests)
        counts = agree(check, shared=(), local=("the request's id count", "the ledger's request count"),
                       group=self.group)
        ids = broadcast_values(decided[0] if self.rank == 0 else None, int(counts[0, 0]), torch.int64,
                               self._src, self.group)
        return ids, int(counts[0, 1])

    def _forget_on_rank0(self, ids) -> UnlearnReport:
        # (the previous request's flag would make a failure before this one's unlearner ran send
        # 'not committed' into the collectives the other ranks' unlearner is running)
        self._agreed.agreed = False
        try:
            report = self._ledger.forget(ids)  # restores rank 0's state itself on any failure
        except BaseException:
            if self._agreed.agreed:  # every rank applied it, the commit failed: tell them
                dist.broadcast(self._commit_flag(0), src=self._src, group=self.group)
            raise
        try:
            dist.broadcast(self._commit_flag(1), src=self._src, group=self.group)
        except Exception as exc:  # committed: a rank not told follows the disk (module docstring)
            logger.warning("ledger: the request is committed, but the decision could not reach every rank (%s); "
                           "a rank that did not receive it follows the ledger on disk", exc)
        return report

    def _commit_flag(self, value: int) -> torch.Tensor:
        """Rank 0's commit decision as a tensor the group's backend takes (CUDA for nccl)."""
        return torch.full((1,), value, dtype=torch.int64, device=exchange_device(self.group))

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None
