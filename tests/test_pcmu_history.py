"""PCMU's step records in a disk history store (pcmu/history.py): the same records as in memory,
reopening after a crash, the fallback's rewrite (rewind), readers, one writer, and requests through
the deletion ledger with the records committed by reference."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from unlearn_ext.history.file import HistoryConflictError, HistoryFile, HistoryLockedError
from unlearn_ext.history.store import HistoryStore
from unlearn_ext.ledger import DeletionLedger, read_ledger
from unlearn_ext.pcmu import PCMUUnlearner
from unlearn_ext.pcmu import history as pcmu_history
from unlearn_ext.pcmu.history import WEIGHTS, fields, load_records
from unlearn_ext.pcmu.records import PCMUStep

from unlearn_ext.pcmu import PCMUTrainer

from pcmu_settings import digits_data, digits_trainer, first_difference, linear, params_equal

DIGITS = dict(clip_norm=1.0, lr=0.05, tau=0.006, sigma=0.01)  # pcmu_settings.digits_trainer's
EPOCHS = 2  # 8 steps of the digits setting (batch 350)
# A request the per-request check does not certify in this setting: it resumes from a step > 0.
DIVERGENT = [17, 300]


# Stored weights every few steps here (every 256 by default), so that the runs of a few steps below
# reopen, replay, rewind and roll back across them.
WEIGHTS_EVERY = 3


@pytest.fixture(autouse=True)
def weights_every_few_steps(monkeypatch):
    monkeypatch.setattr(pcmu_history, "WEIGHTS_EVERY", WEIGHTS_EVERY)


def same_records(a, b) -> bool:
    """Every record of `a` and `b` is the same bit for bit (to_record's tensors and scalars)."""
    if len(a) != len(b):
        return False
    for ra, rb in zip(a, b):
        (ta, ma), (tb, mb) = ra.to_record(), rb.to_record()
        if (ra.step, ra.step_size, ma) != (rb.step, rb.step_size, mb) or set(ta) != set(tb):
            return False
        if not all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta):
            return False
    return True


def test_records_in_a_disk_store_are_the_in_memory_records(tmp_path):
    stored = digits_trainer(history=str(tmp_path / "h")).train(epochs=EPOCHS)
    memory = digits_trainer().train(epochs=EPOCHS)
    assert same_records(stored.records, memory.records) and params_equal(stored, memory)
    assert stored.certificate() == memory.certificate() and stored.record_bytes() == memory.record_bytes()
    # The store holds exactly those records: read back from the file by another handle.
    stored.close()
    with HistoryStore.open(str(tmp_path / "h"), writable=False) as reader:
        assert len(reader) == memory.steps_done
        assert same_records(load_records(reader), memory.records)


def test_reopening_after_a_crash_continues_as_the_uninterrupted_run(tmp_path):
    """A crash cut the last record: reopening drops it (reported) and restores the steps before
    it; training on and answering requests then gives what the uninterrupted run gives."""
    path, crashed = str(tmp_path / "h"), str(tmp_path / "crashed")
    writer = digits_trainer(history=path).train(epochs=EPOCHS)
    shutil.copy(path, crashed)  # the file as the killed process left it: every record flushed...
    with open(crashed, "r+b") as f:  # ...but the last one cut short
        f.truncate(os.path.getsize(crashed) - 10)
    writer.close()
    with pytest.warns(RuntimeWarning, match="dropped .* bytes"):
        resumed = digits_trainer(history=crashed)
    assert resumed.history.recovery.dropped_records == 1
    steps = EPOCHS * resumed.schedule.batches_per_epoch
    assert resumed.steps_done == steps - 1
    resumed.train(steps=1)
    uninterrupted = digits_trainer().train(epochs=EPOCHS)
    assert params_equal(resumed, uninterrupted) and same_records(resumed.records, uninterrupted.records)
    assert resumed.certificate() == uninterrupted.certificate()
    ra, rb = PCMUUnlearner(resumed).unlearn(DIVERGENT), PCMUUnlearner(uninterrupted).unlearn(DIVERGENT)
    assert (ra.status, ra.how) == (rb.status, rb.how)
    assert params_equal(resumed, uninterrupted) and same_records(resumed.records, uninterrupted.records)


