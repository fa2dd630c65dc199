"""Shard-local reads of a sharded history (docs/design.md §12 and §5): each rank keeps only its own
shard's codes and serves the history methods from them; no recorded step is ever decoded whole.

    history = RankShardHistory.open("history/")                    # on every rank (collective)
    DistributedDeltaGradUnlearner(model, data, history).unlearn(ids)  # or DistributedMiniUnlearner

What the history methods take from a recorded step, and how each rank serves it:
  * y += a * g_t on the codes (DeltaGrad's recorded gradients): each rank runs the dequantize-axpy
    on its own elements of y with its own codes, then the ranks exchange their updated elements;
  * <g_t, v> on the codes: each rank's partial dot (float64) on its codes, the partial dots summed
    in rank order (so every rank holds the same bits);
  * a difference x - v_t (DeltaGrad's gap w - w_t, Mini-Unlearning's drift g_k - grad L_F): each rank
    computes its elements from its decoded shard, then the ranks exchange them;
  * whole weights, only where a forward pass runs at them (DeltaGrad's start w_0, Mini-Unlearning's
    anchors, the retraining fallback's w_0): the model here is replicated, so its forward needs
    them whole; they are assembled from the ranks' elements, as FSDP unshards a layer for its forward.
A rank decodes nothing but its own shard, and no recorded gradient is ever assembled. Every
element of a result is computed by the one rank that holds it, with the single-process arithmetic,
and every rank receives the same elements: the ranks hold the same bits, and those equal the
single-process results element by element (a dot differs only in its summation order).

The exchanges move one model-sized vector per operation (as FSDP's all-gather of the parameters
does); the saving is memory and decoding: a rank never holds another rank's history, and decodes
1/world of each step.
"""
from __future__ import annotations


import torch
import torch.distributed as dist

from ..data import tensors_sha256
from ..history import HistoryStore
from ..history.store import StoredStep
from ..mini.vectors import StoredVector
from .group import agree, exchange_device, require_group, sum_in_rank_order
from .sharded_history import open_rank_store, placement_index, read_manifest


