"""A request costs what it changes: the ledger skips parts only when they are bit for bit what it
committed (never a changed one), writes a StepLog from its first changed entry, rolls a log back
exactly; PCMU's answer from its per-step arrays equals the step-by-step check."""
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

import unlearn_ext.ledger as ledger_module
from unlearn_ext.data import TrainingData, as_ids
from unlearn_ext.ledger import DeletionLedger
from unlearn_ext.pcmu import PCMUUnlearner, request_check
from unlearn_ext.step_log import StepLog
from unlearn_ext.unlearner import Unlearner

from ledger_methods_setup import same
from pcmu_settings import digits_trainer, synthetic_trainer


# ---- StepLog ------------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 30), max_size=8), st.lists(st.tuples(st.sampled_from("atr"), st.integers(0, 40)),
                                                          max_size=12))
def test_step_log_marks_every_change_and_restores_the_committed_entries(start, operations):
    log = StepLog(start)
    log.mark_clean()
    committed, fresh = list(start), iter(range(1000, 2000))  # new entries never equal old ones
    for op, n in operations:
        if op == "a":
            log.append(next(fresh))
        elif op == "t":
            log.truncate(n)
        else:
            log.replace([next(fresh) for _ in range(n % 5)])
    now = list(log)
    first_change = next((i for i, (a, b) in enumerate(zip(now, committed)) if a != b), min(len(now), len(committed)))
    # Nothing before dirty_from changed, and a changed log says so.
    assert log.dirty_from <= first_change
    assert log.dirty == (now != committed)
    log.restore_clean()
    assert list(log) == committed and not log.dirty


# ---- the ledger never skips a changed part ---------------------------------------------------------

class ToyUnlearner(Unlearner):
    """State whose changes are hard to see: -0.0 for 0.0 (equal under ==), a list changed in place,
    and optionally a tensor handed out without copying (shared with the live state)."""
    method = "toy"

    def __init__(self, alias: bool = False, keeps_loaded: bool = False):
        super().__init__(TrainingData(torch.zeros(8, 2), torch.zeros(8, dtype=torch.int64)))
        self.model = torch.nn.Linear(1, 1)
        self.w, self.tags, self.alias, self.keeps_loaded = torch.zeros(4), [1.0, 2.0], alias, keeps_loaded

    def _forget(self, new, report):
        i = int(new[0]) % 4
        with torch.no_grad():
            self.w[i] = -self.w[i]  # 0.0 -> -0.0: the same under ==, other bits
        self.tags[0] = -self.tags[0] if self.tags[0] == 0 else 0.0
        self._set_forgotten(torch.cat([self.forgotten, new]))
        report.status, report.reason = "unlearned", "toy"

    def fingerprint(self):
        return {"toy": 1}

    def training_epochs(self):
        return 1

    def state_dict(self):
        return {"w": self.w if self.alias else self.w.clone(), "tags": self.tags if self.alias else list(self.tags),
                "forgotten": self.forgotten.clone()}

    def load_state_dict(self, state):
        # keeps_loaded: holds (and later changes in place) the very tensor it was given
        self.w, self.tags = (state["w"] if self.keeps_loaded else state["w"].clone()), list(state["tags"])
        self._set_forgotten(state["forgotten"])


def _bits(t):
    return t.view(torch.int32).tolist()


@pytest.mark.parametrize("alias", [False, True])
def test_a_changed_part_is_never_skipped(tmp_path, alias):
    toy = ToyUnlearner(alias)
    with DeletionLedger(toy, str(tmp_path)) as ledger:
        ledger.forget([1])  # w[1]: 0.0 -> -0.0; tags[0]: 1.0 -> 0.0
        ledger.forget([2])  # w[2]: 0.0 -> -0.0; tags[0]: 0.0 -> -0.0 (a float equal under ==)
        w, tags = _bits(toy.w), list(toy.tags)
    reopened = ToyUnlearner(alias)
    DeletionLedger(reopened, str(tmp_path)).close()
    assert _bits(reopened.w) == w and str(reopened.tags) == str(tags) == "[-0.0, 2.0]"


# ---- PCMU: the a-priori answer from the per-step arrays equals the step-by-step check ------------------

