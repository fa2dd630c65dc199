"""CPU time of one PCMU deletion request certified a priori, without the ledger (no I/O), under a
schedule of several batches per epoch, against the history length. Run once per code tree to compare:

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_pcmu_certified_request.py --steps 10000 100000

Rows: `request_ms`, the median process CPU time of `PCMUUnlearner.unlearn([id])` over --requests
requests of one new id each (after one warm-up); `step_counts_ms`, one
`schedule.step_counts(rows of one id, 0, T)` (the search for the steps holding the id, one per
epoch). Workload: bench_ledger_request.py's (MLP 64-256-256-10, 4,000 samples, 4 trained steps'
records repeated up to T) at --batch-size (default 400: 10 batches per epoch).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from bench_ledger_request import _with_history
from unlearn_ext.pcmu import PCMUUnlearner


def _cpu_ms(fn) -> float:
    began = time.process_time()
    fn()
    return 1e3 * (time.process_time() - began)


def measure(steps: int, requests: int, batch_size: int) -> dict:
    trainer = _with_history(steps, batch_size)
    unlearner = PCMUUnlearner(trainer)
    rows = trainer.rows(torch.tensor([requests + 1]))
    counts_ms = statistics.median(_cpu_ms(lambda: trainer.schedule.step_counts(rows, 0, steps)) for _ in range(15))
    times = []
    for i in range(1, requests + 2):
        report = None

        def request():
            nonlocal report
            report = unlearner.unlearn([i])
        elapsed = _cpu_ms(request)
        if report.how != "a-priori (m*)":
            raise RuntimeError(f"request {i} was not certified a priori: {report}")
        if i > 1:
            times.append(elapsed)
    return {"steps": steps, "batch_size": batch_size, "epochs": steps * batch_size // 4000,
            "request_ms": statistics.median(times), "step_counts_ms": counts_ms, "requests": requests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10000, 100000])
    parser.add_argument("--requests", type=int, default=21)
    parser.add_argument("--batch-size", type=int, default=400)
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    code = os.path.dirname(os.path.abspath(__import__("unlearn_ext").__file__))
    for steps in args.steps:
        row = measure(steps, args.requests, args.batch_size)
        row.update(label=args.label, code=code, threads=torch.get_num_threads(), load=os.getloadavg()[0])
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
