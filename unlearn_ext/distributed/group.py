"""The process group a distributed call runs on, and the agreement step that precedes its work.

Why `agree`: a collective waits for every rank. If one rank raised on its own (bad input, a NaN,
k out of range) the others would wait for it until the group's timeout. So every distributed entry
point first checks its input locally, then exchanges one small int64 vector per rank: whether the
rank accepted its input, and the values that must be equal everywhere (k, the key mode, seeds).
Every rank then raises the same error, or none does.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist

UINT64_RANGE = 1 << 64
# UTF-8 bytes of a refusing rank's error text that cross to the other ranks (longer texts are cut).
ERROR_TEXT_BYTES = 1024


class DistributedRefusal(ValueError):
    """A distributed call refused on every rank, because one rank's input was bad or the ranks'
    arguments differ; the message names the rank(s) and the problem."""


def require_group(group=None):
    """The group to run on (default: torch.distributed's default group); refuses when
    torch.distributed is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group "
                           "(backend 'gloo' on CPU, 'nccl' on GPU) on every rank first")
    return group if group is not None else dist.group.WORLD


def exchange_device(group) -> torch.device:
    """Where this group's collectives take their tensors: nccl needs CUDA tensors, gloo takes CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _as_int64(value: int) -> int:
    """Unsigned 64-bit values (seeds) stored in an int64 slot, two's complement."""
    return value - UINT64_RANGE if value >= (1 << 63) else value


def agree(check: Callable[[], Sequence[int]], shared: Sequence[str], local: Sequence[str] = (),
          group=None, failed: str = "refused the call") -> torch.Tensor:
    """Runs `check` on this rank: it validates the local input and returns len(shared) integers
    that every rank must hold equally (k, a key mode, seeds), then len(local) per-rank integers (an
    element count). Gathers every rank's answer; returns the values, one row per rank, in the
    group's rank order. (With no values to gather, the first exchange is one count of the ranks
    that refused: `_any_refused`.)

    Raises DistributedRefusal on every rank when a rank's check raised, naming each such rank and
    its error ("rank(s) [1] <failed>: rank 1: <error>"), or when the shared values differ between
    ranks. The error texts cross in a second exchange, made only when some rank failed (every rank
    then knows it from the first): a fixed-size tensor of each rank's text (`_every_ranks_text`),
    on the group's device like the first, so no rank pickles objects or needs more than the
    group's own device set up (nccl: the current CUDA device)."""
    group = require_group(group)
    width = len(shared) + len(local)
    error = None
    try:
        values = [int(v) for v in check()]
        if len(values) != width:
            raise RuntimeError(f"internal: the check returned {len(values)} values for {width} names")
        row = torch.tensor([1] + [_as_int64(v) for v in values], dtype=torch.int64)  # 1: accepted
    except Exception as exc:  # reported to every rank below, then raised everywhere
        error, row = exc, torch.zeros(1 + width, dtype=torch.int64)
    if width:
        rows = every_ranks_row(row, group)
        refused = [r for r, accepted in enumerate(rows[:, 0].tolist()) if not accepted]
    else:  # acceptance alone: a count of refusing ranks (the texts then say which)
        rows, refused = torch.zeros(dist.get_world_size(group), 1, dtype=torch.int64), _any_refused(error, group)
    if refused:
        errors = _every_ranks_text(None if error is None else _error_text(error), group)
        if width == 0:
            refused = [r for r, text in enumerate(errors) if text is not None]
        if isinstance(error, DistributedRefusal) and len(refused) == len(errors) and len(set(errors)) == 1:
            raise error  # an agreement inside this check already refused on every rank, alike: pass it on
        named = "; ".join(f"rank {r}: {errors[r]}" for r in refused)
        raise DistributedRefusal(f"rank(s) {refused} {failed}: {named}") from error
    for j, name in enumerate(shared):
        column = rows[:, 1 + j]
        if not bool((column == column[0]).all()):
            raise DistributedRefusal(f"the ranks disagree on {name}: {column.tolist()} (rank order); every rank "
                                     "must pass the same value")
    return rows[:, 1:]


