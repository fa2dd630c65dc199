"""DeltaGrad's replay across 2 and 3 gloo ranks takes its gradients on the ranks' slices of the ids
(unlearn_ext.distributed.history_methods): the rows its gradient calls read (mini/replay_model.py:
the removed samples at the exact prefix, both sets at exact steps, the removed ones at quasi-Newton
steps) are split across the ranks, each rank reading about 1/world of them and all ranks together
exactly the rows one process reads; the answer equals the single-process one within the tolerance
of tests/test_distributed_history_methods.py and is the same bits on every rank. The replay's
gradients take the Linear-chain path (mini/layer_chain.py), from in-memory data and from a Dataset
(whose rows each rank checks batch by batch); some ranks' slices of the small removed sets are
empty (nothing read there)."""
from __future__ import annotations

import os
import sys
from collections import Counter

import pytest
import torch

import unlearn_ext as ue
from unlearn_ext.distributed import DistributedDeltaGradUnlearner
from unlearn_ext.mini.layer_chain import LayerChain
from unlearn_ext.mini.vectors import FlatModel

from distributed_setup import launch
from history_methods_setup import recorded_run
from user_models import Pairs

TIMEOUT_S = 120
FORGET = [3, 17, 42, 77, 101, 150, 199]
OPTIONS = dict(burn_in=4, period=3, memory=2)
REPLAY_SOURCE = os.path.join("mini", "replay_model.py")


def _count_replay_reads(data) -> list:
    """Makes data.batch record the ids of every call made from the replay's working copy
    (mini/replay_model.py); retraining's prefix steps and the loss check read through other modules."""
    read, batch = [], data.batch

    def counted(ids):
        if sys._getframe(1).f_code.co_filename.endswith(REPLAY_SOURCE):
            read.extend(torch.as_tensor(ids).reshape(-1).tolist())
        return batch(ids)
    data.batch = counted
    return read


def _answer(cls, in_memory: bool) -> dict:
    model, data, store = recorded_run("deltagrad")
    if not in_memory:  # the same rows, read item by item
        data = ue.TrainingData(Pairs(data.inputs, data.targets))
    read = _count_replay_reads(data)
    chain_calls, original = [], LayerChain.loss_grad_sums

    def counted(self, *args, **kwargs):
        chain_calls.append(1)
        return original(self, *args, **kwargs)
    LayerChain.loss_grad_sums = counted
    try:
        report = cls(model, data, store, **OPTIONS).unlearn(FORGET)
    finally:
        LayerChain.loss_grad_sums = original
    return {"weights": FlatModel(model, data).flat(), "status": report.status, "read": read,
            "exact_steps": report.details["exact_steps"], "chain_calls": len(chain_calls)}


def replay_worker(rank, world, in_memory):
    return _answer(DistributedDeltaGradUnlearner, in_memory)


def _compare(world: int, in_memory: bool = True):
    got = launch(replay_worker, world, TIMEOUT_S, in_memory)
    want = _answer(ue.DeltaGradUnlearner, in_memory)
    assert want["status"] == "unlearned", want  # the replay answers, not the fallback
    total = len(want["read"])
    assert total > 0
    for rank, answer in enumerate(got):
        assert answer["status"] == want["status"] and answer["exact_steps"] == want["exact_steps"]
        assert answer["chain_calls"] > 0, f"rank {rank}: the replay's gradients did not take the Linear chain"
        assert torch.equal(answer["weights"], got[0]["weights"]), f"rank {rank} ended with other weights than rank 0"
        assert torch.allclose(answer["weights"], want["weights"], rtol=1e-4, atol=1e-5), \
            float((answer["weights"] - want["weights"]).abs().max())
        # About 1/world of the rows: each set is split within one row per rank.
        share = len(answer["read"]) / total
        assert abs(share - 1 / world) < 0.1, (rank, len(answer["read"]), total)
    # Together, the ranks read exactly the rows one process reads (each once).
    assert Counter(i for answer in got for i in answer["read"]) == Counter(want["read"])


@pytest.mark.slow
def test_two_ranks_split_the_replays_gradient_rows():
    _compare(2)


@pytest.mark.slow
def test_three_ranks_split_the_replays_gradient_rows():
    _compare(3)


@pytest.mark.slow
def test_three_ranks_split_the_replays_gradient_rows_read_from_a_dataset():
    _compare(3, in_memory=False)
