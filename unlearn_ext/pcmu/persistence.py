"""A `PCMUTrainer`'s saved state: the model's weights and buffers by name (`model_state`), the
initial weights by name, the forgotten ids and `exclusions` (the forgotten ids some recorded step
was computed without, each with the first such step: with the seeded schedule they give every
recorded step's batch; an id absent from it is in every recorded batch scheduled to hold it, so
a certified deletion changes only "forgotten"), the step records, and the fingerprint the state
was saved under, which loading compares with the trainer's own (the learning rate, a function of
the step, is compared on the recorded steps).

Records saved by earlier versions also hold each step's batch ids; loading derives the exclusion
steps from them and checks that every step's stored ids are the ones the schedule gives.
"""
from __future__ import annotations

import torch

from ..data import as_ids
from ..model_state import check_model_state, load_model_state_, model_state
from ..parameters import parameter_shapes
from ..unlearner import fingerprint_differences
from . import history
from .records import PCMUStep, check_step_sizes


def fingerprint(trainer) -> dict:
    """What must match for saved state to belong to this trainer."""
    return {"shapes": parameter_shapes(trainer.model), "mode": trainer.mode,
            "framework": trainer.framework, "batch_size": trainer.batch_size, "clip_norm": trainer.clip_norm,
            "tau": trainer.tau, "sigma": trainer.sigma, "n0": trainer.n0, "n": trainer.n, "alpha": trainer.alpha,
            "seed": trainer.seed, "max_request": trainer.max_request, "rounding_margin": trainer.rounding_margin,
            **({} if trainer.schedule.shuffle else {"shuffle": False}), **trainer.data.fingerprint()}


def state_dict(trainer, *, records: bool = True) -> dict:
    """The model's state by name (`model_state`: "params", "buffers"), the initial weights by
    name, the forgotten ids, the fingerprint the state was saved under (checked again on load,
    so a trainer's state refuses another configuration on its own) and the step records;
    records=False leaves the records out (the ledger tracks them through their StepLog). Records in a
    history store are named instead, always: "history" (history.mark: the store's path, length and
    digest of the records, and their number)."""
    state = {"fingerprint": trainer.fingerprint(), "initial": dict(zip(trainer.names, trainer.initial)),
             **model_state(trainer.model), "forgotten": trainer.forgotten.clone(),
             "exclusions": exclusions(trainer)}
    if trainer.history is not None:
        state["history"] = history.mark(trainer)
    elif records:
        state["records"] = [r.to_state() for r in trainer.records]
    return state


def load_state_dict(trainer, state: dict) -> None:
    """Restores state_dict()'s snapshot. Without 'records' (a rollback, whose StepLog was
    restored in place) the records stay as they are and the per-step index is rebuilt. With
    'history' (records in the trainer's store) the store is cut back to the records it names."""
    mismatch = fingerprint_differences(state["fingerprint"], trainer.fingerprint())  # as a ledger stores them
    if mismatch:
        raise ValueError(f"saved PCMU state belongs to another model or configuration (differs in: "
                         f"{', '.join(mismatch)})")
    check_step_sizes(trainer, [(r["step"], r["step_size"]) for r in state.get("records", [])])
    stored = history.saved_mark(trainer, state["history"]) if "history" in state else None
    forgotten = as_ids(state["forgotten"], "forgotten").unique()
    steps = (len(state["records"]) if "records" in state else stored["steps"] if stored is not None
             else len(trainer.records))
    if "exclusions" in state:
        excluded_from = _excluded_from(state["exclusions"], forgotten, steps)
    elif "records" in state and all("ids" in r for r in state["records"]):
        excluded_from = _exclusions_from_stored_ids(trainer, state["records"], forgotten)
    else:
        raise ValueError("saved PCMU state lacks 'exclusions' (the steps computed without each forgotten id), so "
                         "its steps' batches cannot be derived")
    # Everything is read and checked before the trainer changes: a refused state leaves it as it was.
    initial = _initial(trainer, state.get("initial"))
    records = _records(trainer, state["records"]) if "records" in state else None
    check_model_state(trainer.model, state)  # other names or shapes: refused before the store is cut
    if stored is not None:  # checked by saved_mark above: the cut cannot be refused
        history.restore(trainer, stored)
    load_model_state_(trainer.model, state)
    trainer.initial = initial
    if records is not None:
        trainer.records.replace(records)
    trainer._forgotten, trainer._excluded_from = forgotten, excluded_from
    trainer._reindex()


