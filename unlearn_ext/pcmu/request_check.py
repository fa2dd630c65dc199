"""PCMU's per-request check (docs/design.md §4, our formulation): would training without a set of
ids give the same codes at every step -- then the parameters are bit-identical to that retraining --
or which step is the first whose codes change? Read from a trained `PCMUTrainer`'s step records,
without retraining:

  * a request whose every affected step beats k*C/b + margin (k = removed and forgotten ids in its
    batch) is answered from the trainer's a-priori index (running totals of the per-step arrays,
    apriori_index.py) and the steps holding the request's ids: no work per recorded step;
  * otherwise, step by step over the steps that hold a removed id (found from the schedule, a
    window at a time; a step's batch ids are recomputed only when it needs more than the a-priori
    test): a step whose smallest radius beats the bound keeps its codes a priori;
    else (k <= M, the recorded fragile sets' budget) the removed samples' part of v is recomputed
    at the replayed w_t and the fragile coordinates requantized (analytic) or compared with their
    Monte-Carlo radii (mc); a near-tie is settled by recomputing the step itself.
"""
from __future__ import annotations

import time

import torch

from ..data import in_sorted
from ..unlearner import checked_request
from .certificate import RequestCheck
from .records import STEP_WINDOW, PCMUStep, unpack_codes


def check_request(trainer, removed) -> RequestCheck:
    """Would training without `removed` and every id forgotten so far give the same codes? The
    ids forgotten so far are always included: a certified deletion leaves the record as it was,
    so their gradients are still inside the stored values of the steps that held them."""
    began = time.perf_counter()
    # An id never trained on has no gradient to remove: answering would mislead.
    removed = checked_request(trainer.data, removed, "removed")
    new = removed[~in_sorted(removed, trainer.forgotten)].unique()
    fast = _a_priori_answer(trainer, new, began)
    if fast is not None:
        return fast
    removed = torch.cat([trainer.forgotten, removed]).unique()
    out = RequestCheck("exact" if trainer.mode == "analytic" or trainer.framework == "D" else "probable",
                       None, "")
    w_at, w = 0, None
    for t, k in _steps_holding(trainer, new):
        r = trainer.records[t]
        out.steps_with_removed_ids += 1
        verdict, rebuilt = _check_step(trainer, r, k, removed, w_at, w, out)
        if rebuilt is not None:  # the step needed w_t: later steps continue the replay from it
            w_at, w = rebuilt
        if verdict is not None:
            out.status, out.first_divergent_step, out.reason = verdict[0], r.step, verdict[1]
            break
    if out.first_divergent_step is None:
        out.reason = _certified_reason(out.status)
    out.seconds = time.perf_counter() - began
    return out


def _removed_per_step(trainer, rows: torch.Tensor, begin: int, end: int) -> torch.Tensor:
    """k per step begin..end-1: ids of the request (at `rows`, none forgotten yet) and forgotten ids
    in that step's recorded batch."""
    return trainer._forgotten_count[begin:end] + trainer.schedule.count_in_steps(rows, begin, end)


def _steps_holding(trainer, new: torch.Tensor):
    """(t, k) in step order for every applied step whose batch held k > 0 of the removed ids (the
    request's `new` ids and the forgotten ones), a window of steps at a time."""
    rows = trainer.rows(new)
    for begin in range(0, trainer._steps, STEP_WINDOW):
        end = min(begin + STEP_WINDOW, trainer._steps)
        k = _removed_per_step(trainer, rows, begin, end)
        held = torch.nonzero((k > 0) & trainer._applied[begin:end]).reshape(-1)
        for offset, count in zip(held.tolist(), k[held].tolist()):
            yield begin + offset, count


def _a_priori_answer(trainer, new: torch.Tensor, began: float) -> RequestCheck | None:
    """check_request's answer when every step holding a removed or forgotten id passes the a-priori
    test (k*C/b + margin < the step's smallest radius), from the trainer's a-priori index
    (apriori_index.py): the steps holding only forgotten ids all pass iff its slack_held >= 0, and
    a step holding c of the request's ids passes iff f + c <= m. Under a full-batch schedule every
    step holds all of them (c = the request's size), which the index's slack answers at once;
    otherwise only the steps holding them are read (one per id and epoch). No per-step Python, and
    no work per recorded step. None when some step needs more (the loop then decides)."""
    if trainer.framework == "D":
        return None
    index = trainer.apriori_index()
    if index.slack_held < 0:
        return None
    rows = trainer.rows(new)
    if trainer.schedule.batches_per_epoch == 1:
        if rows.numel() and rows.numel() > index.slack:  # no new id: only the held steps matter (slack_held)
            return None
        touched, holding = (index.applied if rows.numel() else index.held), None
    else:
        all_steps, all_counts = trainer.schedule.step_counts(rows, 0, trainer._steps)
        holding = (new, trainer._steps, all_steps, all_counts)  # what forgetting `new` counts in
        applied = trainer._applied[all_steps]
        steps, counts = all_steps[applied], all_counts[applied]
        forgotten = trainer._forgotten_count[steps]
        if bool((forgotten + counts > index.budgets[steps]).any()):
            return None
        touched = index.held + int((forgotten == 0).sum())
    out = RequestCheck("exact" if trainer.mode == "analytic" else "probable", None, "",
                       steps_with_removed_ids=touched, steps_checked_a_priori=touched, holding=holding)
    out.reason = _certified_reason(out.status)
    out.seconds = time.perf_counter() - began
    return out