def test_a_crash_cutting_a_record_that_holds_weights_reopens_from_the_weights_before(tmp_path):
    """The record cut by the crash is one holding the weights (step 6): reopening drops it with its
    weights, rebuilds w_6 from step 3's weights and the codes after them, and the retrained step 6
    stores them again, bit for bit the uninterrupted run's."""
    path, crashed = str(tmp_path / "h"), str(tmp_path / "crashed")
    writer = digits_trainer(history=path).train(steps=7)
    shutil.copy(path, crashed)  # the file as the killed writer left it (no closing record)...
    writer.close()
    with open(crashed, "r+b") as f:  # ...cut inside its last record, step 6
        f.truncate(os.path.getsize(crashed) - 10)
    with pytest.warns(RuntimeWarning, match="dropped .* bytes"):
        resumed = digits_trainer(history=crashed)
    assert resumed.steps_done == 6 and stored_weight_steps(resumed.history) == [0, 3]
    uninterrupted = digits_trainer().train(steps=6)
    assert params_equal(resumed, uninterrupted)
    resumed.train(steps=2)
    uninterrupted.train(steps=2)
    assert params_equal(resumed, uninterrupted) and same_records(resumed.records, uninterrupted.records)
    assert stored_weight_steps(resumed.history) == [0, 3, 6]
    s, w = resumed.records.keyframe(6)
    assert s == 6 and all(torch.equal(a, b) for a, b in zip(w, uninterrupted.replay(6)))
    resumed.close()


def test_a_failed_read_of_the_weights_to_store_stops_the_recording(tmp_path, monkeypatch):
    """Storing step 3's weights replays them from the file; when that read fails, the step is not
    recorded (the trainer's per-step arrays stay those of the records) and no later step is either
    (the model's weights have moved past the records): a retry would record step 3 a second
    update away from them. Reopening gives the records' own run."""
    path = str(tmp_path / "h")
    trainer = digits_trainer(history=path).train(steps=3)
    saved = trainer.state_dict()

    def failing(store, step, names=None, **kw):
        raise OSError("simulated read error")

    with monkeypatch.context() as m:
        m.setattr(HistoryStore, "read", failing)
        with pytest.raises(OSError, match="simulated read error"):
            trainer.train(steps=1)
    assert trainer.steps_done == 3 and trainer._steps == 3 and len(trainer.history) == 3
    with pytest.raises(RuntimeError, match="recording step 3 failed"):
        trainer.train(steps=1)
    assert len(trainer.history) == 3
    # Rolling back to a saved state (what a ledger does; the store had nothing to cut) restores the
    # weights, and recording goes on as the uninterrupted run.
    trainer.load_state_dict(saved)
    assert params_equal(trainer.train(steps=2), digits_trainer().train(steps=5))
    trainer.close()
    reopened = digits_trainer(history=path)
    assert params_equal(reopened, digits_trainer().train(steps=5))
    reopened.close()


# The child trains into the store until it is killed (SIGKILL: no close, no flush beyond each record's).
KILLED_CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[2])
    from pcmu_settings import digits_trainer
    import unlearn_ext.pcmu.history
    unlearn_ext.pcmu.history.WEIGHTS_EVERY = int(sys.argv[3])
    trainer = digits_trainer(history=sys.argv[1])
    for _ in range(10000):
        trainer.train(steps=1)
        print(trainer.steps_done, flush=True)
