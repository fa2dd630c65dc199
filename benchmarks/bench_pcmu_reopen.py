"""CPU time of what restoring a PCMU trainer's step records costs, against the history length T
(the ledger's reopen and rollback go through it). Run as a script, once per code tree to compare:

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_pcmu_reopen.py --steps 1000 10000 100000

Rows: `reindex_ms`, the rebuild of the trainer's per-step arrays from its records (`_reindex`, what
a rollback costs besides the state it restores); `load_ms`, `load_state_dict` of a state holding T
records (a reopen after the ledger read its files: records parsed, arrays rebuilt); `reopen_ms`,
opening a ledger directory holding T records (mostly torch.load of the record files; --reopen).
Workload: bench_ledger_request.py's (MLP 64-256-256-10, full batch, 4 trained steps' records
repeated up to T). Each figure is the median of --repeat runs in process CPU time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from bench_ledger_request import _trainer, _with_history
from unlearn_ext.ledger import DeletionLedger
from unlearn_ext.pcmu import PCMUUnlearner


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--reopen", action="store_true", help="also time one ledger reopen per T")
    parser.add_argument("--dir", default=None, help="where the ledger lives (default: the temp directory)")
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    code = os.path.dirname(os.path.abspath(__import__("unlearn_ext").__file__))
    for steps in args.steps:
        row = measure(steps, args.repeat, args.reopen, args.dir)
        row.update(label=args.label, code=code, threads=torch.get_num_threads(), load=os.getloadavg()[0])
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
