"""A user's FSDP training loop (torch.distributed.fsdp.fully_shard, FSDP2, on CPU with gloo; 2 and 3
ranks) recording its sharded history with ShardedRecorder: each rank records its local shards of
the parameters and of the reduce-scattered gradients, with the placements FSDP assigned (every
parameter split along dim 0). ShardedHistory reassembles every step, which equals a
single-process recording of the same run (the same initial weights, batches and learning rate)
within float tolerance: FSDP's reduce-scatter averages the ranks' gradients in its own order, so
the last bits may differ, and the weights follow them. Read shard-locally (RankShardHistory, the
history methods' reads) with FSDP's placements, a dot and an axpy on the gradient codes and the
assembled weights equal the same on the single-process recording, the same bits on every rank."""
from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
from torch import nn

from unlearn_ext.distributed import RankShardHistory, ShardedHistory, ShardedRecorder, rank_slice
from unlearn_ext.history import HistoryStore
from unlearn_ext.history.store import FieldSpec

from distributed_setup import launch

TIMEOUT_S = 120
N, BATCH, EPOCHS, LR = 48, 12, 3, 0.2
READ_STEP = 5  # the step read shard-locally


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (N,), generator=g)
    return torch.randn(N, 6, generator=g) + y[:, None].float(), y


def _batches():
    g = torch.Generator().manual_seed(2)
    return [ids for _ in range(EPOCHS) for ids in torch.randperm(N, generator=g).split(BATCH)]


def fsdp_placements(model: nn.Module, rank: int, world: int) -> list[int]:
    """The global element offset of this rank's shard of each parameter, in the flat vector of all
    parameters: FSDP2 splits dim 0 into chunks of ceil(rows / world) rows (torch.chunk's rule)."""
    offsets, start = [], 0
    for p in model.parameters():
        rows = p.shape[0]
        row_size = p.numel() // rows
        chunk = math.ceil(rows / world)
        local = p.to_local()
        assert local.shape[0] == max(0, min(chunk, rows - rank * chunk)), "FSDP placed another split than torch.chunk's"
        offsets.append(start + min(rank * chunk, rows) * row_size)
        start += p.numel()
    return offsets


def fsdp_worker(rank, world, directory):
    from torch.distributed.fsdp import fully_shard
    model = _model()
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = _data()
    params = list(model.parameters())
    recorder = ShardedRecorder(directory, [p.to_local() for p in params], params="fp32", grads="fp32",
                               placements=fsdp_placements(model, rank, world))
    for t, ids in enumerate(_batches()):  # the user's loop: each rank its share of the batch
        mine = rank_slice(ids, rank, world)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[mine]), y[mine]).backward()  # FSDP reduce-scatters the mean
        recorder.record(t, {"params": [p.to_local().detach() for p in params],
                            "grads": [p.grad.to_local() for p in params]}, lr=LR, batch_ids=ids)
        optimizer.step()
    manifest = recorder.finish()
    history = RankShardHistory.open(directory)
    v = torch.linspace(-1, 1, history.shard.total)
    y = torch.zeros(history.shard.total)
    history.encoded(READ_STEP, "grads").axpy_([y], 2.0)
    read = {"dot": history.encoded(READ_STEP, "grads").dot([v]), "axpy": y,
            "weights": history.stored(READ_STEP, "params").whole()}
    history.close()
    return manifest, read


def _single_process() -> HistoryStore:
    model = _model()
    x, y = _data()
    shapes = [tuple(p.shape) for p in model.parameters()]
    store = HistoryStore({"params": FieldSpec(shapes, "fp32"), "grads": FieldSpec(shapes, "fp32")})
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for t, ids in enumerate(_batches()):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[ids]), y[ids]).backward()
        store.record(t, {"params": [p.detach() for p in model.parameters()],
                         "grads": [p.grad for p in model.parameters()]}, lr=LR, batch_ids=ids)
        optimizer.step()
    return store


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_fsdp_shards_reassemble_to_the_single_process_history(world):
    with tempfile.TemporaryDirectory() as directory:
        got = launch(fsdp_worker, world, TIMEOUT_S, directory)
        history = ShardedHistory.open(directory)
        want = _single_process()
        assert history.steps == want.steps and len(want.steps) == EPOCHS * N // BATCH
        for (_, _, _, got_ids), (_, _, _, want_ids) in zip(history.stores[-1].schedule(), want.schedule()):
            assert torch.equal(got_ids, want_ids)
        for t in want.steps:
            read, whole = history.read(t), want.read(t)
            for name in ("params", "grads"):
                expected = torch.cat([v.reshape(-1) for v in whole.tensors[name]])
                assert torch.allclose(read[name], expected, rtol=1e-5, atol=1e-6), \
                    (t, name, float((read[name] - expected).abs().max()))
        history.close()
    flat = {name: torch.cat([v.reshape(-1) for v in want.read(READ_STEP).tensors[name]]) for name in ("params", "grads")}
    v = torch.linspace(-1, 1, flat["grads"].numel())
    for _, read in got:
        assert read["dot"] == got[0][1]["dot"] and torch.equal(read["axpy"], got[0][1]["axpy"])
        assert read["dot"] == pytest.approx(float(torch.dot(flat["grads"].double(), v.double())), rel=1e-5, abs=1e-6)
        assert torch.allclose(read["axpy"], 2.0 * flat["grads"], rtol=1e-5, atol=1e-6)
        assert torch.allclose(read["weights"], flat["params"], rtol=1e-5, atol=1e-6)
    manifests = [m for m, _ in got]
    placed = [r["placements"] for r in manifests[0]["ranks"]]
    assert all(m == manifests[0] for m in manifests) and len(placed) == world
    # FSDP splits each parameter: rank 0's shard of the second parameter is not right after its first.
    sizes = [p.numel() for p in _model().parameters()]
    assert placed[0][1] == sizes[0] and placed[1][0] > 0