""")


def test_a_killed_training_process_reopens_at_its_last_whole_record(tmp_path):
    path = str(tmp_path / "h")
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.path.dirname(tests) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, path, tests, str(WEIGHTS_EVERY)],
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        for line in child.stdout:  # kill it mid-training, once it has recorded a few steps
            if int(line) >= 6:
                break
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    reopened = digits_trainer(history=path)
    done = reopened.steps_done
    assert done >= 6
    uninterrupted = digits_trainer().train(steps=done)
    assert params_equal(reopened, uninterrupted) and same_records(reopened.records, uninterrupted.records)
    reopened.train(steps=3)
    uninterrupted.train(steps=3)
    assert params_equal(reopened, uninterrupted) and reopened.certificate() == uninterrupted.certificate()
    reopened.close()


def test_a_reopened_store_restores_the_initial_weights(tmp_path):
    """The initial weights are in the store (step 0): a trainer over a model initialized otherwise
    replays the recorded trajectory from them."""
    path = str(tmp_path / "h")
    digits_trainer(history=path).train(epochs=EPOCHS).close()
    x, y, _, _ = digits_data()
    other = linear(64, 10, zero=False, seed=5)
    reopened = PCMUTrainer(other, torch.nn.functional.cross_entropy, (x, y), history=path,
                           **dict(DIGITS, batch_size=350, max_request=3, seed=0))
    trained = digits_trainer().train(epochs=EPOCHS)
    assert all(torch.equal(a, b) for a, b in zip(reopened.initial, digits_trainer().initial))
    assert params_equal(reopened, trained) and same_records(reopened.records, trained.records)
    reopened.close()


def stored_weight_steps(store) -> list:
    return [t for t in range(len(store)) if store.holds_field(t, WEIGHTS)]


def test_the_store_holds_the_weights_every_few_steps_and_replays_from_them(tmp_path):
    """Step 0 and every WEIGHTS_EVERY-th step hold the weights they start from, which are the
    in-memory run's replayed w_t bit for bit; replaying any w_t from them gives the in-memory
    run's w_t."""
    stored = digits_trainer(history=str(tmp_path / "h")).train(steps=10)
    memory = digits_trainer().train(steps=10)
    assert stored_weight_steps(stored.history) == [0, 3, 6, 9]
    for t in (3, 6, 9):
        s, w = stored.records.keyframe(t)
        assert s == t and all(torch.equal(a, b) for a, b in zip(w, memory.replay(t)))
    for t in range(11):
        assert all(torch.equal(a, b) for a, b in zip(stored.replay(t), memory.replay(t)))
    stored.close()


def test_a_reopen_reads_only_the_last_stored_weights_and_the_codes_after_them(tmp_path, monkeypatch):
    """Reopening a store of T steps reads step 0's initial weights, the last stored weights and the
    records after them (fewer than WEIGHTS_EVERY), whatever T: the per-step arrays come from the
    store's index. The reopened trainer is the uninterrupted run, and trains on as it."""
    path = str(tmp_path / "h")
    digits_trainer(history=path).train(steps=11).close()
    read = []
    real = HistoryStore.read

    def counted(store, step, names=None, **kw):
        read.append(step)
        return real(store, step, names, **kw)

    with monkeypatch.context() as m:
        m.setattr(HistoryStore, "read", counted)
        reopened = digits_trainer(history=path)
    assert set(read) <= {0, 9, 10}  # stored weights at 0, 3, 6, 9: from 9 on
    uninterrupted = digits_trainer().train(steps=11)
    assert params_equal(reopened, uninterrupted)
    assert reopened.certificate() == uninterrupted.certificate()
    reopened.train(steps=3)
    uninterrupted.train(steps=3)
    assert params_equal(reopened, uninterrupted) and same_records(reopened.records, uninterrupted.records)
    assert stored_weight_steps(reopened.history) == [0, 3, 6, 9, 12]
    reopened.close()


def test_a_store_backed_trainer_holds_no_record_in_memory(tmp_path):
    """The records are read from the file when needed: neither training into the store nor
    reopening it leaves step records in memory, and a request certified a priori reads none."""
    import gc

    def records_alive() -> int:
        gc.collect()
        return sum(type(o) is PCMUStep for o in gc.get_objects())

    path = str(tmp_path / "h")
    before = records_alive()
    trainer = digits_trainer(history=path, sigma=0.05, tau=0.2).train(steps=12)
    assert records_alive() == before
    trainer.close()
    trainer = digits_trainer(history=path, sigma=0.05, tau=0.2)
    assert records_alive() == before and trainer.steps_done == 12
    trainer.history.bytes_read = 0
    report = PCMUUnlearner(trainer).unlearn([3])
    assert report.how == "a-priori (m*)" and trainer.history.bytes_read == 0
    trainer.close()


