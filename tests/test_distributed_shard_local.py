"""Mini-Unlearning and DeltaGrad on a history sharded across 2 and 3 gloo ranks, read shard-locally
(unlearn_ext.distributed.shard_local): the parameters are split flat across the ranks (uneven
over 3), each rank records its slice of every step into its own store, and the distributed
unlearners given each rank's RankShardHistory answer as the single-process unlearner on the
unsharded history (the same steps in one store: ShardedHistory reassembles them bit for bit, as
tests/test_distributed_sharded_history.py shows), within the distributed history tests'
tolerance, with the same bits on every rank.

During the request a rank decodes only its own shard, never reassembles a step (ShardedHistory.read
fails if called), assembles no recorded gradient, and assembles weights only where a forward pass
runs at them (DeltaGrad: the replay's start, step 0; Mini-Unlearning: its anchors). A dot on the
codes equals the single-store dot. A model of another size than the history's, placements that
overlap, and a whole-step read of a rank's shard are refused.

The ranks' histories are compared over every step (the per-step digests): a rank whose history
differs from the others' at a middle step only makes construction fail on every rank, in one line."""
from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch

import unlearn_ext as ue
from unlearn_ext.distributed import (DistributedDeltaGradUnlearner, DistributedMiniUnlearner, RankShardHistory,
                                     ShardedHistory, ShardedRecorder, rank_slice)
from unlearn_ext.history import HistoryStore
from unlearn_ext.mini.record import FULL_GRAD
from unlearn_ext.mini.vectors import FlatModel

from distributed_setup import launch
from history_methods_setup import recorded_run as _problem

TIMEOUT_S = 150
FORGET = [3, 17, 42, 77, 101, 150, 199]
OPTIONS = {"mini": dict(curvature_samples=101, lanczos_steps=6), "deltagrad": dict(burn_in=4, period=3, memory=2)}
SINGLE = {"mini": ue.MiniUnlearner, "deltagrad": ue.DeltaGradUnlearner}
DISTRIBUTED = {"mini": DistributedMiniUnlearner, "deltagrad": DistributedDeltaGradUnlearner}
FIELDS = {"mini": ("params", FULL_GRAD), "deltagrad": ("params", "grads")}


def _record_shards(directory, method, flat, store, rank, world):
    """This rank's flat slice of every recorded step into its own store of a sharded history."""
    params, second = FIELDS[method]
    codecs = dict(params="fp32", grads="fp32") if method == "deltagrad" else dict(grads=None, extra={FULL_GRAD: "fp32"})
    mine = lambda tensors: [rank_slice(flat.join(tensors), rank, world).clone()]  # noqa: E731
    recorder = ShardedRecorder(directory, mine(flat.split(flat.flat())), run_info=store.run_info, **codecs)
    for s in store.iter():
        recorder.record(s.step, {name: mine(s.tensors[name]) for name in (params, second)}, lr=s.lr,
                        batch_ids=s.batch_ids)
    recorder.finish()


class _Watch:
    """Counts what a rank reads from the history during a request (see the module docstring)."""

    def __init__(self, history: RankShardHistory):
        self.decoded, self.assembled, self.axpys = [], [], 0
        store_read, stored = history.store.read, history.stored

        def read(step, names=None, **kw):
            s = store_read(step, names, **kw)
            self.decoded += [sum(t.numel() for t in ts) for ts in s.tensors.values()]
            return s

        def watched(step, name):
            vector = stored(step, name)
            whole = vector.whole

            def assembled():
                self.assembled.append((step, name))
                return whole()
            vector.whole = assembled
            return vector

        def encoded(step, name, _encoded=history.encoded):
            field = _encoded(step, name)
            axpy = field.axpy_

            def counted(y, alpha):
                self.axpys += 1
                return axpy(y, alpha)
            field.axpy_ = counted
            return field
        history.store.read, history.stored, history.encoded = read, watched, encoded


def _never_reassembled(*args, **kwargs):
    raise AssertionError("a step of the sharded history was reassembled")


