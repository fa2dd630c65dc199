"""PCMU's step records in a disk history store against the in-memory StepLog: bytes per step and
training step time, in one run. Run as a script:

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_pcmu_history.py --steps 64 --batch-size 256

Workload: bench_ledger_request's (the benchmark MLP 64-256-256-10, 85k parameters, 4,000 synthetic
samples, PCMU analytic), at --batch-size, with its tau, sigma, max_request or those given (a smaller
tau/sigma and a larger max_request make more coordinates fragile: larger records). Two trainers of the same configuration train side by
side, one step each in turn (so the machine's load falls on both alike): one keeps its records in
memory (the default), the other writes each step to a disk store in --dir (fsync'd every 50
records, as the store does). Per step: wall time and the process's CPU time (which leaves out
waiting for the disk's fsync); medians over --steps steps after --warmup steps. Bytes: what the
records hold in memory (record_bytes), and the store's file size (records, their JSON headers and
frames) and payload (step 0's also holds the initial weights, reported apart). The two runs' records and weights are compared bit for bit at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch

from bench_ledger_request import _trainer


def _timed_step(trainer) -> tuple[float, float]:
    began, cpu_began = time.perf_counter(), time.process_time()
    trainer.train(steps=1)
    return time.perf_counter() - began, time.process_time() - cpu_began


def measure(steps: int, warmup: int, batch_size: int, where: str | None, **pcmu) -> dict:
    with tempfile.TemporaryDirectory(dir=where) as directory:
        path = os.path.join(directory, "pcmu.hist")
        memory, stored = _trainer(batch_size, **pcmu), _trainer(batch_size, history=path, **pcmu)
        times = {"memory": [], "store": []}
        for i in range(warmup + steps):
            for name, trainer in (("memory", memory), ("store", stored)) if i % 2 else (("store", stored),
                                                                                          ("memory", memory)):
                t = _timed_step(trainer)
                if i >= warmup:
                    times[name].append(t)
        same = (all(torch.equal(a.codes, b.codes) and a.to_record()[1] == b.to_record()[1]
                    for a, b in zip(memory.records, stored.records))
                and all(torch.equal(p, q) for p, q in zip(memory.params, stored.params)))
        payload = stored.history.nbytes
        initial = 4 * stored.coordinates  # step 0 also holds the initial weights (float32)
        stored.close()
        file_bytes = os.path.getsize(path)
    done = warmup + steps
    held = memory.record_bytes()
    row = {"steps": done, "batch_size": batch_size, "same_records_and_weights": same,
           "memory_bytes_per_step": held["total"] / done, "store_file_bytes_per_step": file_bytes / done,
           "store_payload_bytes_per_step": payload / done, "store_initial_weights_bytes": initial,
           "store_payload_bytes_per_step_without_initial": (payload - initial) / done,
           "fragile_coordinates_per_step": held["fragile_coordinates"] / done, "layouts": held["layouts"]}
    for name, pairs in times.items():
        row[f"{name}_step_ms"] = 1e3 * statistics.median(w for w, _ in pairs)
        row[f"{name}_step_cpu_ms"] = 1e3 * statistics.median(c for _, c in pairs)
    row["store_over_memory_wall"] = row["store_step_ms"] / row["memory_step_ms"]
    row["store_over_memory_cpu"] = row["store_step_cpu_ms"] / row["memory_step_cpu_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dir", default=None, help="where the store is written (default: the system's temp "
                        "directory); a tmpfs such as /dev/shm shows the cost without the disk's fsync")
    parser.add_argument("--tau", type=float, default=None)
    parser.add_argument("--sigma", type=float, default=None)
    parser.add_argument("--max-request", type=int, default=None)
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    pcmu = {k: v for k, v in (("tau", args.tau), ("sigma", args.sigma), ("max_request", args.max_request))
            if v is not None}
    row = measure(args.steps, args.warmup, args.batch_size, args.dir, **pcmu)
    row["settings"] = pcmu
    row.update(label=args.label, dir=args.dir or tempfile.gettempdir(), cpu=cpu, threads=torch.get_num_threads(),
               avx2="avx2" in open("/proc/cpuinfo").read(), avx512="avx512f" in open("/proc/cpuinfo").read(),
               load=os.getloadavg())
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
