"""Latency of PCMU's step-by-step request check (the path a request takes when the a-priori answer
does not cover it) against the length of the recorded history (T steps). Run as a script:

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_pcmu_check_steps.py --steps 1000 10000 100000

Workload: logistic regression on the digits (d = 650, 1,400 samples, b = 350: 4 batches per epoch),
PCMU analytic with tau/sigma large enough that every step holding the request passes the a-priori
test. The a-priori answer is switched off, so the step loop decides: it visits the steps that hold
the request's ids (one per epoch for one id) and answers from their smallest radii, without
gradients. TRAINED steps are trained and their records repeated (renumbered) up to T, as in
bench_ledger_request.py. Each request checks one id; median over --requests ids after one warm-up.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from unlearn_ext.evaluate.pcmu_examples import load
from unlearn_ext.pcmu import PCMUTrainer, request_check
from workloads import pcmu_with_long_history

TRAINED = 8


def _trainer() -> PCMUTrainer:
    x, y, _, _ = load("digits")
    torch.manual_seed(0)
    return PCMUTrainer(torch.nn.Linear(64, 10), torch.nn.functional.cross_entropy, (x, y), batch_size=350,
                       clip_norm=1.0, lr=0.05, tau=0.2, sigma=0.05, max_request=1, seed=0)


def _with_history(steps: int) -> PCMUTrainer:
    return pcmu_with_long_history(_trainer, TRAINED, steps)


def measure(steps: int, requests: int) -> dict:
    trainer = _with_history(steps)
    a_priori = request_check._a_priori_answer
    request_check._a_priori_answer = lambda *args: None  # the step loop decides
    try:
        seconds = []
        for i in range(requests + 1):
            began = time.perf_counter()
            check = trainer.check_request([i])
            elapsed = time.perf_counter() - began
            if check.first_divergent_step is not None or check.steps_checked_exactly:
                raise RuntimeError(f"request {i} needed more than the a-priori test: {check}")
            if i:
                seconds.append(elapsed)
    finally:
        request_check._a_priori_answer = a_priori
    return {"steps": steps, "median_ms": 1e3 * statistics.median(seconds), "max_ms": 1e3 * max(seconds),
            "steps_with_removed_ids": check.steps_with_removed_ids, "requests": requests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    flags = open("/proc/cpuinfo").read()
    for steps in args.steps:
        row = measure(steps, args.requests)
        row.update(label=args.label, cpu=cpu, threads=torch.get_num_threads(), avx2="avx2" in flags,
                   avx512="avx512f" in flags, code=__import__("unlearn_ext").__file__)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