def test_a_file_with_the_initial_weights_only_still_reopens(tmp_path, monkeypatch):
    """Files written before the stored weights hold them at step 0 only: reopening replays every
    step from there, and the steps trained on store weights again."""
    path = str(tmp_path / "h")
    monkeypatch.setattr(pcmu_history, "WEIGHTS_EVERY", 10**9)
    digits_trainer(history=path).train(steps=7).close()
    monkeypatch.setattr(pcmu_history, "WEIGHTS_EVERY", WEIGHTS_EVERY)
    reopened = digits_trainer(history=path)
    assert stored_weight_steps(reopened.history) == [0]
    uninterrupted = digits_trainer().train(steps=7)
    assert params_equal(reopened, uninterrupted)
    reopened.train(steps=3)
    uninterrupted.train(steps=3)
    assert params_equal(reopened, uninterrupted) and stored_weight_steps(reopened.history) == [0, 9]
    reopened.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_replays_and_reopens_in_its_own_dtype(tmp_path, dtype):
    """The weights are stored as float32 (exactly, from the parameters' values): read back they take
    the parameters' dtype again, so replaying from them (a request's check, the fallback) and
    reopening follow the run's own half-precision arithmetic, as the in-memory records do."""
    x, y, _, _ = digits_data()

    def half_trainer(**kw):
        return PCMUTrainer(linear(64, 10, zero=False).to(dtype), torch.nn.functional.cross_entropy,
                           (x.to(dtype), y), batch_size=350, max_request=3, seed=0, **DIGITS, **kw)

    path = str(tmp_path / "h")
    stored, memory = half_trainer(history=path).train(steps=8), half_trainer().train(steps=8)
    assert params_equal(stored, memory)
    for t in (2, 4, 7, 8):
        replayed = stored.replay(t)
        assert all(a.dtype == dtype and torch.equal(a, b) for a, b in zip(replayed, memory.replay(t)))
    stored.close()
    reopened = half_trainer(history=path)
    assert all(w.dtype == dtype for w in reopened.initial) and params_equal(reopened, memory)
    reopened.train(steps=2)
    memory.train(steps=2)
    assert params_equal(reopened, memory)
    reopened.close()


def test_the_fallback_rewrites_from_t0_and_readers_never_see_a_mix(tmp_path):
    path = str(tmp_path / "h")
    trainer = digits_trainer(history=path).train(epochs=EPOCHS)
    before = list(trainer.records)
    early = HistoryStore.open(path, writable=False)  # opened before the rewrite
    report = PCMUUnlearner(trainer).unlearn(DIVERGENT)
    assert report.status == "retrained"
    t0 = report.details["first_divergent_step"]
    retrained = digits_trainer(exclude=torch.tensor(DIVERGENT)).train(epochs=EPOCHS)
    assert params_equal(trainer, retrained) and first_difference(trainer, retrained) is None
    # The early reader still reads the old steps, whole; a reader opening now reads the new ones.
    assert same_records(load_records(early), before)
    early.close()
    with HistoryStore.open(path, writable=False) as late:
        now = load_records(late)
    assert same_records(now, trainer.records) and same_records(now[:t0], before[:t0])
    assert not same_records(now[t0:], before[t0:])
    # And a writer reopening it restores the rewritten records (read from the file: before closing it).
    rewritten = list(trainer.records)
    trainer.close()
    again = digits_trainer(history=path)
    assert same_records(again.records, rewritten) and params_equal(again, retrained)


def test_one_writer_and_another_configuration_refused(tmp_path):
    path = str(tmp_path / "h")
    trainer = digits_trainer(history=path).train(steps=2)
    with pytest.raises(HistoryLockedError, match="one writer per file"):
        digits_trainer(history=path)
    reader = HistoryStore.open(path, writable=False)  # a reader opening during training
    trainer.train(steps=1)
    assert same_records(load_records(reader), trainer.records[:2])
    reader.close()
    trainer.close()
    with pytest.raises(ValueError, match=r"another PCMU model or configuration \(differs in: max_request, rounding_margin\)"):
        digits_trainer(history=path, max_request=2)
    with pytest.raises(ValueError, match="another learning rate"):
        digits_trainer(history=path, lr=0.07)
    with pytest.raises(TypeError, match="history must be a path or a HistoryStore"):
        digits_trainer(history=3)
    with pytest.raises(ValueError, match="PCMU records into a disk store made with"):
        digits_trainer(history=HistoryStore(fields(1), tier="host"))


def test_a_store_given_as_an_object(tmp_path):
    """history= a disk HistoryStore made with pcmu.history.fields: the same records as a path."""
    store = HistoryStore(fields(2), tier="disk", path=str(tmp_path / "h"))
    trainer = digits_trainer(history=store).train(steps=3)
    assert trainer.history is store and len(store) == 3
    assert same_records(load_records(store), digits_trainer().train(steps=3).records)
    trainer.close()


