"""What agreeing on each shard read costs (unlearn_ext.distributed.shard_local: RankShardHistory
agrees on every field read, so that one rank's failed read fails the request on every rank at once),
on 2 gloo ranks on this machine:
* one agreement (group.agree with nothing to compare: one all_gather of a 1-element int64 row per
  rank): median wall time and this thread's CPU time per agreement, over 2,000 in a row;
* the field reads one shard-local DeltaGrad request makes (tests/test_distributed_shard_local.py's
  problem: 200 samples, 24 recorded steps), so reads per replayed step;
* the request's wall time with the agreements against the same request reading without them (the
  code before the agreements), in alternating pairs in the same run: their ratio.
Timing is on rank 0 after a barrier.
"""
from __future__ import annotations

import copy
import os
import statistics
import sys
import tempfile
import time

import torch.distributed as dist

from unlearn_ext.distributed import DistributedDeltaGradUnlearner, RankShardHistory
from unlearn_ext.distributed.group import agree
from unlearn_ext.mini.vectors import FlatModel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from distributed_setup import launch  # noqa: E402  (the test suite's rank launcher)
from history_methods_setup import recorded_run  # noqa: E402
from test_distributed_shard_local import FORGET, OPTIONS, _record_shards  # noqa: E402

AGREEMENTS, PAIRS = 2000, 5


def _agreement_cost() -> tuple[float, float]:
    """(median wall s, mean thread CPU s) of one agreement."""
    walls = []
    dist.barrier()
    cpu = time.thread_time()
    for _ in range(AGREEMENTS):
        began = time.perf_counter()
        agree(lambda: (), shared=())
        walls.append(time.perf_counter() - began)
    return statistics.median(walls), (time.thread_time() - cpu) / AGREEMENTS


def _request_seconds(history, model, data, agreed: bool) -> float:
    """Wall time of one shard-local DeltaGrad request, its field reads agreed on or read plainly."""
    if not agreed:
        history._agreed_read = lambda step, name, read: read()  # this instance only: the reads before agreeing
    unlearner = DistributedDeltaGradUnlearner(copy.deepcopy(model), data, history, **OPTIONS["deltagrad"])
    dist.barrier()
    began = time.perf_counter()
    unlearner.unlearn(FORGET)
    seconds = time.perf_counter() - began
    if not agreed:
        del history._agreed_read
    return seconds


def agreement_worker(rank, world, directory):
    model, data, store = recorded_run("deltagrad")
    _record_shards(directory, "deltagrad", FlatModel(model, data), store, rank, world)
    history = RankShardHistory.open(directory)
    reads = []
    counted = history._agreed_read
    history._agreed_read = lambda step, name, read: reads.append((step, name)) or counted(step, name, read)
    _request_seconds(history, model, data, agreed=True)  # warm-up, and the reads one request makes
    del history._agreed_read
    wall, cpu = _agreement_cost()
    with_agreement, without = [], []
    for _ in range(PAIRS):
        with_agreement.append(_request_seconds(history, model, data, agreed=True))
        without.append(_request_seconds(history, model, data, agreed=False))
    history.close()
    return {"agree_wall_s": wall, "agree_cpu_s": cpu, "reads": len(reads), "steps": len(store.steps),
            "request_s": statistics.median(with_agreement), "request_unagreed_s": statistics.median(without)}


def test_shard_read_agreement_cost(note):
    with tempfile.TemporaryDirectory() as directory:
        got = launch(agreement_worker, 2, 600, directory)[0]
    note("shard_read_agreement/agree_wall_us", got["agree_wall_s"] * 1e6)
    note("shard_read_agreement/agree_thread_cpu_us", got["agree_cpu_s"] * 1e6)
    note("shard_read_agreement/reads_per_request", got["reads"])
    note("shard_read_agreement/recorded_steps", got["steps"])
    note("shard_read_agreement/agree_wall_us_per_step", got["agree_wall_s"] * 1e6 * got["reads"] / got["steps"])
    note("shard_read_agreement/request_s_agreed", got["request_s"])
    note("shard_read_agreement/request_s_unagreed", got["request_unagreed_s"])
    note("shard_read_agreement/ratio_agreed_over_unagreed", got["request_s"] / got["request_unagreed_s"])
    print(got)
    assert got["reads"] >= got["steps"]  # every replayed step read its recorded fields through the agreement
