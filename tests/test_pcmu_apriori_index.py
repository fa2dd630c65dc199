"""PCMU's a-priori index (pcmu/apriori_index.py) against the full recomputation over every step.

The index keeps running totals of the per-step arrays, updated in place by certified deletions and
rebuilt after anything else changed them; every answer it gives (the a-priori test, the remaining
budget, the per-step forgotten counts behind them, a run's training cost) is compared here with the
per-step computation it replaces, over sequences of requests through the ledger that pass and fail
the a-priori test, resume training, restart from disk, roll back and train further."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from unlearn_ext.data import BatchSchedule
from unlearn_ext.ledger import DeletionLedger
from unlearn_ext.pcmu import PCMUTrainer, PCMUUnlearner
from unlearn_ext.pcmu.apriori_index import UNBOUNDED, AprioriIndex, step_budgets
from unlearn_ext.pcmu.request_check import _a_priori_answer

from ledger_methods_setup import blobs, fail_commit_after_disk

# batch 16 of 48 (3 steps per epoch) and the full batch, each with per-step budgets m_t of 2-3: a few
# requests exhaust a batch's budget, so later ones fail the a-priori test and resume training.
SETTINGS = {"batches": dict(batch_size=16, tau=0.3, sigma=0.2), "full batch": dict(batch_size=48, tau=0.15, sigma=0.1)}
REQUESTS = [[0], [5], [1, 2], [0], [7], [9, 11], [3], [20, 21], [30], [4]]


def _trainer(setting: str) -> PCMUTrainer:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    return PCMUTrainer(model, torch.nn.functional.cross_entropy, blobs(), clip_norm=1.0, lr=0.1, max_request=2,
                       **SETTINGS[setting]).train(steps=12)


def _full_a_priori(trainer, new: torch.Tensor):
    """The a-priori test over every step (what the index replaces): steps holding a removed id, or None."""
    steps = trainer._steps
    k = trainer._forgotten_count[:steps] + trainer.schedule.count_in_steps(trainer.rows(new), 0, steps)
    held = (k > 0) & trainer._applied[:steps]
    passes = k.to(torch.float64) * trainer.unit + trainer.rounding_margin < trainer._min_radius[:steps]
    return int(held.sum()) if bool((passes | ~held).all()) else None


def _full_remaining_budget(trainer) -> int:
    applied = trainer._applied[:trainer._steps]
    if not bool(applied.any()):
        return 0
    return trainer.certificate().remaining_budget


def _per_step_arrays(trainer) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's per-step arrays by their definition: each record's smallest radius and flag."""
    return (torch.tensor([r.min_radius for r in trainer.records], dtype=torch.float64),
            torch.tensor([r.applied for r in trainer.records], dtype=torch.bool))


def _assert_per_step_arrays_match_records(trainer) -> None:
    radius, applied = _per_step_arrays(trainer)
    steps = trainer._steps
    assert steps == len(trainer.records)
    # Bit for bit (a NaN radius included): the index's answers depend on the exact float64.
    assert torch.equal(trainer._min_radius[:steps].view(torch.int64), radius.view(torch.int64))
    assert torch.equal(trainer._applied[:steps], applied)


