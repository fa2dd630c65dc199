"""DeltaGrad against retraining on a run wrapped from the user's own loop, before and after a change,
on one machine. Run as a script (from the repository root):

    OMP_NUM_THREADS=1 python benchmarks/bench_deltagrad_user_loop.py --checkout before=/work/main --checkout after=.

Workload: what a user brings, through `UnlearningEngine.make_unlearnable(..., method="deltagrad")`:
digits as 1x8x8 images in a map-style Dataset, their DataLoader(batch_size=64, shuffle=True), the
model nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)), their
nn.CrossEntropyLoss() (mean reduction) and torch.optim.SGD(lr=0.01, momentum=0.9, weight_decay=1e-4),
30 epochs of their own loop. The request forgets a seeded 10% of the training set with DeltaGrad's
defaults; retraining is the library's retraining of the same recipe through the same Dataset
(`unlearn_ext.data.retrain`, what DeltaGrad's answer is judged against).

Each checkout runs in its own processes (PYTHONPATH set to it), alternated --processes times so
that both see the same machine load; each process trains once, then times --rounds rounds of
retraining and the DeltaGrad request back to back (the first round is a warm-up, left out), in
process CPU time (less moved by other work on a shared machine) and wall time. Reported per
checkout: the median per-round DeltaGrad / retraining ratio, the median times, and whether the
replay's working copy took the Linear-chain gradient (mini/layer_chain.py); across checkouts the
ratio of their median DeltaGrad CPU times. The request's status and d/d0 against retraining say
that both answer the same request.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

EPOCHS, BATCH, FORGET_FRACTION = 30, 64, 0.1


def _worker(rounds: int) -> dict:
    import torch
    from torch import nn

    import unlearn_ext as ue
    from unlearn_ext.data import retrain
    from unlearn_ext.evaluate.datasets import load
    from unlearn_ext.mini.replay_model import ReplayModel
    from unlearn_ext.mini.vectors import FlatModel

    torch.set_num_threads(1)
    ds = load("digits", form="grid")

    class Digits(torch.utils.data.Dataset):  # the user's map-style dataset
        def __len__(self):
            return len(ds.y)

        def __getitem__(self, i):
            return ds.x[i], ds.y[i]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    loader = torch.utils.data.DataLoader(Digits(), batch_size=BATCH, shuffle=True)
    loss_fn = nn.CrossEntropyLoss()
    engine = ue.UnlearningEngine()
    model, optimizer, loader = engine.make_unlearnable(model, optimizer, loader, method="deltagrad", epochs=EPOCHS,
                                                       loss_fn=loss_fn)
    for _ in range(EPOCHS):  # the user's loop
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
    unlearner = engine.unlearner()
    trained_state = unlearner.state_dict()
    data = engine.data
    forget = data.ids[torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:int(len(data) * FORGET_FRACTION)]]
    chain = ReplayModel(FlatModel(model, data)).chain is not None

    times = {"retrain": [], "deltagrad": []}
    cpu = {"retrain": [], "deltagrad": []}
    made = {}

    def retraining():
        made["retrained"] = retrain(engine.initial, data, engine.recipe, forget)

    def deltagrad():
        made["report"] = unlearner.unlearn(forget)

    for _ in range(rounds + 1):
        unlearner.load_state_dict(trained_state)  # every round answers the same request on the trained run
        for key, fn in (("retrain", retraining), ("deltagrad", deltagrad)):
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            times[key].append(time.perf_counter() - start)
            cpu[key].append(time.process_time() - start_cpu)
    wr = FlatModel(made["retrained"], data).flat()
    w0 = FlatModel(engine.trained, data).flat()
    d = float((FlatModel(model, data).flat() - wr).norm() / (w0 - wr).norm())
    report = made["report"]
    return {"chain": chain, "status": report.status, "reason": report.reason, "d_over_d0": d,
            "cost_vs_retrain": report.cost_vs_retrain,
            "cpu_ratio": [a / b for a, b in zip(cpu["deltagrad"][1:], cpu["retrain"][1:])],
            "deltagrad_cpu_s": cpu["deltagrad"][1:], "retrain_cpu_s": cpu["retrain"][1:],
            "deltagrad_wall_s": times["deltagrad"][1:], "retrain_wall_s": times["retrain"][1:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkout", action="append", default=[],
                        help="name=path of a checkout to time (give two or more); default: this one as 'this'")
    parser.add_argument("--processes", type=int, default=3, help="processes per checkout, alternated")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per process (after one warm-up)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.rounds)))
        return
    checkouts = [c.split("=", 1) for c in args.checkout] or [["this", "."]]
    if any(len(c) != 2 for c in checkouts):
        parser.error("--checkout takes name=path")
    runs = {name: [] for name, _ in checkouts}
    for _ in range(args.processes):
        for name, path in checkouts:
            env = {**os.environ, "PYTHONPATH": os.path.abspath(path), "OMP_NUM_THREADS": "1"}
            out = subprocess.run([sys.executable, __file__, "--worker", "--rounds", str(args.rounds)], env=env,
                                 check=True, capture_output=True, text=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
    summary = {"cpu": platform.processor() or platform.machine(), "load_average": os.getloadavg(),
               "torch_threads": 1, "processes": args.processes, "rounds": args.rounds}
    for name, results in runs.items():
        def pooled(key):
            return statistics.median(v for r in results for v in r[key])
        summary[name] = {"chain": [r["chain"] for r in results], "status": [r["status"] for r in results],
                         "d_over_d0": [round(r["d_over_d0"], 9) for r in results],
                         "cost_vs_retrain": results[0]["cost_vs_retrain"],
                         "cpu_ratio_median": pooled("cpu_ratio"),
                         "cpu_ratio_range": [min(v for r in results for v in r["cpu_ratio"]),
                                             max(v for r in results for v in r["cpu_ratio"])],
                         "deltagrad_cpu_s_median": pooled("deltagrad_cpu_s"),
                         "retrain_cpu_s_median": pooled("retrain_cpu_s"),
                         "deltagrad_wall_s_median": pooled("deltagrad_wall_s"),
                         "retrain_wall_s_median": pooled("retrain_wall_s")}
    names = list(runs)
    for name in names[1:]:
        summary[f"{name}_vs_{names[0]}_deltagrad_cpu"] = (summary[name]["deltagrad_cpu_s_median"]
                                                           / summary[names[0]]["deltagrad_cpu_s_median"])
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
