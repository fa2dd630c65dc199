"""Bytes of PCMU's step records against max_request (README "PCMU", choosing max_request).

Trains the digits example (evaluate/pcmu_examples.py: logistic regression d = 650, b = 350, 6 epochs) once
per M in --max-requests and prints, per step: the share of coordinates recorded as fragile, the
layouts used, the fragile set's bytes (as stored now, and as the earlier all-sparse format stored
it: int64 index + float32 value + float32 radius = 16 bytes per fragile coordinate), the whole
record (codes + fragile set; no batch ids) and the estimate made before training (worst case: every
coordinate fragile). --model mlp uses a 64-256-256-10 MLP at b = 256 instead.
Bytes only: nothing here is timed.

    PYTHONPATH=. python scripts/pcmu_record_bytes.py [--model logreg|mlp] [--max-requests 1,2,4,8] [--mode analytic|mc]
"""
from __future__ import annotations

import argparse

import torch

from unlearn_ext.pcmu import PCMUTrainer
from unlearn_ext.evaluate.pcmu_examples import SETTINGS, load


def make_trainer(model_name: str, max_request: int, mode: str) -> tuple[PCMUTrainer, int]:
    x, y, _, _ = load("digits")
    s = dict(SETTINGS["digits"])
    epochs = s.pop("epochs")
    s.pop("plain_lr"), s.pop("max_request")
    torch.manual_seed(0)
    if model_name == "mlp":
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                    torch.nn.ReLU(), torch.nn.Linear(256, 10))
        s["batch_size"] = 256
    else:
        model = torch.nn.Linear(64, 10)
    trainer = PCMUTrainer(model, torch.nn.functional.cross_entropy, (x, y), max_request=max_request, mode=mode,
                          seed=0, **s)
    return trainer, epochs


def measure(model_name: str, max_request: int, mode: str) -> dict:
    trainer, epochs = make_trainer(model_name, max_request, mode)
    before = trainer.estimate_record_bytes(epochs=epochs)  # worst case: no step seen yet
    trainer.train(epochs=epochs)
    got = trainer.record_bytes()
    steps = got["steps"]
    return {"M": max_request, "d": trainer.coordinates, "steps": steps,
            "fragile_share": got["fragile_coordinates"] / (steps * trainer.coordinates),
            "layouts": got["layouts"], "fragile_per_step": got["fragile"] / steps,
            "old_fragile_per_step": 16 * got["fragile_coordinates"] / steps,
            "record_per_step": got["mean_per_step"], "estimate_per_step": before["per_step"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("logreg", "mlp"), default="logreg")
    parser.add_argument("--max-requests", default="1,2,4,8")
    parser.add_argument("--mode", choices=("analytic", "mc"), default="analytic")
    args = parser.parse_args(argv)
    rows = [measure(args.model, int(m), args.mode) for m in args.max_requests.split(",")]
    print(f"digits, {args.model}, {args.mode}, d = {rows[0]['d']}, {rows[0]['steps']} steps; bytes per step:")
    print("| M | fragile share | layouts (sparse/dense) | fragile set | fragile set, old format | "
          "whole record | estimate before training |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['M']} | {r['fragile_share']:.1%} | {r['layouts']['sparse']}/{r['layouts']['dense']} | "
              f"{r['fragile_per_step']:,.0f} | {r['old_fragile_per_step']:,.0f} | {r['record_per_step']:,.0f} | "
              f"{r['estimate_per_step']:,} |")


if __name__ == "__main__":
    main()
