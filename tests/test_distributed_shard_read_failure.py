"""A rank whose shard of a sharded history cannot be read mid-request (a damaged record) makes the
request fail on every rank at once, not leave the other ranks waiting in the next exchange until the
group's timeout: each rank raises DistributedRefusal naming the failing rank and its error, and
each rank's unlearner -- and a DistributedLedger over it -- is left as it was before the request.

2 gloo ranks, DeltaGrad on a flat-split history (tests/test_distributed_shard_local.py's set-up);
rank 1's store file is damaged after opening, one byte of the recorded gradients of a middle step,
as a disk fault would (its checksum no longer matches when the request reads it). Mini-Unlearning
likewise, rank 1's read of an anchor's full gradient raising an I/O error; there the agreement is
also watched: tensor all-reduces on the group's device only, no object collective. And the error
texts' fixed-size rows: a long, non-ASCII text is cut on a character boundary."""
from __future__ import annotations

import copy
import os
import tempfile
import time

import torch.distributed as dist

from unlearn_ext.distributed import (DistributedDeltaGradUnlearner, DistributedLedger, DistributedMiniUnlearner,
                                     RankShardHistory)
from unlearn_ext.distributed.group import ERROR_TEXT_BYTES, DistributedRefusal, agree
from unlearn_ext.distributed.ledger import state_digest
from unlearn_ext.history import HistoryStore
from unlearn_ext.mini.record import FULL_GRAD
from unlearn_ext.mini.vectors import FlatModel

from distributed_setup import GROUP_TIMEOUT_S, launch, watch_collectives
from history_methods_setup import recorded_run
from test_distributed_shard_local import FORGET, OPTIONS, _record_shards

TIMEOUT_S = 120
DAMAGED_RANK, FIELD = 1, "grads"


def _flip_a_byte(path: str, step: int, name: str) -> None:
    """Flips the first byte of field `name`'s section in `step`'s record of the store file at `path`."""
    store = HistoryStore.open(path, writable=False)
    entry = store._entries[store._index_of(step)].file_entry
    offset = entry.payload_offset
    for section, _, nbytes, _ in entry.header["sections"]:
        if section == name:
            break
        offset += nbytes
    else:
        raise AssertionError(f"step {step} recorded no section {name!r}")
    store.close()
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))


def _failed_request(call) -> tuple:
    """(error type, message, seconds until it raised) of a call expected to raise."""
    began = time.monotonic()
    try:
        call()
    except Exception as exc:  # the test asserts which one
        return type(exc).__name__, str(exc), time.monotonic() - began
    return "none", "the request succeeded", time.monotonic() - began


def _out_of_step(rank: int, outcome: tuple) -> bool:
    """Whether the ranks are out of step after a failed request (what these tests guard against). The
    damaged rank then stays alive and joins no collective, as a rank handling its own error would, so
    a rank left waiting shows as a wait (the group's timeout), not as a closed connection."""
    if outcome[0] == "DistributedRefusal":
        return False
    if rank == DAMAGED_RANK:
        time.sleep(GROUP_TIMEOUT_S + 5)
    return True


def damaged_shard_worker(rank, world, directory, ledger_dir, step):
    model, data, store = recorded_run("deltagrad")
    _record_shards(directory, "deltagrad", FlatModel(model, data), store, rank, world)
    history = RankShardHistory.open(directory)
    if rank == DAMAGED_RANK:
        _flip_a_byte(history.store.file.path, step, FIELD)
    unlearner = DistributedDeltaGradUnlearner(copy.deepcopy(model), data, history, **OPTIONS["deltagrad"])
    before = state_digest(unlearner.state_dict())
    out = {"direct": _failed_request(lambda: unlearner.unlearn(FORGET))}
    out["unchanged"] = state_digest(unlearner.state_dict()) == before
    if _out_of_step(rank, out["direct"]):
        return out
    ledger = DistributedLedger(unlearner, ledger_dir)
    out["ledger"] = _failed_request(lambda: ledger.forget(FORGET))
    out["unchanged_after_ledger"] = state_digest(unlearner.state_dict()) == before
    out["requests"] = ledger.requests
    ledger.close()
    history.close()
    return out


def test_a_damaged_shard_record_fails_the_request_on_every_rank_at_once():
    step = len(recorded_run("deltagrad")[2].steps) // 2  # read by the replay (its approximate phase)
    with tempfile.TemporaryDirectory() as directory, tempfile.TemporaryDirectory() as ledger_dir:
        got = launch(damaged_shard_worker, 2, TIMEOUT_S, directory, os.path.join(ledger_dir, "ledger"), step)
    for rank, outcome in enumerate(got):
        for route in ("direct", "ledger"):
            kind, message, seconds = outcome[route]
            assert kind == "DistributedRefusal", (rank, route, kind, message, seconds)
            assert f"rank(s) [{DAMAGED_RANK}]" in message and f"field {FIELD!r} of step {step}" in message, message
            assert "HistoryCorruptError" in message and "checksum mismatch" in message, message
            # Raised by the agreement, not by the group's timeout (a waiting rank would take GROUP_TIMEOUT_S).
            assert seconds < GROUP_TIMEOUT_S / 2, (rank, route, seconds)
        assert outcome["unchanged"] and outcome["unchanged_after_ledger"], rank
        assert outcome["requests"] == []  # nothing committed (rank 0 holds the ledger)