def _check_against_full(trainer) -> dict:
    """Asserts every answer of the index equals the full recomputation; returns how the probes went."""
    _assert_per_step_arrays_match_records(trainer)
    steps = trainer._steps
    forgotten = trainer.forgotten
    recounted = trainer.schedule.count_in_steps(trainer.rows(forgotten), 0, steps, trainer._excluded_from)
    assert torch.equal(trainer._forgotten_count[:steps], recounted)
    index, fresh = trainer.apriori_index(), AprioriIndex()
    fresh.rebuild(trainer)
    for name in ("applied", "held", "slack", "slack_held", "max_held", "min_radius"):
        assert getattr(index, name) == getattr(fresh, name), name
    assert trainer.remaining_budget() == _full_remaining_budget(trainer)
    outcomes = {"passed": 0, "failed": 0}
    for probe in ([], [6], [8], [10, 12], [13, 14, 15], [40], [41, 42, 43, 44]):
        new = torch.tensor(probe, dtype=torch.int64)
        new = new[~torch.isin(new, forgotten)]
        fast, full = _a_priori_answer(trainer, new, 0.0), _full_a_priori(trainer, new)
        assert (None if fast is None else fast.steps_with_removed_ids) == full, probe
        outcomes["passed" if full is not None else "failed"] += 1
    everyone = trainer.data.ids
    for without in (forgotten, everyone[:5], everyone):
        rows = trainer.rows(without)
        assert trainer.training_cost(without) == (trainer.schedule.samples_in_steps(0, steps)
                                                  - int(trainer.schedule.count_in_steps(rows, 0, steps).sum()))
    return outcomes


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_index_follows_requests_restarts_rollbacks_and_training(setting, tmp_path, monkeypatch):
    unlearner = PCMUUnlearner(_trainer(setting))
    ledger = DeletionLedger(unlearner, str(tmp_path))
    seen, routes = {"passed": 0, "failed": 0}, set()

    def run(requests):
        for ids in requests:
            report = ledger.forget(ids)
            routes.add(report.how.split(" from")[0])
            for key, n in _check_against_full(unlearner.trainer).items():
                seen[key] += n

    run(REQUESTS[:5])
    # A restart: a fresh, identical unlearner restored from the directory.
    ledger.close()
    unlearner = PCMUUnlearner(_trainer(setting))
    ledger = DeletionLedger(unlearner, str(tmp_path))
    _check_against_full(unlearner.trainer)
    # A rollback: a certified deletion (counts updated in place) whose commit then fails.
    before = unlearner.trainer._forgotten_count.clone()
    with monkeypatch.context() as m:
        fail_commit_after_disk(m, "append")
        with pytest.raises(OSError, match="injected"):
            ledger.forget([45])
    assert torch.equal(unlearner.trainer._forgotten_count[:unlearner.trainer._steps],
                       before[:unlearner.trainer._steps])
    _check_against_full(unlearner.trainer)
    run(REQUESTS[5:8])
    unlearner.trainer.train(steps=4)  # more steps recorded outside the ledger
    _check_against_full(unlearner.trainer)
    run(REQUESTS[8:])
    ledger.close()
    # The sequence exercised every path the index must agree on.
    assert seen["passed"] and seen["failed"]
    assert "a-priori (m*)" in routes and "resumed" in routes


def test_reindex_rebuilds_the_per_step_arrays_from_the_records():
    """Loading records (a ledger's reopen) rebuilds the per-step arrays: the same as reading each
    record's fields, for radii at the edges of float64 and steps that applied no update."""
    trained = _trainer("batches")
    specials = [math.nan, math.inf, -math.inf, 0.0, -0.0, 5e-324, 1e300, 1.0 / 3.0]
    records = [dataclasses.replace(r, min_radius=specials[t % len(specials)] if t % 3 else r.min_radius,
                                   applied=r.applied and t % 4 != 1).to_state()
               for t, r in enumerate(trained.records)]
    restored = PCMUTrainer(trained.model, torch.nn.functional.cross_entropy, blobs(), clip_norm=1.0, lr=0.1,
                           max_request=2, **SETTINGS["batches"])
    restored.load_state_dict({**trained.state_dict(), "records": records})
    _assert_per_step_arrays_match_records(restored)
    assert not bool(restored._applied.all()) and bool(restored._min_radius.isnan().any())
    for empty in (0, 1):  # no records, one record
        restored.load_state_dict({**trained.state_dict(), "records": records[:empty]})
        _assert_per_step_arrays_match_records(restored)


def test_step_budgets_is_the_per_step_test():
    unit, margin = 1.0 / 48, 3e-7
    radius = torch.cat([torch.rand(2000, dtype=torch.float64) * 0.2,
                        torch.arange(0, 12, dtype=torch.float64) * unit + margin,  # exactly on a boundary
                        torch.arange(0, 12, dtype=torch.float64) * unit + margin + 1e-17,
                        torch.tensor([0.0, margin, -1.0, math.inf, -math.inf, math.nan, 1e300], dtype=torch.float64)])
    m = step_budgets(radius, unit, margin)
    test = lambda k: k.to(torch.float64) * unit + margin < radius  # noqa: E731
    finite = m < UNBOUNDED
    assert bool((test(m.clamp(min=0)) | (m == -1)).all())  # m_t passes (or none does)
    assert not bool((test(m + 1) & finite).any())          # m_t + 1 fails
    assert m[-7:].tolist() == [-1, -1, -1, UNBOUNDED, -1, -1, UNBOUNDED]  # 0, margin, -1, inf, -inf, nan, 1e300


