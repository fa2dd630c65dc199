"""Latency and peak memory of a deletion request that PCMU certifies a priori, behind the ledger,
against the length of the recorded history (T steps). Run as a script:

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_ledger_request.py --steps 1000 10000 100000

Workload: the benchmark MLP 64-256-256-10 (85k parameters), 4,000 synthetic samples, full batch
(b = 4,000), PCMU analytic with tau/sigma large enough that every request of one id is certified a
priori. Training 100k full-batch steps is out of reach here, so TRAINED steps are trained and their
records repeated (renumbered, tensors shared) up to T: the request path reads only the per-step
radii and the record count, never a record's values, and storage is shared, so the figures for the
code that serializes every record understate its cost. --prior N commits N requests first (id 0,
then repeats of it: 'already-forgotten', recorded all the same), for the cost against the number of
requests the ledger already holds. Each measured request forgets one new id; the
figure is the median over --requests requests after one warm-up (reported apart as first_ms: the first
request after opening the ledger, which builds what later ones reuse), in wall time and in the
process's CPU time (which a loaded machine disturbs less, and which leaves out waiting for the
disk). A committed request costs at least the fsync durability needs (one journal append when only
small parts change; two more per part file written): --dir /dev/shm (tmpfs, where fsync is free)
shows the rest. Peak memory: the rise of the
process's peak RSS (VmHWM, reset before each request) above its RSS before the request.
Bytes per recorded step, of the TRAINED real (unshared) records: what they hold in memory
(`record_bytes`) and what `torch.save` writes for them (a ledger's record files hold the same).
--history: the trainer records into a disk history store (PCMUTrainer(history=...), in the same
directory as the ledger; every one of the T records written to it), which the ledger commits by
reference (the store's length and digest) instead of record files; the row says history_store.
ledger_bytes and store_bytes: what the ledger directory and the store file hold at the end;
restart_ms: building the trainer again and reopening the ledger over those files (wall, CPU).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tempfile
import time

import torch

from unlearn_ext.ledger import DeletionLedger
from unlearn_ext.pcmu import PCMUTrainer, PCMUUnlearner
from workloads import pcmu_with_long_history

TRAINED = 4
N, B = 4000, 4000


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh(),
                               torch.nn.Linear(256, 10))


def _trainer(batch_size: int = B, history=None, **pcmu):
    """The workload's trainer; `pcmu`: other PCMU settings (tau, sigma, max_request...)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 64, generator=g), torch.randint(0, 10, (N,), generator=g)
    settings = {**dict(clip_norm=1.0, lr=0.01, tau=0.5, sigma=0.2, max_request=1), **pcmu}
    return PCMUTrainer(_mlp(), torch.nn.functional.cross_entropy, (x, y), batch_size=batch_size, history=history,
                       **settings)


def _with_history(steps: int, batch_size: int = B, history=None) -> PCMUTrainer:
    return pcmu_with_long_history(lambda: _trainer(batch_size), TRAINED, steps,
                                  make_fresh=lambda: _trainer(batch_size, history))


def bytes_per_step() -> dict:
    trainer = _trainer().train(steps=TRAINED)
    buf = io.BytesIO()
    torch.save([r.to_state() for r in trainer.records], buf)
    return {"held_bytes_per_step": trainer.record_bytes()["mean_per_step"],
            "saved_bytes_per_step": len(buf.getvalue()) / TRAINED}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(steps: int, requests: int, where: str | None, prior: int = 0, batch_size: int = B,
            history: bool = False) -> dict:
    with tempfile.TemporaryDirectory(dir=where) as directory:
        trainer = _with_history(steps, batch_size, os.path.join(directory, "pcmu.hist") if history else None)
        ledger = DeletionLedger(PCMUUnlearner(trainer), os.path.join(directory, "ledger"))
        for _ in range(prior):
            ledger.forget([0])
        seconds, cpu_seconds, peaks = [], [], []
        for i in range(1, requests + 2):
            can_reset = _reset_peak()
            rss = _rss_kib("VmRSS")
            began, cpu_began = time.perf_counter(), time.process_time()
            report = ledger.forget([i])
            elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu_began
            if report.how != "a-priori (m*)":
                raise RuntimeError(f"request {i} was not certified a priori: {report}")
            if i == 1:  # the warm-up: also what a first request after opening the ledger costs
                first = (elapsed, cpu)
            else:
                seconds.append(elapsed)
                cpu_seconds.append(cpu)
                if can_reset:
                    peaks.append(_rss_kib("VmHWM") - rss)
        ledger.close()
        trainer.close()
        # A restart: the same trainer built again (over the store, which restores its records) and
        # the ledger reopened over it (which loads the committed state: record files or the mark).
        began, cpu_began = time.perf_counter(), time.process_time()
        trainer = _trainer(batch_size, os.path.join(directory, "pcmu.hist") if history else None)
        ledger = DeletionLedger(PCMUUnlearner(trainer), os.path.join(directory, "ledger"))
        restart = (time.perf_counter() - began, time.process_time() - cpu_began)
        if trainer.steps_done != steps:
            raise RuntimeError(f"the restarted trainer holds {trainer.steps_done} steps, not {steps}")
        ledger.close()
        trainer.close()
        on_disk = {name: sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(
            os.path.join(directory, name)) for f in files) if os.path.isdir(os.path.join(directory, name))
            else os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory)}
    return {"history_store": history, "steps": steps, "ledger_bytes": on_disk.get("ledger"),
            "store_bytes": on_disk.get("pcmu.hist"), "median_ms": 1e3 * statistics.median(seconds), "max_ms": 1e3 * max(seconds),
            "cpu_median_ms": 1e3 * statistics.median(cpu_seconds),
            "first_ms": 1e3 * first[0], "first_cpu_ms": 1e3 * first[1],
            "restart_ms": 1e3 * restart[0], "restart_cpu_ms": 1e3 * restart[1],
            "peak_rise_MiB": max(peaks) / 1024 if peaks else None, "requests": requests, "prior": prior,
            "batch_size": batch_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--prior", type=int, nargs="+", default=[0],
                        help="requests committed before the measured ones (one row per value)")
    parser.add_argument("--batch-size", type=int, default=B, help=f"PCMU's batch (default {B}: the full batch, "
                        "one step per epoch; smaller: several, and a request's ids are in one batch per epoch)")
    parser.add_argument("--history", action="store_true", help="the trainer records into a disk history "
                        "store beside the ledger (committed by reference)")
    parser.add_argument("--label", default="")
    parser.add_argument("--dir", default=None, help="where the ledger lives (default: the system's temp "
                        "directory); a tmpfs such as /dev/shm shows the cost without the disk's fsync")
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    per_step = bytes_per_step()
    for steps, prior in ((s, p) for s in args.steps for p in args.prior):
        row = {**measure(steps, args.requests, args.dir, prior, args.batch_size, args.history), **per_step}
        row.update(label=args.label, dir=args.dir or tempfile.gettempdir(), cpu=cpu, threads=torch.get_num_threads(),
                   avx2="avx2" in open("/proc/cpuinfo").read(), avx512="avx512f" in open("/proc/cpuinfo").read(),
                   code=os.path.dirname(os.path.abspath(__import__("unlearn_ext").__file__)))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
