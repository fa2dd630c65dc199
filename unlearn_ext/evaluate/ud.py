"""The harness's `ud` column: SPD-GAN's unlearning degree for every row of one (seed, ratio)
(docs/design.md §7; the measure itself is unlearn_ext/spdgan.py).

Per (seed, ratio) with |F| >= spdgan.MIN_FORGET: a reference model trained without F from other
initial weights and another batch order (independent of the retrain used for scoring) guides the
generator; F's inputs are replaced by x~(F) and the original is trained again on R + x~(F) (same
initial weights, seed and batch order). Retraining without F is unchanged by the replacement (F is
left out either way), so the harness's retrain is the reference. Every method then runs again on
that model, through the same registry entry, and UD compares accuracies on x~(F). This costs one
extra training, one reference training, the GAN and one more run of every method per (seed, ratio):
`unlearn-ext eval` computes it, the demo only with --ud.
"""
from __future__ import annotations

import copy
import dataclasses

import torch

from .. import metrics, spdgan
from ..data import TrainingData
from .methods import OTHER_SEED_OFFSET, Method, Run, other_seed_config, reinitialized

REFERENCE_SEED_OFFSET = 7 * OTHER_SEED_OFFSET + 7  # not the retrain-other row's seed


def not_computed(rows: list[dict], why: str) -> None:
    for row in rows:
        row.update(ud=None, ud_note=why, ud_checks=None)


def attach(rows: list[dict], ds, run: Run, specs: list[Method], prepared_for, forget: torch.Tensor,
           gold: torch.nn.Module, *, steps: int = 300) -> None:
    """Fills ud / ud_note / ud_checks of `rows` (one (seed, ratio)'s rows, each named by its method).
    prepared_for(spec, run) prepares a method on a run (the harness's spec.prepare)."""
    n = int(forget.numel())
    if n < spdgan.MIN_FORGET:
        not_computed(rows, f"n/a: |F| = {n} < {spdgan.MIN_FORGET} (too few points for SPD-GAN)")
        return
    data = run.data
    xf, yf = data.batch(forget)
    xr, _ = data.batch(data.without(forget))
    seed = run.seed + REFERENCE_SEED_OFFSET
    reference = other_seed_config(run.config, seed).train(reinitialized(run.initial, seed), data, exclude=forget)
    low, high = data.inputs.min(0).values, data.inputs.max(0).values
    spd = spdgan.perturb_forget_set(xf, yf, xr, ds.x_test, reference, low, high, steps=steps, seed=seed)

    inputs = data.inputs.clone()
    inputs[data.rows(forget)] = spd.x_forget
    perturbed = TrainingData(inputs, data.targets, data.ids, loss=data.loss)
    before_model = run.config.train(copy.deepcopy(run.initial), perturbed)
    spd_run = dataclasses.replace(run, data=perturbed, original=before_model)

    acc = lambda m, x=spd.x_forget: metrics.accuracy(m, x, yf)  # noqa: E731
    before, retrain_acc = acc(before_model), acc(gold)
    checks = {"detector_acc": spd.detector_acc, "max_shift": spd.max_shift, "before_acc": before,
              "retrain_acc": retrain_acc,
              "control_before_acc": metrics.accuracy(before_model, spd.x_test, ds.y_test),
              "control_retrain_acc": metrics.accuracy(gold, spd.x_test, ds.y_test),
              "retrain_clean_test_acc": metrics.accuracy(gold, ds.x_test, ds.y_test)}
    after = {"original": (before_model, before, retrain_acc), "retrain": (gold, before, retrain_acc)}
    refused = {}
    for spec in specs:
        try:
            prepared = prepared_for(spec, spd_run)
            spec_before, spec_retrain = before, retrain_acc
            if spec.own_original is not None:  # a method with its own training (PCMU): its own pair
                own = spec.own_original(spd_run, prepared)
                own_retrain = spec.own_retrain(spd_run, prepared, forget)
                spec_before, spec_retrain = acc(own), acc(own_retrain)
                after[f"{spec.name}-original"] = (own, spec_before, spec_retrain)
                after[f"{spec.name}-retrain"] = (own_retrain, spec_before, spec_retrain)
            unlearner = spec.build(spd_run, prepared)
            unlearner.unlearn(forget)
            after[spec.name] = (unlearner.model, spec_before, spec_retrain)
        except Exception as exc:  # as in the harness: a method that cannot serve is recorded, not raised
            refused[spec.name] = " ".join(f"{type(exc).__name__}: {exc}".split())
    for row in rows:
        if row["method"] not in after:
            why = refused.get(row["method"]) or row["reason"]
            not_computed([row], f"n/a: the method refused ({why})")
            continue
        model, b, r = after[row["method"]]
        ud, note = spdgan.unlearning_degree(b, acc(model), r, n)
        row.update(ud=ud, ud_note=note, ud_checks={**checks, "before_acc": b, "retrain_acc": r,
                                                    "after_acc": acc(model),
                                                    "after_test_acc": metrics.accuracy(model, ds.x_test,
                                                                                       ds.y_test)})