def _any_refused(error: BaseException | None, group) -> bool:
    """Whether some rank refused: one all_reduce of a single int64, the count of refusing ranks.
    Cheaper than a row per rank for an agreement with no values, which the loop guard makes at
    every optimizer step under DDP: 116-133 us against 182-206 us on 2 gloo ranks of one
    machine (benchmarks/agree_exchange.py, benchmarks/RESULTS.md)."""
    count = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=exchange_device(group))
    dist.all_reduce(count, group=group)
    return bool(count.item())


def _error_text(error: BaseException) -> str:
    """'<type name>: <message>' of an exception, for the other ranks. Never raises: an exception
    whose own __str__ raises is '<type name>: <unprintable>' (a rank raising here would be missing
    from the text exchange, leaving the other ranks waiting in it)."""
    try:
        message = str(error)
    except Exception:
        message = "<unprintable>"
    return f"{type(error).__name__}: {message}"


def every_ranks_row(row: torch.Tensor, group) -> torch.Tensor:
    """Every rank's row, in rank order: each rank writes its row into its own slot of a zero matrix
    and the ranks' matrices are summed (exact in int64). One all_reduce costs less than gloo's
    all_gather of the same rows (about 180 against 300 us on 2 ranks of one machine), and a shard
    read agrees once per field read (shard_local.py)."""
    rows = torch.zeros(dist.get_world_size(group), row.numel(), dtype=torch.int64, device=exchange_device(group))
    rows[dist.get_rank(group)] = row
    dist.all_reduce(rows, group=group)
    return rows.cpu()


def _every_ranks_text(text: str | None, group) -> list:
    """Every rank's text (None for a rank with none), in rank order, through one fixed-size int64
    row per rank (every_ranks_row): its length in UTF-8 bytes (-1 for None), then the bytes, cut
    at ERROR_TEXT_BYTES on a character boundary ("..." marks a cut); what UTF-8 cannot encode (a lone
    surrogate) crosses escaped, as \\udcff."""
    row = torch.zeros(1 + ERROR_TEXT_BYTES, dtype=torch.int64)
    if text is None:
        row[0] = -1
    else:
        # (backslashreplace: a lone surrogate, as a non-UTF-8 file name decodes to, has no UTF-8 bytes;
        # a rank raising here would leave the others waiting in the exchange below)
        data = text.encode("utf-8", "backslashreplace")
        if len(data) > ERROR_TEXT_BYTES:
            data = data[:ERROR_TEXT_BYTES - 3].decode(errors="ignore").encode() + b"..."
        row[0] = len(data)
        row[1:1 + len(data)] = torch.tensor(list(data), dtype=torch.int64)
    texts = []
    for r in every_ranks_row(row, group):
        n = int(r[0])
        texts.append(None if n < 0 else bytes(r[1:1 + n].tolist()).decode())
    return texts


def broadcast_values(values: torch.Tensor | None, numel: int, dtype: torch.dtype, src: int, group) -> torch.Tensor:
    """Rank `src`'s flat tensor of `numel` elements of `dtype` (the other ranks pass None; every
    rank must already know `numel`, e.g. from an agreement), on every rank, on the CPU. One tensor
    broadcast on the group's device: no object is pickled and nothing but the group's own device
    needs setting up (nccl: the current CUDA device). `src` is a global rank, as dist.broadcast's."""
    device = exchange_device(group)
    if dist.get_rank() == src:
        if values.dtype != dtype or values.numel() != numel:
            raise RuntimeError(f"internal: broadcasting {values.numel()} {values.dtype} for {numel} {dtype}")
        buffer = values.reshape(-1).to(device)
    else:
        buffer = torch.empty(numel, dtype=dtype, device=device)
    dist.broadcast(buffer, src=src, group=group)
    return buffer.cpu()


def sum_in_rank_order(flat: torch.Tensor, group) -> torch.Tensor:
    """sum over ranks r = 0, 1, ... of each rank's vector, added in that order, on every rank. An
    all-reduce adds in the backend's own order; gathering first and adding in rank order makes every
    rank's result the same bits (so replicated computations that follow stay identical)."""
    device = exchange_device(group)
    parts = [torch.empty_like(flat, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, flat.to(device), group=group)
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total.to(flat.device)
