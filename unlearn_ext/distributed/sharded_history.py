"""Training history of sharded parameters (docs/design.md §12 and §5): each rank records its own
shard into its own disk store, and a manifest ties the stores together.

    recorder = ShardedRecorder("history/", my_shard_tensors)       # on every rank (collective)
    for t, ...:                                                    # the training loop
        recorder.record(t, {"params": my_shard_tensors, "grads": my_shard_grads}, lr=lr)
    recorder.finish()                                              # collective: rank 0 writes the manifest
    history = ShardedHistory.open("history/")                      # any process, later
    history.read(t)["params"]                                      # the whole flat vector of step t

A rank's shard is a list of tensors (e.g. FSDP's local flat parameter, or whole parameters placed
on that rank); the global order is rank 0's tensors flattened, then rank 1's, ... (the order the
distributed Top-K uses). The manifest (manifest.json) lists the world size, each rank's store file,
global element offset, element count and tensor shapes, the recorded step range and count, and the
fields' codecs. `ShardedHistory.read` decodes each rank's store and concatenates the shards in
rank order.

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
from .group import agree, require_group
from .ledger import state_digest

MANIFEST = "manifest.json"
FORMAT = "unlearn_ext.sharded_history/1"


def _store_file(rank: int) -> str:
    return f"rank{rank}.hist"


class ShardedRecorder:
    """Records this rank's shard of every step into `directory`/rank<r>.hist (module docstring).
    Construct and finish on every rank of `group`; `record` is local (no communication)."""

    def __init__(self, directory: str, shard: list, *, params: str = "fp32", grads: str | None = "fp32",
                 group=None, keyframe_every: int = 50):
        self.group = require_group(group)
        self.rank, self.world = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.directory = directory
        self.codecs = {"params": params, "grads": grads}

        def build():  # inside the agreement: a rank refusing its shard or codecs refuses everywhere
            tensors = list(shard)
            if not all(isinstance(t, torch.Tensor) for t in tensors):
                raise TypeError("the shard must be a list of tensors")
            self.shapes = [tuple(t.shape) for t in tensors]
            self.elements = sum(t.numel() for t in tensors)
            # As HistoryStore.for_model: quantized parameters as closed-loop deltas, gradients plainly.
            fields = {name: FieldSpec(self.shapes, codec, delta=name == "params" and codec in BITS)
                      for name, codec in self.codecs.items() if codec is not None}
            os.makedirs(directory, exist_ok=True)
            self.store = HistoryStore(fields, tier="disk", path=os.path.join(directory, _store_file(self.rank)),
                                      keyframe_every=keyframe_every)
            return state_digest(sorted((k, str(v)) for k, v in self.codecs.items())), self.elements
        rows = agree(build, shared=("codecs",), local=("shard elements",), group=self.group)
        self.counts = [int(c) for c in rows[:, 1]]
        self.offset = sum(self.counts[:self.rank])

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
        layouts = [None] * self.world
        dist.all_gather_object(layouts, {"rank": self.rank, "file": _store_file(self.rank),
                                         "shapes": [list(s) for s in self.shapes]}, group=self.group)
        steps = self.store.steps
        manifest = {"format": FORMAT, "world": self.world,
                    "ranks": [{**layout, "offset": sum(self.counts[:r]), "elements": self.counts[r]}
                              for r, layout in enumerate(layouts)],
                    "steps": {"first": steps[0] if steps else None, "last": steps[-1] if steps else None,
                              "count": len(steps)},
                    "codecs": {k: v for k, v in self.codecs.items() if v is not None}}
        self.store.close()
        if self.rank == 0:
            atomic_write(os.path.join(self.directory, MANIFEST), lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        dist.barrier(group=self.group)  # the manifest exists before any rank returns
        return manifest


class ShardedHistory:
    """A sharded recording read back as whole steps (module docstring). Needs no process group."""

    def __init__(self, directory: str, manifest: dict, stores: list):
        self.directory, self.manifest, self.stores = directory, manifest, stores

    @classmethod
    def open(cls, directory: str) -> "ShardedHistory":
        path = os.path.join(directory, MANIFEST)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist: finish() the ShardedRecorder on every rank first")
        with open(path) as f:
            manifest = json.load(f)
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{path} is not a sharded history manifest ({FORMAT}); format {manifest.get('format')!r}")
        stores = [HistoryStore.open(os.path.join(directory, r["file"]), writable=False) for r in manifest["ranks"]]
        want = manifest["steps"]["count"]
        for r, store in zip(manifest["ranks"], stores):
            if len(store.steps) != want:
                raise ValueError(f"{r['file']} holds {len(store.steps)} steps; the manifest says every rank recorded "
                                 f"{want}: the store was changed or cut after recording")
        return cls(directory, manifest, stores)

    @property
    def steps(self) -> list:
        return self.stores[0].steps

    def read(self, step: int, names=None) -> dict:
        """{field name: the step's whole flat float32 vector}, the shards concatenated in rank order."""
        names = list(names or self.manifest["codecs"])
        parts = [store.read(step, names).tensors for store in self.stores]
        return {name: torch.cat([t.reshape(-1) for part in parts for t in part[name]]) for name in names}

    def close(self) -> None:
        for store in self.stores:
            store.close()
