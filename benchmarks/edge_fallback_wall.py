"""Wall time of a history-method request that falls back, relative to retraining, same process.

The harness's CNN on digits images (plain SGD, lr 0.1: the run records eta * lambda_max >= 2, so
Mini-Unlearning and DeltaGrad with unstable="refuse" decide to fall back before any work). Each
repetition times, in turn, `ue.retrain` and each method's request on a fresh copy; the ratio is per
repetition (same process, same load), reported as the median and the range.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/edge_fallback_wall.py [--seed 0] [--ratio 0.05] [--repeats 5]
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch

import unlearn_ext as ue
from unlearn_ext.evaluate import datasets, harness
from unlearn_ext.mini.sharpness import recorded_edge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ratio", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ds = datasets.load("digits", form="grid")
    run = harness.train_run(ds, "cnn", args.seed)
    mini_store = ue.mini_store(run.original)
    ue.train_recording_anchors(copy.deepcopy(run.initial), run.data, run.config, mini_store)
    step_store = ue.step_store(run.original, params="int8", grads="int8")
    ue.train_recording_steps(copy.deepcopy(run.initial), run.data, run.config, step_store)
    forget = harness.forget_ids(run.data, args.ratio, args.seed)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {torch.get_num_threads()}")
    print(f"recorded eta*lambda_max: mini {recorded_edge(mini_store.run_info)[0]:.3f}, "
          f"deltagrad {recorded_edge(step_store.run_info)[0]:.3f}")
    ratios = {"mini": [], "deltagrad": []}
    for _ in range(args.repeats):
        began = time.perf_counter()
        ue.retrain(run.initial, run.data, run.config, forget)
        retrain_s = time.perf_counter() - began
        for name, make in (("mini", lambda: ue.MiniUnlearner(copy.deepcopy(run.original), run.data, mini_store)),
                           ("deltagrad", lambda: ue.DeltaGradUnlearner(copy.deepcopy(run.original), run.data,
                                                                       step_store))):
            unlearner = make()
            began = time.perf_counter()
            report = unlearner.unlearn(forget)
            seconds = time.perf_counter() - began
            assert report.status == "fallback", report.reason
            ratios[name].append((seconds / retrain_s, report.sample_gradients / report.retrain_sample_gradients))
    for name, values in ratios.items():
        wall = [w for w, _ in values]
        print(f"{name}: fallback wall / retrain wall median {statistics.median(wall):.3f} "
              f"(range {min(wall):.3f}-{max(wall):.3f}, {len(wall)} repeats); sample-gradients / retrain's "
              f"{values[0][1]:.3f}")


if __name__ == "__main__":
    main()
