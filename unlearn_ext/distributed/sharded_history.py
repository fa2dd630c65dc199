"""Training history of sharded parameters (docs/design.md §12 and §5): each rank records its own
shard into its own disk store, and a manifest ties the stores together.

    recorder = ShardedRecorder("history/", my_shard_tensors)       # on every rank (collective)
    for t, ...:                                                    # the training loop
        recorder.record(t, {"params": my_shard_tensors, "grads": my_shard_grads}, lr=lr)
    recorder.finish()                                              # collective: rank 0 writes the manifest
    history = ShardedHistory.open("history/")                      # any process, later
    history.read(t)["params"]                                      # the whole flat vector of step t

A rank's shard is a list of tensors (e.g. FSDP's local shards of each parameter, or whole
parameters placed on that rank). Where each tensor sits in the flat vector of all parameters is
its placement: by default the ranks' tensors concatenated in rank order (rank 0's tensors
flattened, then rank 1's, ...: the order the distributed Top-K uses); `placements=` gives each
tensor's global element offset instead (FSDP splits every parameter along dim 0, so rank r's
shard of a parameter starts at the parameter's offset plus its first row times the row size).
The manifest (manifest.json) lists the world size, each rank's store file, element count, tensor
shapes and placements, the recorded step range and count, and the fields' codecs.
`ShardedHistory.read` decodes each rank's store and places the shards (the one read that builds
whole steps); `RankShardHistory` (shard_local.py) serves the history methods shard by shard.

What equals an unsharded recording: with fp32 / fp16 / bf16 codecs any split reads back the same
bits; with the quantized codecs the blocks are per tensor, so a split that keeps tensors whole
(each rank's shard a run of whole parameters) reads back the same bits as one store of all the
parameters; a split through a tensor quantizes other blocks (still within the codec's error).
"""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from ..durable import atomic_write
from ..history import HistoryStore
from ..history.codecs import BITS
from ..history.store import FieldSpec
from .group import agree, every_ranks_row, require_group
from .ledger import state_digest

MANIFEST = "manifest.json"
FORMAT = "unlearn_ext.sharded_history/1"


def _store_file(rank: int) -> str:
    return f"rank{rank}.hist"


