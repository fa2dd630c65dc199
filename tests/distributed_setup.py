"""Launching a test's ranks: `launch(worker, world_size, timeout_s, *args)` starts world_size
processes (torch.multiprocessing, spawn) that join one gloo group through a FileStore in a
temporary directory, runs `worker(rank, world_size, *args)` on each, and returns their return
values in rank order. Bounded in time: the group's own timeout makes a stuck collective raise,
and a process still alive at the deadline is killed and the test fails, naming it.

A worker's exception fails the test with the rank and the traceback. Workers must be module-level
functions (spawn pickles them by name). `watch_collectives()` in a worker makes object collectives
raise there and lists the device of every all_reduce and broadcast."""
from __future__ import annotations

import datetime
import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unlearn_ext.distributed.group import exchange_device

GROUP_TIMEOUT_S = 20  # a collective that waits longer raises (gloo's timeout)


def _entry(rank: int, world: int, store_dir: str, out_dir: str, worker, args) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        store = dist.FileStore(os.path.join(store_dir, "store"), world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
        try:
            result = worker(rank, world, *args)
        finally:
            dist.destroy_process_group()
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # reported to the parent, which fails the test with it
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise SystemExit(1)


def launch(worker, world: int, timeout_s: float, *args, may_die: tuple = ()) -> list:
    """`may_die`: ranks that a test kills on purpose; their result is None."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as store_dir, tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_entry, args=(r, world, store_dir, out_dir, worker, args)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
        for p in procs:
            p.join(max(0.0, (deadline - datetime.datetime.now()).total_seconds()))
        stuck = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in stuck:
            procs[r].kill()
            procs[r].join()
        if stuck:
            raise AssertionError(f"rank(s) {stuck} still running after {timeout_s} s: killed")
        results = []
        for r in range(world):
            path = os.path.join(out_dir, f"rank{r}.pt")
            if r in may_die and not os.path.exists(path):
                results.append(None)
                continue
            if not os.path.exists(path):
                raise AssertionError(f"rank {r} exited with code {procs[r].exitcode} and no result")
            got = torch.load(path, weights_only=False)
            if not got["ok"]:
                raise AssertionError(f"rank {r} raised:\n{got['error']}")
            results.append(got["result"])
        return results


def watch_collectives() -> list:
    """From now on in this process: object collectives raise, and every all_reduce's and
    broadcast's tensor device is listed (returned) next to the group's exchange device."""
    seen = []

    def refuse(*args, **kwargs):
        raise AssertionError("an object collective was used (it pickles, and with nccl needs a CUDA device set)")

    def recorded(collective):
        def recording(tensor, *args, group=None, **kwargs):
            seen.append((str(tensor.device), str(exchange_device(group or dist.group.WORLD))))
            return collective(tensor, *args, group=group, **kwargs)
        return recording
    for name in ("all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list"):
        setattr(dist, name, refuse)
    dist.all_reduce, dist.broadcast = recorded(dist.all_reduce), recorded(dist.broadcast)
    return seen
