"""How often the per-request check answers `undecided` on single-id requests, and whether its
answers agree with coupled retraining (DESIGN section 4). Used for issue 14 part 5's before/after.

  python scripts/pcmu_undecided.py --model linear|mlp --requests 100 [--retrain]

linear: the digits example (pcmu/examples.py: logistic regression, b = 350, 6 epochs);
mlp:    the same data and settings with a 64-64-10 tanh MLP.
With --retrain every request is also retrained without its id and compared step by step:
a certified request must give bit-identical parameters, a divergent one must first differ at the
step the check names.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from unlearn_ext.pcmu import PCMUTrainer
from unlearn_ext.pcmu.examples import SETTINGS, load


def model(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "linear":
        return torch.nn.Linear(64, 10)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))


def trainer(kind, x, y, exclude=None):
    s = SETTINGS["digits"]
    return PCMUTrainer(model(kind), torch.nn.functional.cross_entropy, (x, y), batch_size=s["batch_size"],
                       clip_norm=s["clip_norm"], lr=s["lr"], tau=s["tau"], sigma=s["sigma"],
                       max_request=s["max_request"], seed=0, exclude=exclude)


def first_difference(a, b):
    for ra, rb in zip(a.records, b.records):
        if ra.applied != rb.applied or (ra.applied and not torch.equal(ra.codes, rb.codes)):
            return ra.step
    return None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="linear", choices=["linear", "mlp"])
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--retrain", action="store_true")
    a = p.parse_args()
    x, y, _, _ = load("digits")
    epochs = SETTINGS["digits"]["epochs"]
    began = time.perf_counter()
    t = trainer(a.model, x, y).train(epochs=epochs)
    train_s = time.perf_counter() - began
    ids = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1234))[:a.requests]
    status, wrong, undecided_same, recomputed = {}, [], 0, 0
    check_s = 0.0
    for i in ids.tolist():
        c = t.check_request([i])
        check_s += c.seconds
        status[c.status] = status.get(c.status, 0) + 1
        recomputed += c.sample_gradients > c.steps_checked_exactly  # a near-tie settled by recomputing a step
        if a.retrain:
            diff = first_difference(t, trainer(a.model, x, y, exclude=torch.tensor([i])).train(epochs=epochs))
            if c.status == "exact" and diff is not None:
                wrong.append((i, "false certificate", diff))
            elif c.status == "diverges" and diff != c.first_divergent_step:
                wrong.append((i, f"diverges at {c.first_divergent_step}", diff))
            elif c.status == "undecided":
                undecided_same += diff is None
    print(json.dumps({"model": a.model, "requests": a.requests, "margin": t.rounding_margin, "by_status": status,
                      "undecided_rate": status.get("undecided", 0) / a.requests, "wrong": wrong,
                      "requests_with_a_recomputed_step": recomputed,
                      "undecided_but_unchanged": undecided_same if a.retrain else None,
                      "train_seconds": train_s, "mean_check_seconds": check_s / a.requests}))


if __name__ == "__main__":
    main()