def test_rewind_and_rollback_of_the_store(tmp_path):
    """The store's own operations: a rewind supersedes steps, a rollback to a mark restores them; a
    mark of another file's content is refused and nothing is cut."""
    path = str(tmp_path / "h")
    trainer = digits_trainer(history=path).train(epochs=EPOCHS)
    store, before = trainer.history, list(trainer.records)
    mark = store.mark()
    trainer.resume_without(torch.tensor(DIVERGENT), 3)
    assert store.mark() != mark and not same_records(load_records(store), before)
    store.rollback(mark)
    assert store.mark() == mark and same_records(load_records(store), before)
    with pytest.raises(HistoryConflictError, match="does not begin with the records of the mark"):
        store.rollback({"bytes": mark["bytes"], "digest": "0" * 64})
    assert store.mark() == mark


# ---- through the deletion ledger --------------------------------------------------------------------

def ledger_over(path, directory, **kw):
    trainer = digits_trainer(history=path, **kw)
    return trainer, DeletionLedger(PCMUUnlearner(trainer), directory)


def test_ledger_commits_the_store_by_reference(tmp_path):
    path, directory = str(tmp_path / "h"), str(tmp_path / "ledger")
    trainer, ledger = ledger_over(path, directory)
    trainer.train(epochs=EPOCHS)
    ledger.forget([5])
    names = set(ledger.ledger["parts"]) | set(ledger.ledger["inline"])
    assert "history" in names and not any(n.startswith("records") for n in names)  # never copied
    assert not ledger.ledger["logs"]
    report = ledger.forget(DIVERGENT)
    assert report.status == "retrained"
    forgotten = torch.tensor(sorted(set(DIVERGENT) | {5}))
    retrained = digits_trainer(exclude=forgotten).train(epochs=EPOCHS)
    assert params_equal(trainer, retrained)
    # Restart: the same trainer and ledger over the same files give the committed state.
    ledger.close(), trainer.close()
    trainer2, ledger2 = ledger_over(path, directory)
    assert params_equal(trainer2, retrained) and same_records(trainer2.records, retrained.records)
    assert ledger2.forgotten == forgotten.tolist() and len(ledger2.requests) == 2
    assert trainer2.certificate() == retrained.certificate()
    ledger2.close(), trainer2.close()


def test_a_certified_request_leaves_the_store_as_it_was(tmp_path):
    """A setting where requests are certified (wider smoothing): the commit names the same records,
    the store file is not written, and the ledger holds no record."""
    path, directory = str(tmp_path / "h"), str(tmp_path / "ledger")
    trainer, ledger = ledger_over(path, directory, sigma=0.05, tau=0.2)
    trainer.train(epochs=EPOCHS)
    ledger.forget([3])  # commits the trained steps (their mark)
    with open(path, "rb") as f:
        before = f.read()
    committed = read_ledger(directory)["inline"]["history"]
    report = ledger.forget(DIVERGENT)
    assert report.status == "certified" and not report.weights_changed
    with open(path, "rb") as f:
        assert f.read() == before
    assert read_ledger(directory)["inline"]["history"] == committed
    assert not any(n.startswith("records") for n in os.listdir(directory))
    ledger.close(), trainer.close()


def test_a_failed_commit_restores_the_rewritten_records(tmp_path, monkeypatch):
    path, directory = str(tmp_path / "h"), str(tmp_path / "ledger")
    trainer, ledger = ledger_over(path, directory)
    trainer.train(epochs=EPOCHS)
    ledger.forget([5])
    params, records, mark = [p.clone() for p in trainer.params], list(trainer.records), trainer.history.mark()
    import unlearn_ext.ledger as ledger_module

    def full_disk(path, write):
        raise OSError("simulated full disk")

    monkeypatch.setattr(ledger_module, "atomic_write", full_disk)
    with pytest.raises(OSError, match="full disk"):
        ledger.forget(DIVERGENT)  # retrains from t0 (rewinding the store), then the commit fails
    monkeypatch.undo()
    assert ledger.forgotten == [5] and len(ledger.requests) == 1
    assert all(torch.equal(a, b) for a, b in zip(params, trainer.params))
    assert same_records(trainer.records, records) and trainer.history.mark() == mark
    assert same_records(load_records(trainer.history), records)
    # The retry gives what an uninterrupted request gives.
    ledger.forget(DIVERGENT)
    assert params_equal(trainer, digits_trainer(exclude=torch.tensor([5] + DIVERGENT)).train(epochs=EPOCHS))
    ledger.close(), trainer.close()


