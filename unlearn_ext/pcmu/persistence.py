"""A `PCMUTrainer`'s saved state: the model's weights and buffers by name (`model_state`), the
initial weights by name, the forgotten ids, the step records, and the fingerprint the state was
saved under, which loading compares with the trainer's own (the learning rate, a function of the
step, is compared on the recorded steps)."""
from __future__ import annotations

import json

from ..data import as_ids
from ..model_state import load_model_state_, model_state
from ..parameters import parameter_shapes
from .records import PCMUStep


def fingerprint(trainer) -> dict:
    """What must match for saved state to belong to this trainer."""
    return {"shapes": parameter_shapes(trainer.model), "mode": trainer.mode,
            "framework": trainer.framework, "batch_size": trainer.batch_size, "clip_norm": trainer.clip_norm,
            "tau": trainer.tau, "sigma": trainer.sigma, "n0": trainer.n0, "n": trainer.n, "alpha": trainer.alpha,
            "seed": trainer.seed, "max_request": trainer.max_request, "rounding_margin": trainer.rounding_margin,
            **trainer.data.fingerprint()}


def state_dict(trainer, *, records: bool = True) -> dict:
    """The model's state by name (`model_state`: "params", "buffers"), the initial weights by
    name, the forgotten ids, the fingerprint the state was saved under (checked again on load,
    so a trainer's state refuses another configuration on its own) and the step records;
    records=False leaves the records out (the ledger tracks them through their StepLog)."""
    state = {"fingerprint": trainer.fingerprint(), "initial": dict(zip(trainer.names, trainer.initial)),
             **model_state(trainer.model), "forgotten": trainer.forgotten.clone()}
    if records:
        state["records"] = [r.to_state() for r in trainer.records]
    return state


def load_state_dict(trainer, state: dict) -> None:
    """Restores state_dict()'s snapshot. Without 'records' (a rollback, whose StepLog was
    restored in place) the records stay as they are and the per-step index is rebuilt."""
    saved = json.loads(json.dumps(state["fingerprint"], default=float))  # as a ledger stores it
    mine = json.loads(json.dumps(trainer.fingerprint(), default=float))
    if saved != mine:
        mismatch = sorted(k for k in set(mine) | set(saved) if saved.get(k) != mine.get(k))
        raise ValueError(f"saved PCMU state belongs to another model or configuration (differs in: "
                         f"{', '.join(mismatch)})")
    # The learning rate is a function of the step, so it is checked on the recorded steps: a
    # resumed or replayed step with another lr would not be the coupled retraining. (A step size
    # given per step has no function to check against: the records are its only record.)
    for r in [] if trainer.lr_given_per_step else state.get("records", []):
        if float(r["step_size"]) != float(trainer._lr(r["step"])):
            raise ValueError(f"saved PCMU state was trained with another learning rate (differs in: lr; step "
                             f"{r['step']} used {r['step_size']!r}, this trainer's lr gives {trainer._lr(r['step'])!r})")
    load_model_state_(trainer.model, state)  # refuses other names or shapes before copying
    trainer.initial = [state["initial"][k].clone() for k in trainer.names]
    if "records" in state:
        trainer.records.replace(PCMUStep.from_state(s, trainer.coordinates, trainer.fragile_threshold)
                                for s in state["records"])
    trainer._forgotten = as_ids(state["forgotten"]).unique()
    trainer._reindex()