def failing_read_worker(rank, world, directory, watch=False):
    model, data, store = recorded_run("mini")
    _record_shards(directory, "mini", FlatModel(model, data), store, rank, world)
    history = RankShardHistory.open(directory)
    if rank == DAMAGED_RANK:
        read = history.store.read

        def failing(step, names=None, **kw):
            if names == [FULL_GRAD]:
                raise OSError(5, "Input/output error")
            return read(step, names, **kw)
        history.store.read = failing
    unlearner = DistributedMiniUnlearner(copy.deepcopy(model), data, history, **OPTIONS["mini"])
    before = state_digest(unlearner.state_dict())
    if watch:
        seen = watch_collectives()
    out = _failed_request(lambda: unlearner.unlearn(FORGET))
    if _out_of_step(rank, out):
        return out, None
    history.close()
    if watch:
        return out, seen
    return out, state_digest(unlearner.state_dict()) == before


def test_a_failing_read_fails_mini_unlearning_on_every_rank_at_once():
    with tempfile.TemporaryDirectory() as directory:
        got = launch(failing_read_worker, 2, TIMEOUT_S, directory)
    for rank, ((kind, message, seconds), unchanged) in enumerate(got):
        assert kind == "DistributedRefusal", (rank, kind, message, seconds)
        assert f"rank(s) [{DAMAGED_RANK}] could not read field {FULL_GRAD!r}" in message, message
        assert "OSError" in message and "Input/output error" in message, message
        assert seconds < GROUP_TIMEOUT_S / 2, (rank, seconds)
        assert unchanged, rank


def test_the_read_agreement_refuses_through_tensor_collectives_on_the_groups_device():
    """The failed read is agreed on, and its error text crosses, through fixed-size tensor
    all-reduces on the group's exchange device: no object collective (which pickles, and under
    nccl needs torch.cuda.set_device on every rank) is called."""
    with tempfile.TemporaryDirectory() as directory:
        got = launch(failing_read_worker, 2, TIMEOUT_S, directory, True)
    for rank, ((kind, message, seconds), seen) in enumerate(got):
        assert kind == "DistributedRefusal", (rank, kind, message, seconds)
        assert "OSError" in message and "Input/output error" in message, message
        assert seen and all(device == expected for device, expected in seen), (rank, seen)


def refusing_worker(rank, world):
    def check():
        if rank == 0:  # a long text of 2-byte characters: cut inside the fixed-size row
            raise ValueError("é" * 2000)
        raise OSError(5, "Input/output error")
    try:
        agree(check, shared=(), failed="refused")
    except DistributedRefusal as exc:
        return str(exc)
    return "not refused"


def test_long_and_non_ascii_error_texts_cross_cut_on_a_character_boundary():
    got = launch(refusing_worker, 2, TIMEOUT_S)
    assert got[0] == got[1], got
    message = got[0]
    assert message.startswith("rank(s) [0, 1] refused: rank 0: ValueError: é"), message[:80]
    assert "é...; rank 1: OSError: [Errno 5] Input/output error" in message, message[-80:]
    assert len(message.split("; rank 1")[0].split("rank 0: ", 1)[1].encode()) <= ERROR_TEXT_BYTES


def refused_on_every_rank(rank, failure):
    """agree() whose check raises `failure()` on rank 1: what this rank got, and how long it took."""
    def check():
        if rank == 1:
            raise failure()
        return ()
    began = time.monotonic()
    try:
        agree(check, shared=(), failed="refused")
    except DistributedRefusal as exc:
        return str(exc), time.monotonic() - began
    except Exception as exc:  # noqa: BLE001 (the failure these tests look for: a rank leaving the exchange)
        return f"{type(exc).__name__} (outside the agreement)", time.monotonic() - began
    return "not refused", time.monotonic() - began


def unencodable_text_worker(rank, world):
    # a path read from a directory whose names are not UTF-8 (os.fsdecode's surrogates)
    return refused_on_every_rank(rank, lambda: ValueError(
        f"{os.fsdecode(b'/data/shard-' + bytes([255]) + b'.hist')} is not a history file"))


def test_an_error_text_utf8_cannot_encode_still_crosses_on_every_rank():
    """A text holding a lone surrogate (a non-UTF-8 file name) has no UTF-8 bytes: it crosses with the
    surrogate escaped, and every rank refuses at once (a rank failing to encode it would leave the
    others waiting in the text exchange until the group's timeout)."""
    got = launch(unencodable_text_worker, 2, TIMEOUT_S)
    for rank, (message, seconds) in enumerate(got):
        assert message == "rank(s) [1] refused: rank 1: ValueError: /data/shard-\\udcff.hist is not a history file", \
            (rank, message)
        assert seconds < GROUP_TIMEOUT_S / 2, (rank, seconds)


class _Unprintable(RuntimeError):
    def __str__(self):
        raise RuntimeError("this error cannot say what it is")


def unprintable_error_worker(rank, world):
    return refused_on_every_rank(rank, _Unprintable)


def test_an_error_whose_str_raises_is_still_reported_by_its_rank():
    """An exception whose own __str__ raises still crosses, by its type name: the failing rank takes
    part in the text exchange, and every rank refuses at once naming it."""
    got = launch(unprintable_error_worker, 2, TIMEOUT_S)
    for rank, (message, seconds) in enumerate(got):
        assert message == "rank(s) [1] refused: rank 1: _Unprintable: <unprintable>", (rank, message)
        assert seconds < GROUP_TIMEOUT_S / 2, (rank, seconds)
