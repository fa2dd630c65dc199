"""PCMU's step records keep no batch ids: the trainer derives step t's batch from its seeded schedule
and the step each forgotten id was excluded from. The derived batches must be the ones training
used, through certified requests, resumes, rollbacks and reopened ledgers; records saved with their
ids give the same answers; and the ledger's record files do not hold the ids' bytes."""
import os

import pytest
import torch

from unlearn_ext.ledger import LEDGER, DeletionLedger
from unlearn_ext.pcmu import PCMUTrainer, PCMUUnlearner

from ledger_methods_setup import same, without_timing
from pcmu_settings import digits_trainer


def _spy_on_trained_batches(trainer: PCMUTrainer) -> dict:
    """step -> the ids its latest computation trained on, as the gradient code received them."""
    trained = {}
    compute, quantize = trainer._compute_step, trainer._quantize

    def compute_step(t, *args, **kwargs):
        trained[t] = torch.empty(0, dtype=torch.int64)  # an emptied batch computes no gradient

        def seen(step, params, ids, *a, **k):
            trained[t] = ids.clone()
            return quantize(step, params, ids, *a, **k)
        trainer._quantize = seen
        try:
            return compute(t, *args, **kwargs)
        finally:
            trainer._quantize = quantize
    trainer._compute_step = compute_step
    return trained


def _assert_batches(trainer: PCMUTrainer, trained: dict) -> None:
    assert trainer.steps_done == len(trained)
    for t in range(trainer.steps_done):
        assert torch.equal(trainer.batch_ids(t), trained[t]), t


def _request_sequence(trainer: PCMUTrainer):
    """Certified and resumed requests, with training between them (digits: 4 batches per epoch)."""
    ids = trainer.data.ids
    gen = torch.Generator().manual_seed(3)
    yield ids[torch.randperm(ids.numel(), generator=gen)[:2]]
    trainer.train(epochs=1)
    yield ids[torch.randperm(ids.numel(), generator=gen)[:3]]
    yield trainer.batch_ids(trainer.steps_done - 3)[:90]  # beyond M: resumed from that step
    trainer.train(steps=2)
    yield ids[torch.randperm(ids.numel(), generator=gen)[:1]]


def _disk_full(*args, **kwargs):
    raise OSError("disk full")


def _trainer():
    return digits_trainer(sigma=0.05, tau=0.2, exclude=torch.arange(0, 1400, 97))  # m* > 0: many certified


def test_derived_batches_are_the_trained_ones_through_requests_rollbacks_and_reopening(tmp_path, monkeypatch):
    trainer = _trainer()
    trained = _spy_on_trained_batches(trainer)
    trainer.train(epochs=2)
    routes = set()
    with DeletionLedger(PCMUUnlearner(trainer), str(tmp_path)) as ledger:
        for request in _request_sequence(trainer):
            _assert_batches(trainer, trained)
            before = trainer.state_dict()
            # A failed commit rolls the request back: the batches are the committed ones again.
            with monkeypatch.context() as m:
                m.setattr(ledger, "_commit", _disk_full)
                with pytest.raises(OSError, match="disk full"):
                    ledger.forget(request)
            assert same(trainer.state_dict(), before)
            kept = dict(trained)
            report = ledger.forget(request)
            routes.add(report.status)
            if report.status == "certified":
                assert trained == kept
            _assert_batches(trainer, trained)
        state = trainer.state_dict()
    assert routes == {"certified", "retrained"}
    reopened = _trainer()
    with DeletionLedger(PCMUUnlearner(reopened), str(tmp_path)):
        _assert_batches(reopened, trained)
        assert same(reopened.state_dict(), state)


def _with_stored_ids(state: dict, trained: dict) -> dict:
    """`state` as records that stored their batch ids saved it (no 'exclusions')."""
    old = {k: v for k, v in state.items() if k != "exclusions"}
    old["records"] = [{**r, "ids": trained[r["step"]].clone()} for r in state["records"]]
    return old


def test_records_with_stored_ids_give_bit_identical_answers():
    trainer = _trainer()
    trained = _spy_on_trained_batches(trainer)
    trainer.train(epochs=2)
    first = PCMUUnlearner(trainer)
    first.unlearn(trainer.data.ids[[5, 600]])  # certified: forgotten ids still in the recorded batches
    trainer.train(steps=3)                     # ... and excluded from the steps after
    other = _trainer()
    other.load_state_dict(_with_stored_ids(trainer.state_dict(), trained))
    _assert_same_run(other, trainer)
    second = PCMUUnlearner(other)
    for request_a, request_b in zip(_request_sequence(trainer), _request_sequence(other)):
        assert torch.equal(request_a, request_b)
        a, b = first.unlearn(request_a), second.unlearn(request_b)
        assert without_timing(a.to_dict()) == without_timing(b.to_dict())
        assert all(torch.equal(p, q) for p, q in zip(trainer.params, other.params))
        assert trainer.certificate().to_dict() == other.certificate().to_dict()
    _assert_same_run(other, trainer)


def _assert_same_run(a: PCMUTrainer, b: PCMUTrainer) -> None:
    """Bit-identical state and batches. Their `exclusions` may name different steps for an id that
    no step between them was scheduled to hold (stored ids cannot tell them apart): the batches
    they give are what must agree."""
    assert same({k: v for k, v in a.state_dict().items() if k != "exclusions"},
                {k: v for k, v in b.state_dict().items() if k != "exclusions"})
    assert all(torch.equal(a.batch_ids(t), b.batch_ids(t)) for t in range(b.steps_done))


