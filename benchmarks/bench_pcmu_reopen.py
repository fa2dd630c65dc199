"""CPU time of what restoring a PCMU trainer's step records costs, against the history length T
(the ledger's reopen and rollback go through it). Run as a script, once per code tree to compare:

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_pcmu_reopen.py --steps 1000 10000 100000

Rows: `reindex_ms`, the rebuild of the trainer's per-step arrays from its records (`_reindex`, what
a rollback costs besides the state it restores); `load_ms`, `load_state_dict` of a state holding T
records (a reopen after the ledger read its files: records parsed, arrays rebuilt); `reopen_ms`,
opening a ledger directory holding T records (mostly torch.load of the record files; --reopen).
Workload: bench_ledger_request.py's (MLP 64-256-256-10, full batch, 4 trained steps' records
repeated up to T). Each figure is the median of --repeat runs in process CPU time.

--history DIR: the records in a disk history store instead (PCMUTrainer(history=...), a file of T
records written under DIR, every record its own). Each of --repeat fresh processes then reopens a
trainer over the file and answers one certified request (PCMUUnlearner.unlearn of one id); rows:
`store_reopen_ms` (CPU; wall apart) and its two parts: `store_open_ms` (opening the store: the
index of its records' headers) and `pcmu_restore_ms` (building the trainer over the open store:
PCMU's own restore of the steps and the weights), `request_ms` (CPU), `request_peak_MiB` (tracemalloc's peak
of Python and torch CPU allocations during the request), and the process's peak RSS (ru_maxrss)
after the reopen and after the request (`reopen_maxrss_MiB`, `maxrss_MiB`: what a restarted
process holds, the records included where they are held in memory). Medians over the processes.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc

import torch

from bench_ledger_request import _trainer, _with_history
from unlearn_ext.history.store import HistoryStore
from unlearn_ext.ledger import DeletionLedger
from unlearn_ext.pcmu import PCMUUnlearner
from unlearn_ext.pcmu.history import fields


def _cpu_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        began = time.process_time()
        fn()
        times.append(time.process_time() - began)
    return 1e3 * statistics.median(times)


def measure(steps: int, repeat: int, reopen: bool, where: str | None) -> dict:
    trainer = _with_history(steps)
    state = trainer.state_dict()
    fresh = _trainer()
    row = {"steps": steps, "reindex_ms": _cpu_ms(trainer._reindex, repeat),
           "load_ms": _cpu_ms(lambda: fresh.load_state_dict(state), repeat)}
    if reopen:
        with tempfile.TemporaryDirectory(dir=where) as directory:
            DeletionLedger(PCMUUnlearner(trainer), directory).close()
            row["reopen_ms"] = _cpu_ms(lambda: DeletionLedger(PCMUUnlearner(_trainer()), directory).close(), 1)
    return row


def reopen_and_request(path: str) -> dict:
    """In a fresh process: reopen a trainer over the store at `path`, then one certified request.
    Two parts of the reopen: opening the store (its index: every record's header) and building the
    trainer over the open store (PCMU's restore)."""
    began, cpu_began = time.perf_counter(), time.process_time()
    store = HistoryStore.open(path, expect=fields(2 + 2 + 2))  # the MLP's three Linear layers
    store_open = time.process_time() - cpu_began
    cpu_began = time.process_time()
    trainer = _trainer(history=store)
    pcmu = time.process_time() - cpu_began
    reopen = (time.perf_counter() - began, store_open + pcmu)
    reopen_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    cpu_began = time.process_time()
    report = PCMUUnlearner(trainer).unlearn([1])
    request = time.process_time() - cpu_began
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    if report.how != "a-priori (m*)":
        raise RuntimeError(f"the request was not certified a priori: {report}")
    trainer.close()
    return {"store_open_ms": 1e3 * store_open, "pcmu_restore_ms": 1e3 * pcmu, "store_reopen_ms": 1e3 * reopen[1], "store_reopen_wall_ms": 1e3 * reopen[0], "request_ms": 1e3 * request,
            "request_peak_MiB": peak / 2**20, "reopen_maxrss_MiB": reopen_rss / 1024,
            "maxrss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure_store(steps: int, repeat: int, where: str) -> dict:
    with tempfile.TemporaryDirectory(dir=where) as directory:
        path = os.path.join(directory, "pcmu.hist")
        _with_history(steps, history=path).close()
        runs = []
        for _ in range(repeat):
            child = subprocess.run([sys.executable, __file__, "--child", path], capture_output=True, text=True,
                                   check=True)
            runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
        size = os.path.getsize(path)
    row = {"steps": steps, "store_bytes": size}
    row.update({key: statistics.median(run[key] for run in runs) for key in runs[0]})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--reopen", action="store_true", help="also time one ledger reopen per T")
    parser.add_argument("--dir", default=None, help="where the ledger lives (default: the temp directory)")
    parser.add_argument("--history", metavar="DIR", default=None,
                        help="the records in a disk history store written under DIR; reopen and request timed "
                             "in fresh processes")
    parser.add_argument("--child", metavar="PATH", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(reopen_and_request(args.child)), flush=True)
        return
    code = os.path.dirname(os.path.abspath(__import__("unlearn_ext").__file__))
    for steps in args.steps:
        row = (measure_store(steps, args.repeat, args.history) if args.history
               else measure(steps, args.repeat, args.reopen, args.dir))
        row.update(label=args.label, code=code, threads=torch.get_num_threads(), load=os.getloadavg()[0])
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