def _initial(trainer, saved) -> list[torch.Tensor]:
    """The saved initial weights in the trainer's parameter order, refused unless they are this
    model's: every parameter by name, same shape."""
    if not (isinstance(saved, dict) and set(saved) == set(trainer.names) and all(
            isinstance(saved[k], torch.Tensor) and saved[k].shape == w.shape
            for k, w in zip(trainer.names, trainer.initial))):
        raise ValueError("saved PCMU state: 'initial' must hold this model's initial weights, every parameter by "
                         "name with its shape")
    return [saved[k].clone() for k in trainer.names]


def _records(trainer, saved) -> list[PCMUStep]:
    """The saved step records as PCMUSteps; a malformed one is refused naming its position."""
    records = []
    coordinates, threshold = trainer.coordinates, trainer.fragile_threshold  # once, not per record
    for i, s in enumerate(saved):
        try:
            records.append(PCMUStep.from_state(s, coordinates, threshold))
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"saved PCMU state: step record {i} is malformed ({type(exc).__name__}: {exc})") from None
    return records


def exclusions(trainer) -> dict:
    """{"ids", "from_step"}: the forgotten ids that some recorded step was computed without, and the
    first such step of each."""
    held_out = trainer._excluded_from < trainer.steps_done
    return {"ids": trainer.forgotten[held_out].clone(), "from_step": trainer._excluded_from[held_out].clone()}


def _excluded_from(saved: dict, forgotten: torch.Tensor, steps: int) -> torch.Tensor:
    """Per id of `forgotten` (sorted): the first of the `steps` recorded steps computed without it
    (`steps` for an id in every recorded batch that held it), from saved `exclusions`, refused
    unless they name forgotten ids, once each, with steps in 0..steps-1."""
    ids, from_step = (saved.get("ids"), saved.get("from_step")) if isinstance(saved, dict) else (None, None)
    if not (isinstance(ids, torch.Tensor) and isinstance(from_step, torch.Tensor) and ids.dtype == torch.int64
            and from_step.dtype == torch.int64 and ids.dim() == 1 and from_step.shape == ids.shape):
        raise ValueError("saved PCMU state: exclusions must hold int64 'ids' and 'from_step' of one length")
    position = torch.searchsorted(forgotten, ids)
    if (ids.unique().numel() != ids.numel() or bool((position >= forgotten.numel()).any())
            or not torch.equal(forgotten[position], ids)):
        raise ValueError("saved PCMU state: exclusions must name forgotten ids, each once")
    if ids.numel() and not (0 <= int(from_step.min()) and int(from_step.max()) < steps):
        raise ValueError(f"saved PCMU state: exclusions' steps must lie in 0..{steps - 1} (the recorded steps)")
    out = torch.full((forgotten.numel(),), steps, dtype=torch.int64)
    out[position] = from_step
    return out


def _exclusions_from_stored_ids(trainer, records: list, forgotten: torch.Tensor) -> torch.Tensor:
    """Exclusion steps of records that stored their batch ids: a forgotten id is excluded from the
    first step whose scheduled batch holds it but whose stored ids do not. Every step's stored ids
    must then be what the schedule gives, or the records are refused. `forgotten`: sorted, unique."""
    excluded_from = torch.full((forgotten.numel(),), len(records), dtype=torch.int64)
    for t, record in enumerate(records):
        stored = as_ids(record["ids"], "records' ids")
        scheduled = trainer.schedule.step(t).ids
        newly = torch.isin(forgotten, scheduled[~torch.isin(scheduled, stored)]) & (excluded_from > t)
        excluded_from[newly] = t
        if int(record["step"]) != t or not torch.equal(
                stored, trainer.schedule.step(t, forgotten[excluded_from <= t]).ids):
            raise ValueError(f"saved PCMU records do not follow this trainer's batch schedule (step {t}: its stored "
                             "ids are not the scheduled batch minus the forgotten ids)")
    return excluded_from
