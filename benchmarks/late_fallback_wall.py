"""Wall time and sample-gradients of DeltaGrad requests whose fallback fires after the replay began,
relative to retraining, same process.

The harness's transformer on the token task (`unlearn-ext eval --data tokens --model transformer
--limit 300`: plain SGD, 20 epochs, batch 32, lr 0.1; 200 recorded steps, int8 history): its run
records eta * lambda_max below 2, so no request is decided before work, and some requests fall back
during the replay (the stability check at a quasi-Newton step, or the retained-loss check at the
end). Each repetition times, in turn, `ue.retrain` and the request on a fresh copy; the ratio is per
repetition (same process, same load), reported as the median and the range.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/late_fallback_wall.py [--cases 0:0.01,1:0.05,2:0.1] [--repeats 5]
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch

import unlearn_ext as ue
from unlearn_ext.evaluate import datasets, harness, models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="0:0.01,1:0.05,2:0.1", help="seed:ratio pairs")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ds = datasets.load("tokens", form=models.reads("transformer"), limit=300)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {torch.get_num_threads()}")
    for case in args.cases.split(","):
        seed, ratio = int(case.split(":")[0]), float(case.split(":")[1])
        run = harness.train_run(ds, "transformer", seed)
        store = ue.step_store(run.original, params="int8", grads="int8")  # as the harness's deltagrad
        ue.train_recording_steps(copy.deepcopy(run.initial), run.data, run.config, store)
        forget = harness.forget_ids(run.data, ratio, seed)
        walls, costs, reason = [], set(), ""
        for _ in range(args.repeats):
            began = time.perf_counter()
            ue.retrain(run.initial, run.data, run.config, forget)
            retrain_s = time.perf_counter() - began
            unlearner = ue.DeltaGradUnlearner(copy.deepcopy(run.original), run.data, store)
            began = time.perf_counter()
            report = unlearner.unlearn(forget)
            walls.append((time.perf_counter() - began) / retrain_s)
            costs.add(round(report.sample_gradients / report.retrain_sample_gradients, 4))
            reason = f"{report.status}: {report.reason[:110]}"
        print(f"seed {seed}, ratio {ratio}: {reason}")
        print(f"  request wall / retrain wall median {statistics.median(walls):.3f} (range {min(walls):.3f}-"
              f"{max(walls):.3f}, {len(walls)} repeats); sample-gradients / retrain's {sorted(costs)}")


if __name__ == "__main__":
    main()
