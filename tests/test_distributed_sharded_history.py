"""Sharded history (unlearn_ext.distributed.sharded_history), 2 and 3 gloo ranks: each rank records
its shard into its own store, rank 0 writes the manifest, and every step read back from the shards
equals the same step of one store holding all the parameters, bit for bit: with int8 parameters
(closed-loop deltas) and int8 gradients when each rank holds whole tensors, with fp32 for a flat
vector split anywhere (FSDP's layout). Ranks that disagree on the codecs or on the recorded steps
are refused on every rank."""
from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch

from unlearn_ext.distributed import ShardedHistory, ShardedRecorder, rank_slice
from unlearn_ext.history import HistoryStore
from unlearn_ext.history.store import FieldSpec

from distributed_setup import launch

TIMEOUT_S = 90
SHAPES = [(24, 16), (24,), (16, 24), (16,), (10, 16), (10,)]
STEPS = 7
CODECS = {"tensors": "int8", "flat": "fp32"}  # the codec each split is tested with


def _step(t: int, name: str) -> list[torch.Tensor]:
    """Step t's tensors of a field: parameters drift smoothly (what delta encoding sees), gradients not."""
    g = torch.Generator().manual_seed(1000 * (name == "grads") + (t if name == "grads" else 0))
    base = [torch.randn(s, generator=g) for s in SHAPES]
    if name == "grads":
        return base
    drift = torch.Generator().manual_seed(500 + t)
    return [b + 0.01 * t * torch.randn(b.shape, generator=drift) for b in base]


def _shard(tensors: list, split: str, rank: int, world: int) -> list[torch.Tensor]:
    """This rank's part: a run of whole tensors (about 1/world of the elements each), or its
    rank_slice of the flat vector."""
    if split == "flat":
        return [rank_slice(torch.cat([t.reshape(-1) for t in tensors]), rank, world).clone()]
    total, seen, out = sum(t.numel() for t in tensors), 0, []
    for t in tensors:
        if rank * total // world <= seen < (rank + 1) * total // world:
            out.append(t)
        seen += t.numel()
    return out


def _record(recorder, split, rank, world, steps=range(STEPS)):
    for t in steps:
        recorder.record(t, {n: _shard(_step(t, n), split, rank, world) for n in ("params", "grads")},
                        lr=0.1 * (t + 1), batch_ids=torch.arange(t, t + 4))


def sharded_worker(rank, world, directory, split):
    codec = CODECS[split]
    recorder = ShardedRecorder(os.path.join(directory, "run"), _shard(_step(0, "params"), split, rank, world),
                               params=codec, grads=codec, keyframe_every=3)
    _record(recorder, split, rank, world)
    manifest = recorder.finish()
    refusals = []
    try:  # rank 1 asks for another codec
        ShardedRecorder(os.path.join(directory, "codecs"), _shard(_step(0, "params"), split, rank, world),
                        params="fp16" if rank == 1 else codec, grads=codec)
        refusals.append("accepted")
    except ValueError as exc:
        refusals.append(str(exc))
    other = ShardedRecorder(os.path.join(directory, "steps"), _shard(_step(0, "params"), split, rank, world),
                            params=codec, grads=codec)
    _record(other, split, rank, world, range(STEPS - 1 if rank == 1 else STEPS))  # rank 1 missed a step
    try:
        other.finish()
        refusals.append("accepted")
    except ValueError as exc:
        refusals.append(str(exc))
    return manifest, refusals