def test_a_store_write_failing_mid_fallback_is_rolled_back(tmp_path, monkeypatch):
    """A write to the store fails during the fallback's rewrite (a full disk), leaving part of a record
    in the file: the request is rolled back like any failed one (its own torn bytes cut with the rest),
    the original error is raised, and the retry gives the uninterrupted request's result."""
    path, directory = str(tmp_path / "h"), str(tmp_path / "ledger")
    trainer, ledger = ledger_over(path, directory)
    trainer.train(epochs=EPOCHS)
    ledger.forget([5])
    params, records, mark = [p.clone() for p in trainer.params], list(trainer.records), trainer.history.mark()
    real = HistoryFile._append
    seen = []

    class FullDisk:  # the file, whose next write gets half of its bytes in and then fails
        def __init__(self, f):
            self.f = f

        def write(self, b):
            self.f.write(bytes(b)[:len(b) // 2])
            self.f.flush()
            raise OSError("simulated full disk")

        def __getattr__(self, name):
            return getattr(self.f, name)

    def torn(self, header, sections, *, sync, index):
        if header.get("kind") == "step":
            seen.append(header["step"])
            if len(seen) == 2:  # the second rewritten step: part of it reaches the file
                f, self._f = self._f, FullDisk(self._f)
                try:
                    return real(self, header, sections, sync=sync, index=index)
                finally:
                    self._f = f
        return real(self, header, sections, sync=sync, index=index)

    monkeypatch.setattr(HistoryFile, "_append", torn)
    with pytest.raises(OSError, match="full disk"):
        ledger.forget(DIVERGENT)
    monkeypatch.undo()
    assert all(torch.equal(a, b) for a, b in zip(params, trainer.params))
    assert same_records(trainer.records, records) and trainer.history.mark() == mark
    ledger.forget(DIVERGENT)
    assert params_equal(trainer, digits_trainer(exclude=torch.tensor([5] + DIVERGENT)).train(epochs=EPOCHS))
    ledger.close(), trainer.close()


def test_restart_cuts_the_steps_the_ledger_never_committed(tmp_path):
    """Steps trained after the last commit (then a crash) are not the ledger's state: reopening the
    ledger cuts the store back to the records its last commit named."""
    path, directory = str(tmp_path / "h"), str(tmp_path / "ledger")
    trainer, ledger = ledger_over(path, directory)
    trainer.train(steps=4)
    ledger.forget([5])  # commits the 4 steps
    committed = [p.clone() for p in trainer.params]
    trainer.train(steps=2)  # never committed
    ledger.close(), trainer.close()
    trainer2 = digits_trainer(history=path)
    assert trainer2.steps_done == 6
    ledger2 = DeletionLedger(PCMUUnlearner(trainer2), directory)
    assert trainer2.steps_done == 4 and len(trainer2.history) == 4
    assert all(torch.equal(a, b) for a, b in zip(committed, trainer2.params))
    assert ledger2.forgotten == [5]
    ledger2.close(), trainer2.close()


def test_a_state_naming_a_store_is_refused_where_it_does_not_fit(tmp_path):
    """state_dict() of a store-backed trainer names the store (no records): an in-memory trainer
    refuses it, and so does the trainer when its store no longer begins with those records, before
    anything changes."""
    path = str(tmp_path / "h")
    trainer = digits_trainer(history=path).train(steps=3)
    state = trainer.state_dict()
    assert "records" not in state and state["history"]["steps"] == 3
    with pytest.raises(ValueError, match="names records in a history store"):
        digits_trainer().load_state_dict(state)
    with pytest.raises(ValueError, match="'history' must hold the store's bytes, digest and steps"):
        trainer.load_state_dict({**state, "history": {"bytes": "3"}})
    trainer.train(steps=1)
    params, mark = [p.clone() for p in trainer.params], trainer.history.mark()
    with pytest.raises(HistoryConflictError, match="does not begin with the records of the mark"):
        trainer.load_state_dict({**state, "history": {**state["history"], "digest": "0" * 64}})
    assert trainer.history.mark() == mark and trainer.steps_done == 4
    assert all(torch.equal(a, b) for a, b in zip(params, trainer.params))
    trainer.load_state_dict(state)  # the mark it took: back to 3 steps, the weights then
    assert trainer.steps_done == 3 and len(trainer.history) == 3
    assert params_equal(trainer, digits_trainer().train(steps=3))
    trainer.close()


def test_a_store_without_the_initial_weights_is_refused(tmp_path):
    """Steps recorded by hand without step 0's initial weights: no trajectory to replay."""
    path = str(tmp_path / "h")
    trainer = digits_trainer().train(steps=2)
    store = HistoryStore(fields(2), tier="disk", path=path, run_info={"pcmu": trainer.fingerprint()})
    for r in trainer.records:
        tensors, meta = r.to_record()
        store.record(r.step, {k: [v] for k, v in tensors.items()}, lr=r.step_size, meta=meta)
    store.close()
    with pytest.raises(ValueError, match="step 0 does not hold this model's initial weights"):
        digits_trainer(history=path)
    HistoryStore.open(path).close()  # the refusal closed the file it opened (its lock is free)


def test_a_malformed_record_after_the_last_stored_weights_is_refused_and_the_file_closed(tmp_path):
    """Reopening reads the records after the last stored weights only when it replays them: one that
    is not a PCMU record is refused, and the refusal closes the file it opened (its lock is free)."""
    path = str(tmp_path / "h")
    trainer = digits_trainer().train(steps=2)
    store = HistoryStore(fields(2), tier="disk", path=path, run_info={"pcmu": trainer.fingerprint()})
    for r in trainer.records:
        tensors, meta = r.to_record()
        tensors = {k: [v] for k, v in tensors.items() if not (r.step == 1 and k == "codes")}
        if r.step == 0:
            tensors[WEIGHTS] = [w.reshape(-1) for w in trainer.initial]
        store.record(r.step, tensors, lr=r.step_size, meta=meta)
    store.close()
    with pytest.raises(ValueError, match="step record 1 is not a PCMU record"):
        digits_trainer(history=path)
    HistoryStore.open(path).close()


def test_a_refused_state_leaves_the_store_and_the_trainer_as_they_were(tmp_path):
    """Every check of a saved state runs before the store is cut back to its mark: a ledger whose
    committed state the model refuses (another buffer), and a state whose step count is not the
    mark's, are refused naming the problem with the store's mark, the records and the weights as
    they were (the ledger's undo of a refused state then has nothing to undo), and requests go on."""
    path, directory = str(tmp_path / "h"), str(tmp_path / "ledger")
    trainer, ledger = ledger_over(path, directory)
    trainer.train(steps=4)
    ledger.forget([5])  # commits the 4 steps
    trainer.train(steps=2)  # never committed: the ledger's state cuts them
    ledger.close(), trainer.close()

    trainer = digits_trainer(history=path)
    trainer.model.register_buffer("extra", torch.zeros(2))  # not in the committed model state
    params, records, mark = [p.clone() for p in trainer.params], list(trainer.records), trainer.history.mark()
    with pytest.raises(ValueError, match=r"does not match the model's buffers: missing \['extra'\]"):
        DeletionLedger(PCMUUnlearner(trainer), directory)
    assert trainer.history.mark() == mark and len(trainer.history) == 6
    assert same_records(trainer.records, records) and same_records(load_records(trainer.history), records)
    assert all(torch.equal(a, b) for a, b in zip(params, trainer.params))

    del trainer.model._buffers["extra"]
    ledger = DeletionLedger(PCMUUnlearner(trainer), directory)  # now the committed state loads: 4 steps
    assert trainer.steps_done == 4 and ledger.forgotten == [5]
    state, mark = trainer.state_dict(), trainer.history.mark()
    trainer.train(steps=2)
    params, records, later = [p.clone() for p in trainer.params], list(trainer.records), trainer.history.mark()
    with pytest.raises(ValueError, match="holds 4 steps at the saved mark, the saved state 3"):
        trainer.load_state_dict({**state, "history": {**state["history"], "steps": 3}})
    assert trainer.history.mark() == later and same_records(trainer.records, records)
    assert same_records(load_records(trainer.history), records)
    assert all(torch.equal(a, b) for a, b in zip(params, trainer.params))
    trainer.load_state_dict(state)
    assert trainer.history.mark() == mark and trainer.steps_done == 4
    trainer.train(steps=4)
    ledger.forget(DIVERGENT)  # a following request: as retraining without every forgotten id
    assert params_equal(trainer, digits_trainer(exclude=torch.tensor([5] + DIVERGENT)).train(steps=8))
    ledger.close(), trainer.close()