def test_stored_ids_off_the_schedule_are_refused():
    trainer = _trainer()
    trained = _spy_on_trained_batches(trainer)
    trainer.train(epochs=1)
    trained[2] = trained[2].flip(0)  # the same ids in another order: not what step 2 summed
    with pytest.raises(ValueError, match=r"do not follow this trainer's batch schedule \(step 2"):
        _trainer().load_state_dict(_with_stored_ids(trainer.state_dict(), trained))


@pytest.mark.parametrize("change, message", [
    (lambda e: {"ids": e["ids"], "from_step": e["from_step"].to(torch.int32)}, "int64"),
    (lambda e: {"ids": e["ids"] + 1, "from_step": e["from_step"]}, "name forgotten ids"),
    (lambda e: {"ids": e["ids"], "from_step": e["from_step"] + 10**6}, r"steps must lie in 0\.\.7"),
    (lambda e: [e["ids"], e["from_step"]], "exclusions must hold"),  # not a dict
])
def test_malformed_exclusions_are_refused_before_loading(change, message):
    trainer = _trainer().train(epochs=2)
    state = trainer.state_dict()
    assert state["exclusions"]["ids"].numel() > 0  # the ids excluded at construction
    state["exclusions"] = change(state["exclusions"])
    other = _trainer()
    untouched = other.state_dict()
    with pytest.raises(ValueError, match=message):
        other.load_state_dict(state)
    assert same(other.state_dict(), untouched)
    del state["exclusions"]
    with pytest.raises(ValueError, match="lacks 'exclusions'"):
        other.load_state_dict(state)


def _drop_a_records_field(state):
    del state["records"][3]["tensors"]["codes"]


def _initial_of_another_shape(state):
    name = next(iter(state["initial"]))
    state["initial"][name] = state["initial"][name][:1]


@pytest.mark.parametrize("change, message", [
    (_drop_a_records_field, r"step record 3 is malformed"),
    (_initial_of_another_shape, r"'initial' must hold this model's initial weights"),
])
def test_a_malformed_record_or_initial_leaves_the_trainer_as_it_was(change, message):
    """Loading checks everything before it changes anything: the trainer's weights, records and
    forgotten ids stay those it had (they used to be half replaced when a record was malformed)."""
    state = _trainer().train(epochs=2).state_dict()
    change(state)
    other = _trainer().train(epochs=1)
    untouched = other.state_dict()
    with pytest.raises(ValueError, match=message):
        other.load_state_dict(state)
    assert same(other.state_dict(), untouched)


def test_an_id_trained_without_cannot_leave_the_forgotten_set():
    trainer = _trainer().train(steps=1)
    with pytest.raises(ValueError, match=r"ids \[0\] cannot leave the forgotten set"):
        trainer.forgotten = trainer.forgotten[1:]
    added = torch.cat([trainer.forgotten, torch.tensor([3])])
    trainer.forgotten = added
    trainer.forgotten = added[:-1]  # 3 was in every recorded batch: it may leave again
    assert torch.equal(trainer.forgotten, added[:-1])


def test_the_ledger_record_files_hold_no_batch_ids(tmp_path):
    """The records' files hold the records' tensors (record_bytes) and serialization overhead, which
    is smaller than one step's ids: they no longer grow by 8 bytes per sample per step."""
    trainer = digits_trainer(batch_size=700, max_request=1).train(epochs=3)
    with DeletionLedger(PCMUUnlearner(trainer), str(tmp_path)) as ledger:
        files = [name for part, name in ledger.ledger["parts"].items() if part.startswith("records__")]
        assert files and not [p for p in ledger.ledger["inline"] if p.startswith("records__")]
    stored = sum(os.path.getsize(tmp_path / name) for name in files)
    overhead_per_step = (stored - trainer.record_bytes()["total"]) / trainer.steps_done
    ids_per_step = sum(trainer.batch_ids(t).numel() * 8 for t in range(trainer.steps_done)) / trainer.steps_done
    assert 0 < overhead_per_step < ids_per_step
    assert LEDGER in os.listdir(tmp_path)


@pytest.mark.parametrize("batch_size", [7, 40, 200])  # several batches per epoch, and one (full batch)
def test_counting_held_out_samples_per_step_matches_the_batches(batch_size):
    """count_in_steps with `until` (what the per-step forgotten counts use) against the batches."""
    from unlearn_ext.data import BatchSchedule
    schedule = BatchSchedule(torch.arange(100, 300, 5), batch_size, seed=4)  # 40 ids
    gen = torch.Generator().manual_seed(batch_size)
    rows = torch.randperm(40, generator=gen)[:9]
    until = torch.randint(0, 30, (9,), generator=gen)
    for begin, end in ((0, 30), (3, 17), (11, 12), (5, 5)):
        expected = [sum(int(t < u and bool(torch.isin(schedule.ids[r], schedule.step(t).ids)))
                        for r, u in zip(rows.tolist(), until.tolist())) for t in range(begin, end)]
        assert schedule.count_in_steps(rows, begin, end, until).tolist() == expected
    with pytest.raises(ValueError, match="until has 2 entries for 9 rows"):
        schedule.count_in_steps(rows, 0, 3, until[:2])