def _unsharded(split: str) -> HistoryStore:
    codec = CODECS[split]
    shapes = SHAPES if split == "tensors" else [(sum(torch.Size(s).numel() for s in SHAPES),)]
    store = HistoryStore({"params": FieldSpec(shapes, codec, delta=codec == "int8"), "grads": FieldSpec(shapes, codec)},
                         keyframe_every=3)
    for t in range(STEPS):
        fields = {n: _step(t, n) if split == "tensors" else [torch.cat([x.reshape(-1) for x in _step(t, n)])]
                  for n in ("params", "grads")}
        store.record(t, fields, lr=0.1 * (t + 1), batch_ids=torch.arange(t, t + 4))
    return store


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("split", ["tensors", "flat"])
def test_sharded_reads_equal_one_store(world, split):
    with tempfile.TemporaryDirectory() as directory:
        got = launch(sharded_worker, world, TIMEOUT_S, directory, split)
        history = ShardedHistory.open(os.path.join(directory, "run"))
        with open(os.path.join(directory, "run", "manifest.json")) as f:
            on_disk = json.load(f)
        want = _unsharded(split)
        assert history.steps == want.steps == list(range(STEPS))
        for t in range(STEPS):
            read = history.read(t)
            whole = want.read(t)
            for name in ("params", "grads"):
                assert torch.equal(read[name], torch.cat([x.reshape(-1) for x in whole.tensors[name]])), (t, name)
        history.close()
    ranks = on_disk["ranks"]
    assert on_disk == got[0][0] and on_disk["world"] == world and len(ranks) == world
    assert [r["offset"] for r in ranks] == [sum(q["elements"] for q in ranks[:i]) for i in range(world)]
    assert sum(r["elements"] for r in ranks) == sum(torch.Size(s).numel() for s in SHAPES)
    assert on_disk["steps"] == {"first": 0, "last": STEPS - 1, "count": STEPS}
    assert on_disk["codecs"] == {"params": CODECS[split], "grads": CODECS[split]}
    for rank in range(world):
        codecs, steps = got[rank][1]
        assert "disagree on codecs" in codecs, codecs
        assert "disagree on the recorded steps" in steps, steps


def moved_placement_worker(rank, world, directory):
    """Records a flat split, then rank 0 rewrites the manifest with rank 1's shard placed over rank
    0's (a manifest changed after recording); every rank then opens its shard shard-locally."""
    from unlearn_ext.distributed import RankShardHistory
    import torch.distributed as dist

    recorder = ShardedRecorder(directory, _shard(_step(0, "params"), "flat", rank, world), params="fp32",
                               grads="fp32")
    _record(recorder, "flat", rank, world)
    recorder.finish()
    if rank == 0:
        path = os.path.join(directory, "manifest.json")
        with open(path) as f:
            manifest = json.load(f)
        manifest["ranks"][1]["placements"] = [0]
        with open(path, "w") as f:
            json.dump(manifest, f)
    dist.barrier()
    try:
        RankShardHistory.open(directory)
    except ValueError as exc:
        return str(exc)
    return "accepted"


@pytest.mark.slow
def test_a_manifest_whose_placements_overlap_is_refused_when_opened():
    with tempfile.TemporaryDirectory() as directory:
        got = launch(moved_placement_worker, 2, TIMEOUT_S, directory)
        with pytest.raises(ValueError, match="more than once"):
            ShardedHistory.open(directory)
    for message in got:
        assert "more than once" in message, message


def test_a_refused_open_closes_the_stores_it_opened(tmp_path, monkeypatch):
    """Rank 1's store was cut after recording: opening is refused, and rank 0's store, opened first,
    is closed again (no file left open by a refused call)."""
    shapes = [(4,)]
    ranks = []
    for rank, steps in enumerate((3, 2)):
        store = HistoryStore({"params": FieldSpec(shapes, "fp32")}, tier="disk", path=str(tmp_path / f"rank{rank}.hist"))
        for t in range(steps):
            store.record(t, {"params": [torch.full((4,), float(t))]}, lr=0.1)
        store.close()
        ranks.append({"rank": rank, "file": f"rank{rank}.hist", "shapes": [[4]], "placements": [4 * rank],
                      "offset": 4 * rank, "elements": 4})
    (tmp_path / "manifest.json").write_text(json.dumps({
        "format": "unlearn_ext.sharded_history/1", "world": 2, "ranks": ranks,
        "steps": {"first": 0, "last": 2, "count": 3}, "codecs": {"params": "fp32"}}))
    opened, closed = [], []
    real_open, real_close = HistoryStore.open, HistoryStore.close

    def tracked_open(*args, **kwargs):
        store = real_open(*args, **kwargs)
        opened.append(store)
        return store

    def tracked_close(self):
        closed.append(self)
        real_close(self)
    monkeypatch.setattr(HistoryStore, "open", tracked_open)
    monkeypatch.setattr(HistoryStore, "close", tracked_close)
    with pytest.raises(ValueError, match="rank1.hist holds 2 steps"):
        ShardedHistory.open(str(tmp_path))
    assert len(opened) == 2 and all(any(s is c for c in closed) for s in opened)