def shard_local_worker(rank, world, directory):
    ShardedHistory.read = _never_reassembled  # this process only (spawned)
    out = {}
    for method in ("deltagrad", "mini"):
        model, data, store = _problem(method)
        flat = FlatModel(model, data)
        path = os.path.join(directory, method)
        _record_shards(path, method, flat, store, rank, world)
        history = RankShardHistory.open(path)
        unlearner = DISTRIBUTED[method](copy.deepcopy(model), data, history, **OPTIONS[method])
        watch = _Watch(history)
        report = unlearner.unlearn(FORGET)
        dot = None
        if method == "deltagrad":  # a dot on the codes: every rank's partial dot, summed in rank order
            v = torch.linspace(-1, 1, flat.dim)
            dot = history.encoded(5, "grads").dot(flat.split(v))
        out[method] = {"weights": FlatModel(unlearner.model, data).flat(), "status": report.status,
                       "sample_gradients": report.sample_gradients, "decoded": watch.decoded,
                       "assembled": watch.assembled, "axpys": watch.axpys, "dot": dot,
                       "shard": int(history.shard.index.numel()), "dim": flat.dim,
                       "anchors": [t for t in store.steps if t > 0]}
        refusals = [_refusal(lambda: history.iter(names=None))]  # whole fields are not served
        if method == "deltagrad":  # a model of another size than the history's
            wider = torch.nn.Linear(6, 4)
            refusals.append(_refusal(lambda: DISTRIBUTED[method](wider, data, history, **OPTIONS[method])))
            # every rank places its shard at element 0
            refusals.append(_refusal(lambda: ShardedRecorder(os.path.join(directory, "overlap"), [torch.zeros(7)],
                                                             placements=[0])))
        out[method]["refusals"] = refusals
        history.close()
    return out


def _refusal(build) -> str:
    try:
        build()
    except ValueError as exc:
        return str(exc)
    return "accepted"


def _moved(store: HistoryStore, step: int) -> HistoryStore:
    """A copy of the step store with one gradient element of `step` moved."""
    out = HistoryStore(dict(store.fields), run_info=store.run_info)
    for s in store.iter():
        tensors = {k: [t.clone() for t in v] for k, v in s.tensors.items()}
        if s.step == step:
            tensors["grads"][0].view(-1)[0] += 0.5
        out.record(s.step, tensors, lr=s.lr, batch_ids=s.batch_ids)
    return out