class ShardedRecorder:
    """Records this rank's shard of every step into `directory`/rank<r>.hist (module docstring).
    Construct and finish on every rank of `group`; `record` is local (no communication)."""

    def __init__(self, directory: str, shard: list, *, params: str = "fp32", grads: str | None = "fp32",
                 extra: dict | None = None, placements: list | None = None, run_info: dict | None = None,
                 group=None, keyframe_every: int = 50):
        """extra: more fields {name: codec}, stored plainly (e.g. Mini-Unlearning's 'full_grad');
        placements: each shard tensor's global element offset (module docstring; default: rank
        order); run_info: the run metadata the history methods need (HistoryStore.run_info of a
        single-process recording: the optimizer settings, learning-rate schedule, n, ...)."""
        self.group = require_group(group)
        self.rank, self.world = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.directory = directory
        self.codecs = {"params": params, "grads": grads, **(extra or {})}

        def build():  # inside the agreement: a rank refusing its shard or codecs refuses everywhere
            tensors = list(shard)
            if not all(isinstance(t, torch.Tensor) for t in tensors):
                raise TypeError("the shard must be a list of tensors")
            self.shapes = [tuple(t.shape) for t in tensors]
            self.elements = sum(t.numel() for t in tensors)
            # As HistoryStore.for_model: quantized parameters as closed-loop deltas, gradients plainly.
            fields = {name: FieldSpec(self.shapes, codec, delta=name == "params" and codec in BITS)
                      for name, codec in self.codecs.items() if codec is not None}
            if placements is not None and (len(placements) != len(tensors)
                                           or not all(isinstance(o, int) and 0 <= o < 1 << 63 for o in placements)):
                raise ValueError(f"placements must give one non-negative int64 offset per shard tensor "
                                 f"({len(tensors)}), got {placements!r}")
            os.makedirs(directory, exist_ok=True)
            self.store = HistoryStore(fields, tier="disk", path=os.path.join(directory, _store_file(self.rank)),
                                      keyframe_every=keyframe_every, run_info=run_info)
            return (state_digest(sorted((k, str(v)) for k, v in self.codecs.items())), placements is None,
                    self.elements, len(_layout_row(self.shapes, [0] * len(self.shapes))))
        rows = agree(build, shared=("codecs", "whether placements are given"),
                     local=("shard elements", "layout length"), group=self.group)
        self.counts = [int(c) for c in rows[:, 2]]
        self.offset = sum(self.counts[:self.rank])
        if placements is None:  # rank order: this rank's tensors one after the other from its offset
            sizes = [int(torch.Size(s).numel()) for s in self.shapes]
            placements = [self.offset + sum(sizes[:i]) for i in range(len(sizes))]
        self.placements = [int(o) for o in placements]
        # Every rank's layout through one int64 row each, padded to the longest (the lengths crossed in
        # the agreement): a tensor collective on the group's device, never a pickled object.
        row = torch.zeros(int(rows[:, 3].max()), dtype=torch.int64)
        mine = _layout_row(self.shapes, self.placements)
        row[:len(mine)] = torch.tensor(mine, dtype=torch.int64)
        layouts = [_layout_from_row(r.tolist()) for r in every_ranks_row(row, self.group)]
        # A rank's store file follows from its rank alone (_store_file): nothing to exchange.
        self.ranks = [{"rank": r, "file": _store_file(r), "shapes": shapes, "placements": offsets,
                       "offset": sum(self.counts[:r]), "elements": self.counts[r]}
                      for r, (shapes, offsets) in enumerate(layouts)]
        try:  # before any step is recorded; every rank checks the same layouts, so all raise or none
            check_placements(self.ranks)
        except ValueError:
            self.store.close()
            raise

    def record(self, step: int, fields: dict, *, lr: float | None = None, batch_ids=None) -> None:
        """This rank's shard of step `step`: {field name: list of tensors shaped like the shard}."""
        self.store.record(step, fields, lr=lr, batch_ids=batch_ids)

    def finish(self) -> dict:
        """Collective: the ranks check they recorded the same steps; rank 0 writes the manifest.
        Returns the manifest (on every rank)."""
        def check():
            steps = self.store.steps
            return (state_digest(steps),)
        agree(check, shared=("the recorded steps",), group=self.group)
        steps = self.store.steps
        manifest = {"format": FORMAT, "world": self.world, "ranks": self.ranks,
                    "steps": {"first": steps[0] if steps else None, "last": steps[-1] if steps else None,
                              "count": len(steps)},
                    "codecs": {k: v for k, v in self.codecs.items() if v is not None}}
        self.store.close()
        if self.rank == 0:
            atomic_write(os.path.join(self.directory, MANIFEST), lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        dist.barrier(group=self.group)  # the manifest exists before any rank returns
        return manifest


def _layout_row(shapes: list, placements: list) -> list:
    """A rank's layout as integers: the number of tensors, each tensor's dimension count and sizes,
    then each tensor's placement (read back by _layout_from_row, whatever follows it ignored)."""
    return [len(shapes), *(v for s in shapes for v in (len(s), *s)), *placements]


def _layout_from_row(row: list) -> tuple:
    """(shapes as lists, placements) from a _layout_row, possibly padded at the end."""
    count, pos, shapes = row[0], 1, []
    for _ in range(count):
        ndim = row[pos]
        shapes.append(row[pos + 1:pos + 1 + ndim])
        pos += 1 + ndim
    return shapes, row[pos:pos + count]


def placement_index(rank_entry: dict) -> torch.Tensor:
    """The global element index of each of a rank's local elements (its tensors flattened in order)."""
    sizes = [int(torch.Size(s).numel()) for s in rank_entry["shapes"]]
    # A manifest without placements (written before they were recorded) is in rank order.
    offsets = rank_entry.get("placements") or [rank_entry["offset"] + sum(sizes[:i]) for i in range(len(sizes))]
    runs = [torch.arange(o, o + n) for o, n in zip(offsets, sizes)]
    return torch.cat(runs) if runs else torch.zeros(0, dtype=torch.int64)


def check_placements(ranks: list) -> None:
    """Refuses placements that do not cover the flat vector of all parameters exactly once."""
    total = sum(r["elements"] for r in ranks)
    seen = torch.zeros(total, dtype=torch.int64)
    for r in ranks:
        index = placement_index(r)
        if index.numel() and int(index.max()) >= total:
            raise ValueError(f"rank {r['rank']}'s placements reach element {int(index.max())}; the ranks hold "
                             f"{total} elements in all")
        seen.index_add_(0, index, torch.ones_like(index))
    if not bool((seen == 1).all()):
        twice, never = int((seen > 1).sum()), int((seen == 0).sum())
        raise ValueError(f"the ranks' placements cover {twice} elements more than once and leave {never} of the "
                         f"{total} uncovered: each element of the flat parameter vector must be placed once")


def read_manifest(directory: str) -> dict:
    """The manifest of the sharded history in `directory`, refused unless it is one whose placements
    cover the flat vector of all parameters exactly once (a manifest changed after recording would
    otherwise put a shard's values at other elements)."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: finish() the ShardedRecorder on every rank first")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a sharded history manifest ({FORMAT}); format {manifest.get('format')!r}")
    check_placements(manifest["ranks"])
    return manifest


def open_rank_store(directory: str, manifest: dict, rank: int) -> HistoryStore:
    """Rank `rank`'s store of the sharded history (read-only), refused unless it holds the steps the
    manifest counts and every field has the shard shapes the manifest places."""
    entry, want = manifest["ranks"][rank], manifest["steps"]["count"]
    store = HistoryStore.open(os.path.join(directory, entry["file"]), writable=False)
    shapes = [tuple(int(d) for d in s) for s in entry["shapes"]]
    wrong = sorted(name for name, spec in store.fields.items() if list(spec.shapes) != shapes)
    if len(store.steps) != want or wrong:
        store.close()
        if wrong:
            raise ValueError(f"{entry['file']}: field(s) {', '.join(wrong)} hold shapes other than the manifest's "
                             f"{[list(s) for s in shapes]} for rank {rank}: the manifest or the store was changed "
                             "after recording")
        raise ValueError(f"{entry['file']} holds {len(store.steps)} steps; the manifest says every rank recorded "
                         f"{want}: the store was changed or cut after recording")
    return store


class ShardedHistory:
    """A sharded recording read back as whole steps (module docstring). Needs no process group."""

    def __init__(self, directory: str, manifest: dict, stores: list):
        self.directory, self.manifest, self.stores = directory, manifest, stores

    @classmethod
    def open(cls, directory: str) -> "ShardedHistory":
        manifest = read_manifest(directory)
        stores = []
        try:
            for rank in range(manifest["world"]):
                stores.append(open_rank_store(directory, manifest, rank))
        except BaseException:  # a refused open leaves no store open
            for store in stores:
                store.close()
            raise
        return cls(directory, manifest, stores)

    @property
    def steps(self) -> list:
        return self.stores[0].steps

    def read(self, step: int, names=None) -> dict:
        """{field name: the step's whole flat float32 vector}, each rank's shard at its placements."""
        names = list(names or self.manifest["codecs"])
        total = sum(r["elements"] for r in self.manifest["ranks"])
        parts = [store.read(step, names).tensors for store in self.stores]
        out = {name: torch.empty(total, dtype=torch.float32) for name in names}
        for entry, part in zip(self.manifest["ranks"], parts):
            index = placement_index(entry)
            for name in names:
                out[name][index] = torch.cat([t.reshape(-1) for t in part[name]]) if part[name] else out[name][:0]
        return out

    def close(self) -> None:
        for store in self.stores:
            store.close()