def _loop_check(trainer, ids, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(request_check, "_a_priori_answer", lambda trainer, new, began: None)
        return trainer.check_request(ids)


def _answer(check):
    out = check.to_dict()
    out.pop("seconds")
    return out


def _old_training_cost(trainer, without, start=0):
    exclude = as_ids(without)
    return sum(s.ids.numel() for s in trainer.schedule.steps(start, trainer.steps_done, exclude))


@pytest.mark.parametrize("make", [
    lambda: digits_trainer(sigma=0.05, tau=0.2).train(epochs=4),  # several batches per epoch, m* = 61
    lambda: digits_trainer().train(epochs=2),                     # m* = 0: no answer a priori
    lambda: synthetic_trainer().train(steps=12)])                 # full batch
def test_per_step_arrays_answer_as_the_step_by_step_check(make, monkeypatch):
    trainer = make()
    unlearner = PCMUUnlearner(trainer)
    gen = torch.Generator().manual_seed(0)
    ids = trainer.data.ids
    fast_answers, budget = 0, trainer.certificate().budget
    for size in (1, 1, 2, 3, 1, 5, 40, 600):
        request = ids[torch.randperm(ids.numel(), generator=gen)[:size]]
        fast = request_check._a_priori_answer(trainer, request[~torch.isin(request, trainer.forgotten)].unique(), 0.0)
        loop = _loop_check(trainer, request, monkeypatch)
        if fast is not None:
            fast_answers += 1
            assert _answer(fast) == _answer(loop)
            assert loop.first_divergent_step is None and loop.steps_checked_exactly == 0
        else:  # the loop needed more than the a-priori test somewhere
            assert loop.steps_checked_exactly > 0 or loop.first_divergent_step is not None
        assert _answer(trainer.check_request(request)) == _answer(loop)
        unlearner.unlearn(request)  # certified or resumed: both keep the per-step arrays in step
        for without in (trainer.forgotten, request, torch.cat([trainer.forgotten, ids[:3]])):
            for start in (0, trainer.steps_done // 2):
                assert trainer.training_cost(without, start) == _old_training_cost(trainer, without, start)
        assert trainer.remaining_budget() == trainer.certificate().remaining_budget
        counts = [int(torch.isin(trainer.batch_ids(t), trainer.forgotten).sum()) for t in range(trainer.steps_done)]
        assert trainer._forgotten_count[:trainer.steps_done].tolist() == counts
    assert (fast_answers > 0) == (budget > 0)


# ---- PCMU behind the ledger: chunks written from the first changed step, exact rollback ------------

def _stored(ledger):
    """part -> its file, or its bytes when small enough to live inside ledger.json"""
    return {**ledger.ledger["parts"], **ledger.ledger["inline"]}


def _written(ledger, before):
    return sorted(p for p, where in _stored(ledger).items() if before.get(p) != where)


def test_certified_request_writes_only_the_forgotten_ids(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger_module, "LOG_CHUNK", 4)
    trainer = synthetic_trainer().train(steps=10)
    with DeletionLedger(PCMUUnlearner(trainer), str(tmp_path)) as ledger:
        assert ledger.ledger["logs"]["records"] == {"length": 10, "chunk": 4, "chunks": 3}
        parts = _stored(ledger)
        assert ledger.forget([5]).how == "a-priori (m*)"
        assert _written(ledger, parts) == ["forgotten"]
        parts = _stored(ledger)
        trainer.train(steps=3)  # training outside the ledger: committed with the next request
        ledger.forget([6])
        # The new steps were trained without id 5: its first such step is now part of the state.
        assert _written(ledger, parts) == ["exclusions", "forgotten", "params", "records__000002",
                                           "records__000003"]
        state = ledger.unlearner.state_dict()
    reopened = PCMUUnlearner(synthetic_trainer())
    DeletionLedger(reopened, str(tmp_path)).close()
    assert same(reopened.state_dict(), state)


def test_resumed_request_rewrites_from_its_step_and_a_failed_commit_restores_the_records(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger_module, "LOG_CHUNK", 8)
    trainer = digits_trainer().train(epochs=6)  # 6 epochs of 4 batches: 3 chunks
    ledger = DeletionLedger(PCMUUnlearner(trainer), str(tmp_path))
    state, files = ledger.unlearner.state_dict(), sorted(os.listdir(tmp_path))
    check = trainer.check_request([17, 300])
    if check.first_divergent_step is None:
        pytest.skip("request was certified; the resume is what this test needs")

    def fail_at_the_commit_point(journal, record):  # the record naming the new files is not written
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(ledger_module.ledger_journal.Appender, "append", fail_at_the_commit_point)
        with pytest.raises(OSError, match="disk full"):
            ledger.forget([17, 300])
    assert same(ledger.unlearner.state_dict(), state) and sorted(os.listdir(tmp_path)) == files
    assert _answer(trainer.check_request([17, 300])) == _answer(check)  # the records are the committed ones
    parts = _stored(ledger)
    answer = ledger.forget([17, 300])
    assert answer.status == "retrained"
    first_chunk = check.first_divergent_step // 8
    assert [p for p in _written(ledger, parts) if p.startswith("records")] == [
        f"records__{c:06d}" for c in range(first_chunk, ledger.ledger["logs"]["records"]["chunks"])]
    assert ledger.ledger["logs"]["records"]["chunks"] == 3
    state = ledger.unlearner.state_dict()
    ledger.close()
    reopened = PCMUUnlearner(digits_trainer())
    DeletionLedger(reopened, str(tmp_path)).close()
    assert same(reopened.state_dict(), state)
    retrained = digits_trainer(exclude=torch.tensor([17, 300])).train(epochs=6)
    assert all(torch.equal(a, b) for a, b in zip(reopened.trainer.params, retrained.params))


def test_two_ledgers_over_one_unlearner_each_keep_every_change(tmp_path, monkeypatch):
    """The log's change marks belong to the ledger that committed last: the other one, finding them
    not its own, writes the whole log instead of trusting them."""
    monkeypatch.setattr(ledger_module, "LOG_CHUNK", 4)
    trainer = synthetic_trainer().train(steps=6)
    unlearner = PCMUUnlearner(trainer)
    a = DeletionLedger(unlearner, str(tmp_path / "a"))
    b = DeletionLedger(unlearner, str(tmp_path / "b"))
    trainer.train(steps=3)
    a.forget([1])  # commits the 3 new steps and marks the log as a's
    b.forget([2])  # must still write them to b
    state = unlearner.state_dict()
    a.close(), b.close()
    for directory in ("a", "b"):
        reopened = PCMUUnlearner(synthetic_trainer())
        DeletionLedger(reopened, str(tmp_path / directory)).close()
        assert reopened.trainer.steps_done == 9
        assert same(reopened.state_dict()["records"], state["records"])


def test_a_part_changed_in_the_tensor_the_ledger_loaded_is_written(tmp_path):
    with DeletionLedger(ToyUnlearner(keeps_loaded=True), str(tmp_path)) as ledger:
        ledger.forget([1])
    toy = ToyUnlearner(keeps_loaded=True)
    with DeletionLedger(toy, str(tmp_path)) as ledger:  # toy.w is now the tensor the ledger loaded
        ledger.forget([2])                               # and changes in place
        w = _bits(toy.w)
    reopened = ToyUnlearner()
    DeletionLedger(reopened, str(tmp_path)).close()
    assert _bits(reopened.w) == w and w != _bits(torch.zeros(4))


def test_a_request_certified_a_priori_reads_no_step_record(tmp_path, monkeypatch):
    """The request path of a certified deletion (the check, the report, the commit) reads the
    per-step arrays, never a step record, so its cost does not follow the records' size."""
    trainer = synthetic_trainer().train(steps=12)
    with DeletionLedger(PCMUUnlearner(trainer), str(tmp_path)) as ledger:
        ledger.forget([1])

        def no_reading(*args):
            raise AssertionError("a step record was read")

        with monkeypatch.context() as m:
            for name in ("__getitem__", "__iter__"):
                m.setattr(StepLog, name, no_reading)
            assert ledger.forget([2]).how == "a-priori (m*)"
        state = ledger.unlearner.state_dict()
    reopened = PCMUUnlearner(synthetic_trainer())
    DeletionLedger(reopened, str(tmp_path)).close()
    assert same(reopened.state_dict(), state)