def _check_step(trainer, r: PCMUStep, k: int, removed: torch.Tensor, w_at: int, w, out: RequestCheck):
    """(verdict, rebuilt): verdict None if step r keeps its codes without the k ids of `removed` its
    batch held, else (status, reason); rebuilt = (t, w_t) when the check had to replay w_t, else None."""
    if trainer.framework == "D":
        return ("uncertifiable", "framework D certifies input perturbations, not sample removal"), None
    if k * trainer.unit + trainer.rounding_margin < r.min_radius:
        out.steps_checked_a_priori += 1
        return None, None
    ids = trainer.batch_ids(r.step)
    present = ids[torch.isin(ids, removed)]  # in batch order, as training summed them
    if trainer.mode == "mc" and k == ids.numel():
        return ("uncertifiable", "the batch would be empty (no update) but mc codes are random"), None
    if k > trainer.max_request:
        return ("over_budget", f"{k} removed ids in one batch exceed the recorded fragile sets (M = "
                               f"{trainer.max_request})"), None
    w = trainer.replay(r.step, (w_at, w) if w is not None else None)
    index, value, radius = r.fragile.selected()
    delta = torch.cat([g.reshape(-1).cpu() for g in trainer._clipped_mean64(w, present)])[index]
    out.steps_checked_exactly += 1
    out.sample_gradients += k
    if trainer.mode == "analytic":
        verdict = _requantize_analytic(trainer, value, delta, out)
    else:
        verdict = _radius_check_mc(trainer, radius, delta)
    if verdict is not None and verdict[0] == "undecided" and trainer.mode == "analytic":
        verdict = _recompute_step(trainer, r, ids, present, w, out)
    return verdict, (r.step, w)


def _recompute_step(trainer, r: PCMUStep, ids: torch.Tensor, present: torch.Tensor, w, out: RequestCheck):
    """Settles a near-tie exactly: computes step r as retraining would (w_t is the same, since every
    earlier step keeps its codes; the batch is r's, `ids`, minus the removed ids, in order) and
    compares its codes with the recorded ones. Costs one batch of gradients instead of a resume."""
    rest = ids[~torch.isin(ids, present)]
    recorded = unpack_codes(r.codes, trainer.shapes)
    if rest.numel() == 0:
        # Retraining makes no update at an emptied batch: the same weights iff every recorded code is 0.
        flipped = sum(int((old != 0).sum()) for old in recorded)
    else:
        _, result = trainer._quantize(r.step, w, rest, trainer.fragile_threshold)
        out.sample_gradients += rest.numel()
        flipped = sum(int((c.cpu() != old).sum()) for c, old in zip(result.codes, recorded))
    if flipped:
        out.flipped_coordinates = flipped
        return "diverges", f"{flipped} coordinates change their code (near-tie settled by recomputing the step)"
    return None


def _requantize_analytic(trainer, v: torch.Tensor, delta: torch.Tensor, out: RequestCheck):
    """v: the step's fragile values; delta: the removed samples' part of them."""
    beta = float(torch.tensor(trainer.beta, dtype=torch.float32))  # the kernel compares in float32
    old = (v > beta).to(torch.int8) - (v < -beta).to(torch.int8)
    v_new = v.double() - delta
    new = (v_new > beta).to(torch.int8) - (v_new < -beta).to(torch.int8)
    near = ((v_new.abs() - beta).abs() <= trainer.rounding_margin)
    flipped = (new != old) & ~near
    if bool(flipped.any()):
        out.flipped_coordinates = int(flipped.sum())
        return ("diverges", f"{int(flipped.sum())} coordinates change their code")
    if bool(near.any()):
        return ("undecided", f"{int(near.sum())} coordinates land within the rounding margin of +-beta")
    return None


def _radius_check_mc(trainer, radius: torch.Tensor, delta: torch.Tensor):
    uncovered = ~(delta.abs() + trainer.rounding_margin < radius.double())
    if bool(uncovered.any()):
        return ("undecided", f"{int(uncovered.sum())} coordinates move by more than their Monte-Carlo "
                             "radius (abstaining coordinates have radius 0)")
    return None


def _certified_reason(status: str) -> str:
    """What a request that changes no step's codes is told ('exact': analytic mode; 'probable': mc)."""
    if status == "exact":
        return "no code changes at any step: retraining without these ids gives bit-identical parameters"
    return ("every affected coordinate's change is inside its Monte-Carlo radius: the same codes with "
            "probability >= 1 - alpha per coordinate")