@pytest.mark.parametrize("n,batch_size", [(48, 16), (50, 16), (48, 48), (7, 3)])
def test_schedule_totals_and_steps_holding(n, batch_size):
    schedule = BatchSchedule(torch.arange(n), batch_size, seed=4, shuffle=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        rows = torch.randperm(n, generator=g)[:int(torch.randint(0, n + 1, (1,), generator=g))]
        begin = int(torch.randint(0, 25, (1,), generator=g))
        end = begin + int(torch.randint(0, 25, (1,), generator=g))
        counts = schedule.count_in_steps(rows, begin, end)
        assert schedule.total_in_steps(rows, begin, end) == int(counts.sum())
        held = schedule.steps_holding(rows, begin, end)
        assert bool((held[1:] >= held[:-1]).all())  # ascending: unique_consecutive counts it
        assert torch.equal(torch.bincount(held - begin, minlength=end - begin)
                           if held.numel() else torch.zeros(end - begin, dtype=torch.int64), counts)
        for t in range(begin, end):  # against the batches themselves
            assert int(counts[t - begin]) == int(torch.isin(schedule.step(t).ids, rows).sum())


def test_schedule_totals_at_the_widest_small_batch_table():
    """32,768 batches per epoch: the schedule's per-row batch table is int16 up to 2^15 batches, and
    the count must not wrap at the epoch's end (hi = 32,768)."""
    schedule = BatchSchedule(torch.arange(2**15), 1, seed=4)
    rows = torch.tensor([0, 5, 2**15 - 1])
    for begin, end in ((0, 2**15), (0, 40_000), (100, 2**15), (2**15 - 1, 2**15 + 1)):
        assert schedule.total_in_steps(rows, begin, end) == int(schedule.count_in_steps(rows, begin, end).sum())


def test_repeat_request_is_answered_a_priori_when_a_later_step_has_no_budget(tmp_path):
    """Full batch: a step trained after a deletion holds no forgotten id, so a step there without any
    budget (its smallest radius at the margin) must not stop a repeated request (no new id) from
    being answered from the index: only the steps holding forgotten ids matter."""
    unlearner = PCMUUnlearner(_trainer("full batch"))
    with DeletionLedger(unlearner, str(tmp_path)) as ledger:
        ledger.forget([0])
    trainer = unlearner.trainer.train(steps=3)
    # (the per-step array the index reads, set directly: the records keep their radius)
    trainer._min_radius[trainer._steps - 1] = 0.0  # no m passes at this step: m_t = -1
    trainer._apriori.invalidate()
    assert trainer.apriori_index().slack < 0 <= trainer.apriori_index().slack_held
    answer = _a_priori_answer(trainer, torch.empty(0, dtype=torch.int64), 0.0)
    assert answer is not None and answer.steps_with_removed_ids == _full_a_priori(trainer, torch.empty(0, dtype=torch.int64))


def test_certified_request_finds_the_steps_holding_its_ids_once(monkeypatch):
    """Several batches per epoch: a request certified a priori finds the steps holding its ids
    (the schedule's per-epoch table) once, in the check, and forgetting the ids counts them in from
    that; the counts and the index equal the recomputation."""
    unlearner = PCMUUnlearner(_trainer("batches"))
    calls = []
    original = BatchSchedule.steps_holding
    monkeypatch.setattr(BatchSchedule, "steps_holding",
                        lambda self, *args, **kwargs: calls.append(args) or original(self, *args, **kwargs))
    for ids in ([0], [5, 6]):
        calls.clear()
        report = unlearner.unlearn(ids)
        assert report.how == "a-priori (m*)"
        assert len(calls) == 1, calls
        _check_against_full(unlearner.trainer)
    # A `holding` for other ids or another history length is not used: the steps are found again.
    trainer, new = unlearner.trainer, torch.tensor([7])
    check = trainer.check_request(new)
    assert check.holding is not None and "holding" not in check.to_dict()
    trainer.train(steps=2)
    calls.clear()
    trainer.set_forgotten(torch.cat([trainer.forgotten, new]), holding=check.holding)
    assert len(calls) == 1
    _check_against_full(trainer)