class RankShard:
    """Where this rank's shard sits in the flat vector of all parameters (the manifest's
    placements), and the exchange that gives every rank every rank's elements."""

    def __init__(self, manifest: dict, rank: int, group):
        self.group, self.rank = group, rank
        self.total = sum(r["elements"] for r in manifest["ranks"])
        self.indices = [placement_index(r) for r in manifest["ranks"]]  # global index of each local element
        self.index = self.indices[rank]
        self.shapes = [tuple(s) for s in manifest["ranks"][rank]["shapes"]]
        self.largest = max(int(i.numel()) for i in self.indices)

    def local(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's elements of a whole flat vector (a copy, in the shard's order)."""
        return flat[self.index.to(flat.device)]

    def as_shard_tensors(self, local: torch.Tensor) -> list:
        """A local flat vector as tensors shaped like the shard's recorded tensors (views)."""
        sizes = [int(torch.Size(s).numel()) for s in self.shapes]
        return [part.view(s) for part, s in zip(torch.split(local, sizes), self.shapes)]

    def exchange_(self, flat: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """Writes every rank's `local` elements into `flat` (on every rank) and returns it. The
        shards may differ in size: each is padded to the largest for the all-gather."""
        device = exchange_device(self.group)
        mine = torch.zeros(self.largest, dtype=local.dtype, device=device)
        mine[:local.numel()] = local.to(device)
        parts = [torch.empty_like(mine) for _ in self.indices]
        dist.all_gather(parts, mine, group=self.group)
        for index, part in zip(self.indices, parts):
            flat[index.to(flat.device)] = part[:index.numel()].to(flat.device, flat.dtype)
        return flat


class ShardVector(StoredVector):
    """A recorded field of which this rank holds its shard's decoded values (module docstring)."""

    def __init__(self, local: torch.Tensor, shard: RankShard):
        super().__init__(local)
        self.shard = shard

    def whole(self) -> torch.Tensor:
        return self.shard.exchange_(torch.empty(self.shard.total, dtype=self.values.dtype), self.values)

    def subtracted_from(self, x: torch.Tensor) -> torch.Tensor:
        mine = self.shard.local(x) - self.values.to(x.dtype)
        return self.shard.exchange_(torch.empty_like(x), mine)


class ShardField:
    """A recorded plain field (gradients) as `HistoryStore.encoded` serves it, on this rank's codes:
    the same dot / axpy_ as EncodedField, taking tensors shaped like the whole model's."""

    def __init__(self, field, shard: RankShard):
        self.field, self.shard = field, shard
        self.codec = field.codec

    def dot(self, v) -> float:
        """<values, v> over every rank's elements: partial dots summed in rank order (float64)."""
        local = self.shard.local(_joined(v))
        partial = torch.tensor([self.field.dot(self.shard.as_shard_tensors(local))], dtype=torch.float64)
        return float(sum_in_rank_order(partial, self.shard.group)[0])

    def axpy_(self, y, alpha: float) -> list:
        """y += alpha * values, in place, on every rank (each rank its own elements); returns y."""
        y = list(y)
        flat = _consecutive_view(y)
        work = flat if flat is not None else _joined(y)
        local = self.shard.local(work)
        self.field.axpy_(self.shard.as_shard_tensors(local), alpha)
        self.shard.exchange_(work, local)
        if flat is None:  # the tensors were not views of one vector: copy the result back
            for t, part in zip(y, torch.split(work, [t.numel() for t in y])):
                t.copy_(part.view(t.shape))
        return y


def _joined(tensors) -> torch.Tensor:
    tensors = list(tensors)
    flat = _consecutive_view(tensors)
    return flat if flat is not None else torch.cat([t.detach().reshape(-1) for t in tensors])


def _consecutive_view(tensors) -> torch.Tensor | None:
    """The flat vector `tensors` are consecutive views of (FlatModel.split gives such), or None."""
    if not tensors or tensors[0]._base is None:
        return None
    base = tensors[0]._base
    if base.dim() != 1 or not base.is_contiguous():
        return None
    position = base.data_ptr()
    for t in tensors:
        if t._base is not base or not t.is_contiguous() or t.data_ptr() != position:
            return None
        position += t.numel() * t.element_size()
    return base if position == base.data_ptr() + base.numel() * base.element_size() else None


class RankShardHistory:
    """This rank's store of a sharded history, served shard-locally (module docstring): the run
    metadata, the schedule and the per-step digests as HistoryStore has them; `stored` and
    `encoded` in place of decoded reads. Open it on every rank of `group` with the manifest's
    world size; the rank reads the store its rank recorded.

    A read can fail on one rank only (its shard's record is damaged, its file unreadable), and the
    other ranks would then wait in the read's next exchange until the group's timeout. So each
    field read is agreed on (group.agree: one small exchange per read), and a failed read raises
    DistributedRefusal on every rank, naming the rank and its error; the schedule (lrs, batch
    ids) is read once, when opening, inside the opening's agreement."""

    def __init__(self, store: HistoryStore, manifest: dict, shard: RankShard, schedule: list):
        self.store, self.manifest, self.shard = store, manifest, shard
        self.group = shard.group
        self._schedule = schedule

    @classmethod
    def open(cls, directory: str, group=None) -> "RankShardHistory":
        group = require_group(group)
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        found = {}

        def check():  # inside the agreement: a rank that cannot open its store refuses on every rank
            manifest = read_manifest(directory)
            if manifest["world"] != world:
                raise ValueError(f"the history was recorded by {manifest['world']} ranks; this group has {world}: "
                                 "each rank serves the shard its rank recorded")
            found.update(manifest=manifest, store=open_rank_store(directory, manifest, rank))
            found["schedule"] = list(found["store"].schedule())
            return ()
        try:
            agree(check, shared=(), group=group)
        except BaseException:  # refused on some rank: close what this rank opened
            if "store" in found:
                found["store"].close()
            raise
        return cls(found["store"], found["manifest"], RankShard(found["manifest"], rank, group), found["schedule"])

    # ---- what HistoryStore offers without decoding ------------------------------------------------

    @property
    def run_info(self) -> dict:
        return self.store.run_info

    @property
    def fields(self) -> dict:
        return self.store.fields

    @property
    def steps(self) -> list:
        return self.store.steps

    @property
    def revision(self) -> int:
        """The shard store's revision (HistoryStore.revision): it is opened read-only and the
        schedule is read once, so what is computed from this history (the history methods' digest,
        mini/history_digest.py) holds for every unlearner built on it, and is computed once."""
        return self.store.revision

    @property
    def bytes_read(self) -> int:
        """This rank's history bytes read (its shard's)."""
        return self.store.bytes_read

    def schedule(self):
        """(step, lr, lrs, batch ids) of every recorded step, as read when the history was opened."""
        return iter(self._schedule)

    def field_digests(self, names):
        """This rank's shard's per-step digests (the unlearners combine the ranks' in rank order). A
        store recorded before the store took digests has none: its shard of every step is decoded
        once and hashed instead (this rank's elements only, so a changed middle step still shows)."""
        digests = self.store.field_digests(names)
        if digests is not None:
            return digests
        return [(s.step, [tensors_sha256(s.tensors[n]) for n in names if n in s.tensors])
                for s in self.store.iter(names=list(names))]

    def iter(self, start=None, stop=None, names=None):  # refuses at the call, not at the first step
        """The recorded steps' lr and batch ids, without fields (names=[]): fields are served only
        by `stored` and `encoded`."""
        if names is None or list(names):
            raise ValueError("a rank's shard of a sharded history serves its fields shard-locally (stored, "
                             "encoded); to read whole steps, open the directory with ShardedHistory")
        return (StoredStep(step, lr, ids, {}, {}, lrs) for step, lr, lrs, ids in self._schedule
                if (start is None or step >= start) and (stop is None or step < stop))

    # ---- shard-local fields ---------------------------------------------------------------------

    def stored(self, step: int, name: str) -> ShardVector:
        """Field `name` of `step`: this rank's shard decoded (1/world of the step), as a StoredVector."""
        parts = self._agreed_read(step, name, lambda: self.store.read(step, [name]).tensors[name])
        return ShardVector(torch.cat([t.reshape(-1) for t in parts]), self.shard)

    def encoded(self, step: int, name: str) -> ShardField:
        """A plain field of `step` on this rank's codes (ShardField: dot, axpy_)."""
        return ShardField(self._agreed_read(step, name, lambda: self.store.encoded(step, name)), self.shard)

    def _agreed_read(self, step: int, name: str, read):
        """read()'s result on this rank, once every rank's read of the same field succeeded; else
        DistributedRefusal on every rank (class docstring). Collective: the ranks make the same reads in
        the same order (the unlearners run the same steps on every rank)."""
        got = []
        agree(lambda: got.append(read()) or (), shared=(), group=self.group,
              failed=f"could not read field {name!r} of step {step} from their history shard")
        return got[0]

    def close(self) -> None:
        self.store.close()