def tampered_worker(rank, world):
    model, data, store = _problem("deltagrad")
    if rank == world - 1:  # the last rank's history differs at a middle step only
        store = _moved(store, len(store.steps) // 2)
    try:
        DistributedDeltaGradUnlearner(model, data, store, **OPTIONS["deltagrad"])
    except ValueError as exc:
        return str(exc)
    return "accepted"


def _compare(world: int):
    with tempfile.TemporaryDirectory() as directory:
        got = launch(shard_local_worker, world, TIMEOUT_S, directory)
    for method in ("deltagrad", "mini"):
        model, data, store = _problem(method)
        single = SINGLE[method](model, data, store, **OPTIONS[method])
        report = single.unlearn(FORGET)
        want = FlatModel(model, data).flat()
        assert report.status == "unlearned", report  # the approximate path runs, not the fallback
        for rank, outcome in enumerate(got):
            answer = outcome[method]
            assert torch.equal(answer["weights"], got[0][method]["weights"]), f"{method}: rank {rank} differs from rank 0"
            assert answer["status"] == report.status and answer["sample_gradients"] == report.sample_gradients
            assert torch.allclose(answer["weights"], want, rtol=1e-4, atol=1e-5), \
                (method, float((answer["weights"] - want).abs().max()))
            # Only the rank's own shard was decoded, and only weights a forward runs at were assembled.
            assert answer["decoded"] and set(answer["decoded"]) == {answer["shard"]} and answer["shard"] < answer["dim"]
            if method == "deltagrad":
                assert answer["assembled"] == [(0, "params")], answer["assembled"]
                assert answer["axpys"] > 0  # the recorded gradients entered on the codes
                v = torch.linspace(-1, 1, answer["dim"])
                dense = float(torch.dot(FlatModel(model, data).join(store.read(5, ["grads"]).tensors["grads"]).double(),
                                        v.double()))
                assert answer["dot"] == pytest.approx(dense, rel=1e-12, abs=1e-12)
                assert answer["dot"] == got[0][method]["dot"]
            else:
                assert answer["assembled"] == [(t, "params") for t in answer["anchors"]], answer["assembled"]
            refusals = answer["refusals"]
            assert "serves its fields shard-locally" in refusals[0], refusals
            if method == "deltagrad":
                assert f"holds {answer['dim']} elements per step; the model has 28" in refusals[1], refusals
                assert "more than once" in refusals[2], refusals
        assert not torch.equal(want, FlatModel(*_problem(method)[:2]).flat())  # the request moved the weights


@pytest.mark.slow
def test_two_ranks_shard_local_history():
    _compare(2)


@pytest.mark.slow
def test_three_ranks_shard_local_history():
    _compare(3)


@pytest.mark.slow
def test_a_history_that_differs_at_a_middle_step_is_refused_on_every_rank():
    got = launch(tampered_worker, 3, TIMEOUT_S)
    for message in got:
        assert "disagree on history (its sha256)" in message, message
        assert "\n" not in message, message


def _drop_digests(history: RankShardHistory) -> None:
    """What opening a shard store recorded before the store took per-step digests gives: the same
    steps, no 'digest' in their stats."""
    for entry in history.store._entries:
        for stats in entry.stats.values():
            stats.pop("digest", None)


def undigested_worker(rank, world, directory):
    """DeltaGrad on this rank's shard read with and without per-step digests: (weights with digests,
    weights without, the job's history digest without)."""
    model, data, store = _problem("deltagrad")
    _record_shards(directory, "deltagrad", FlatModel(model, data), store, rank, world)
    out = []
    for digests in (True, False):
        history = RankShardHistory.open(directory)
        if not digests:
            _drop_digests(history)
        unlearner = DistributedDeltaGradUnlearner(copy.deepcopy(model), data, history, **OPTIONS["deltagrad"])
        unlearner.unlearn(FORGET)
        out.append(FlatModel(unlearner.model, data).flat())
        history.close()
    return out[0], out[1], unlearner.history_sha256


@pytest.mark.slow
def test_a_shard_history_without_per_step_digests_is_served():
    with tempfile.TemporaryDirectory() as directory:
        got = launch(undigested_worker, 2, TIMEOUT_S, directory)
    for digested, undigested, sha in got:
        assert torch.equal(undigested, digested)
        assert sha == got[0][2]  # every rank holds the job's one digest


def rebuilt_worker(rank, world, directory):
    """Two DeltaGrad unlearners built on one RankShardHistory: (the history digest computations each
    construction made, the two job digests)."""
    from unlearn_ext.mini import history_digest

    model, data, store = _problem("deltagrad")
    _record_shards(directory, "deltagrad", FlatModel(model, data), store, rank, world)
    history = RankShardHistory.open(directory)
    computed, compute = [], history_digest._history_sha256
    history_digest._history_sha256 = lambda *args: computed.append(1) or compute(*args)
    counts, digests = [], []
    for _ in range(2):
        before = len(computed)
        unlearner = DistributedDeltaGradUnlearner(copy.deepcopy(model), data, history, **OPTIONS["deltagrad"])
        counts.append(len(computed) - before)
        digests.append(unlearner.history_sha256)
    history.close()
    return counts, digests


def test_the_shard_historys_digest_is_computed_once_per_revision():
    """A rank's shard history has a revision (its read-only store's), so an unlearner built again on
    it (one per request, as the harness does) does not hash every step's batch ids and digests
    again, and gets the same job digest."""
    with tempfile.TemporaryDirectory() as directory:
        got = launch(rebuilt_worker, 2, TIMEOUT_S, directory)
    for rank, (counts, digests) in enumerate(got):
        assert counts == [1, 0], (rank, counts)
        assert digests[0] == digests[1] == got[0][1][0], rank