def test_a_manifest_whose_shapes_differ_from_a_rank_store_is_refused(tmp_path):
    """The manifest places rank 1's shard as a (2, 2) tensor but its store recorded a (4,) one (the
    same element count, so the placements alone cannot tell): opening names the field and the rank."""
    ranks = []
    for rank in range(2):
        store = HistoryStore({"params": FieldSpec([(4,)], "fp32")}, tier="disk", path=str(tmp_path / f"rank{rank}.hist"))
        for t in range(2):
            store.record(t, {"params": [torch.full((4,), float(t))]}, lr=0.1)
        store.close()
        ranks.append({"rank": rank, "file": f"rank{rank}.hist", "shapes": [[4]] if rank == 0 else [[2, 2]],
                      "placements": [4 * rank], "offset": 4 * rank, "elements": 4})
    (tmp_path / "manifest.json").write_text(json.dumps({
        "format": "unlearn_ext.sharded_history/1", "world": 2, "ranks": ranks,
        "steps": {"first": 0, "last": 1, "count": 2}, "codecs": {"params": "fp32"}}))
    with pytest.raises(ValueError, match=r"rank1.hist: field\(s\) params hold shapes other than .* for rank 1"):
        ShardedHistory.open(str(tmp_path))


# Shards of different tensor counts and ranks (a 0-dim tensor too): the layouts cross as padded rows.
UNEVEN = [[(3, 4), (5,)], [(2, 2, 2)], [(), (7,)]]


def uneven_layout_worker(rank, world, directory):
    from distributed_setup import watch_collectives

    seen = watch_collectives()
    shard = [torch.full(s, float(rank)) for s in UNEVEN[rank]]
    recorder = ShardedRecorder(directory, shard, params="fp32", grads=None)
    for t in range(2):
        recorder.record(t, {"params": [x + t for x in shard]})
    return recorder.finish(), seen


def test_the_recorders_setup_exchanges_the_layouts_through_tensor_collectives():
    """Every rank's layout (shapes, placements) crosses through tensor all-reduces on the group's
    exchange device, no object collective (which pickles, and under nccl needs
    torch.cuda.set_device on every rank), and reaches the manifest as each rank gave it."""
    with tempfile.TemporaryDirectory() as directory:
        got = launch(uneven_layout_worker, 3, TIMEOUT_S, directory)
        history = ShardedHistory.open(directory)
        for t in range(2):
            want = torch.cat([torch.full(s, float(r) + t).reshape(-1) for r, shapes in enumerate(UNEVEN)
                              for s in shapes])
            assert torch.equal(history.read(t)["params"], want), t
        history.close()
    sizes = [[torch.Size(s).numel() for s in shapes] for shapes in UNEVEN]
    starts = [sum(map(sum, sizes[:r])) for r in range(3)]
    for rank, (manifest, seen) in enumerate(got):
        assert seen and all(device == expected for device, expected in seen), (rank, seen)
        assert manifest == got[0][0]
        assert [r["shapes"] for r in manifest["ranks"]] == [[list(s) for s in shapes] for shapes in UNEVEN]
        assert [r["placements"] for r in manifest["ranks"]] == [
            [starts[r] + sum(sizes[r][:i]) for i in range(len(sizes[r]))] for r in range(3)]
        assert [r["file"] for r in manifest["ranks"]] == [f"rank{r}.hist" for r in range(3)]
