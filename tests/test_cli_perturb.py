"""Top-K / Random-k's settings on the command line (`unlearn-ext eval --perturb KEY=VALUE,...`):
parsed and checked (perturb_options.py), refused before any work with one line naming the problem
(exit code 2), and reaching the unlearners of the run, the held-out guard reading the harness's
validation split, never the reported test points."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("rich")
pytest.importorskip("matplotlib")

from unlearn_ext.cli import main  # noqa: E402
from unlearn_ext.evaluate import datasets, harness, methods, perturb_options  # noqa: E402

from conftest import requires_compiled  # noqa: E402


def test_parse_reads_each_key_as_its_kind():
    assert perturb_options.parse("k=0.1, repair-epochs=3,guard=0.01,guard_budget=none,guard_rounds=0") == \
        {"k": 0.1, "repair_epochs": 3, "guard": 0.01, "guard_budget": None, "guard_rounds": 0}
    assert perturb_options.parse("guard=off") == {"guard": None}
    assert perturb_options.parse("k=1") == {"k": 1.0}


@pytest.mark.parametrize("argv, message", [
    (["--perturb", "k=0"], "--perturb k=0: perturbation setting k must be a finite number > 0, got '0'"),
    (["--perturb", "k=1.5"], "perturbation setting k must be <= 1, got '1.5'"),
    (["--perturb", "guard=1"], "perturbation setting guard must be < 1, got '1'"),
    (["--perturb", "guard=-0.1"], "perturbation setting guard must be a finite number >= 0, got '-0.1'"),
    (["--perturb", "guard=on"], "perturbation setting guard must be a finite number >= 0, got 'on'"),
    (["--perturb", "repair_epochs=2.5"], "perturbation setting repair_epochs must be an integer >= 0, got '2.5'"),
    (["--perturb", "guard_budget=0"], "perturbation setting guard_budget must be a finite number > 0, got '0'"),
    (["--perturb", "guard_size=0"], "perturbation setting guard_size must be an integer >= 1, got '0'"),
    (["--perturb", "beta=0.5"], "unknown perturbation setting 'beta'; choose from k, repair_epochs"),
    (["--perturb", "k"], "KEY=VALUE pairs separated by commas, got 'k'"),
    (["--perturb", "k=0.1,k=0.2"], "perturbation setting k given twice"),
    (["--perturb", ","], "give at least one perturbation setting"),
    (["--methods", "pcmu", "--perturb", "k=0.1"], "--perturb sets the settings of finetune, topk"),
    # a key a selected method would not read: refused, naming the key and the methods that ignore it
    (["--methods", "finetune", "--perturb", "k=0.2,guard=0.02"],
     "--perturb k, guard: not read by finetune (it reads repair_epochs)"),
    (["--methods", "topk-adaptive", "--perturb", "k=0.2"],
     "--perturb k: not read by topk-adaptive (it reads repair_epochs, repair_lr_factor)"),
    (["--methods", "topk,finetune", "--perturb", "k=0.2,repair_epochs=2"],
     "--perturb k: not read by finetune (it reads repair_epochs)"),
    (["--methods", "topk,randomk-adaptive", "--perturb", "guard=0.02"],
     "--perturb guard: not read by randomk-adaptive"),
    (["--methods", "topk", "--perturb", "guard_rounds=2"], "--perturb guard_rounds: not read by topk"),
])
def test_a_bad_perturb_option_is_refused_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--data", "digits", "--model", "cnn", "--ratios", "0.1", *(
            argv if "--methods" in argv else ["--methods", "topk", *argv])])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.count("\n") == 0 and message in err, err


def test_the_harness_carves_the_validation_split_off_the_test_pool():
    ds = datasets.load("digits", form="grid")
    tested, (xv, yv) = harness.carve_validation(ds)
    assert len(yv) == round(harness.VALIDATION_FRACTION * len(ds.y_test)) and len(tested.y_test) + len(yv) == \
        len(ds.y_test)
    # every test sample is in exactly one of the two
    rows = lambda x: {tuple(r.reshape(-1).tolist()) for r in x}  # noqa: E731
    assert rows(xv).isdisjoint(rows(tested.x_test)) and rows(xv) | rows(tested.x_test) == rows(ds.x_test)


@requires_compiled
def test_the_cli_settings_reach_the_unlearner_and_the_guard_reads_the_validation_split(tmp_path, monkeypatch):
    seen = []
    real = methods.perturb_family

    def recording(**overrides):
        family = real(**overrides)
        topk = family["topk"]

        def build(run, prepared):
            u = topk.build(run, prepared)
            seen.append((u, run))
            return u
        family["topk"] = methods.Method("topk", "retrain", build=build)
        return family

    monkeypatch.setattr(methods, "perturb_family", recording)
    js = tmp_path / "r.json"
    assert main(["eval", "--data", "digits", "--model", "cnn", "--limit", "80", "--epochs", "1", "--methods", "topk",
                 "--ratios", "0.1", "--seeds", "0", "--noise-floor", "0", "--no-ud", "--quiet",
                 "--perturb", "k=0.2,repair_epochs=1,guard=0.02,guard_rounds=1,guard_budget=none",
                 "--json", str(js)]) == 0
    (u, run), = seen
    assert (u.k, u.repair_epochs, u.guard, u.guard_rounds, u.guard_budget) == (0.2, 1, 0.02, 1, None)
    assert u.guard_data is not None and torch.equal(u.guard_data[0], run.validation[0])
    tested, validation = harness.carve_validation(datasets.load("digits", form="grid", limit=80))
    assert torch.equal(run.validation[1], validation[1])
    row, = [r for r in json.loads(js.read_text())["records"] if r["method"] == "topk"]
    assert row["details"]["guard_probe"] == "held-out" and "guard_stop" in row["details"]


def test_a_key_a_method_ignores_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    trained = []
    monkeypatch.setattr(harness, "train_run", lambda *a, **k: trained.append(a) or pytest.fail("trained"))
    out, js = tmp_path / "out", tmp_path / "r.json"
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--data", "digits", "--model", "mlp", "--ratios", "0.1", "--methods", "topk,topk-adaptive",
              "--perturb", "k=0.2,guard=0.02", "--out", str(out), "--json", str(js)])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.count("\n") == 0, err
    assert "--perturb k, guard: not read by topk-adaptive" in err and "topk," not in err, err
    assert not trained and not out.exists() and not js.exists()


def test_keys_every_selected_method_reads_are_accepted_and_noted_per_method():
    # finetune and the adaptive K both read repair_epochs; the fixed-K variants read the guard's keys
    assert methods.perturb_keys_ignored(["finetune", "topk-adaptive", "topk", "mini"], "mlp",
                                        {"repair_epochs": 2}) == {}
    assert methods.perturb_keys_ignored(["topk", "randomk-masked"], "cnn",
                                        {"k": 0.2, "guard": 0.02, "guard_rounds": 1, "guard_budget": None}) == {}
    assert methods.perturb_keys_ignored(["topk", "finetune"], "cnn", {"k": 0.2, "repair_epochs": 2}) == \
        {"k": ["finetune"]}


def write_npz(path, n_test):
    rng = np.random.default_rng(0)
    x, x_test = rng.normal(size=(60, 4)).astype(np.float32), rng.normal(size=(n_test, 4)).astype(np.float32)
    np.savez(path, x=x, y=(x[:, 0] > 0).astype(np.int64), x_test=x_test, y_test=(x_test[:, 0] > 0).astype(np.int64))
    return str(path)


def test_the_guard_on_a_test_pool_too_small_for_a_validation_split_is_refused_before_training(tmp_path, capsys,
                                                                                             monkeypatch):
    trained = []
    monkeypatch.setattr(harness, "train_run", lambda *a, **k: trained.append(a) or pytest.fail("trained"))
    data, js = write_npz(tmp_path / "one.npz", n_test=1), tmp_path / "r.json"
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--data", data, "--model", "mlp", "--ratios", "0.1", "--methods", "topk",
              "--perturb", "guard=0.02", "--json", str(js)])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.count("\n") == 0, err
    assert "the test pool has 1 sample" in err and "at least 2" in err, err
    assert not trained and not js.exists()
    # the API refuses it too, before training
    with pytest.raises(ValueError, match="the test pool has 1 sample"):
        harness.evaluate(datasets.load(data), model="mlp", methods=[methods.perturb_family(guard=0.02)["topk"]],
                         ratios=(0.1,))
    assert not trained


def test_a_test_pool_of_two_gives_one_validation_and_one_test_sample(tmp_path):
    tested, (xv, yv) = harness.carve_validation(datasets.load(write_npz(tmp_path / "two.npz", n_test=2)))
    assert len(yv) == 1 and len(tested.y_test) == 1


@requires_compiled
def test_the_report_notes_the_settings_with_the_methods_that_read_them(tmp_path):
    out = tmp_path / "out"
    assert main(["eval", "--data", "digits", "--model", "mlp", "--limit", "80", "--epochs", "1", "--methods",
                 "topk,finetune,mini", "--ratios", "0.1", "--seeds", "0", "--noise-floor", "0", "--no-ud", "--quiet",
                 "--perturb", "repair_epochs=1", "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "perturbation settings (--perturb, over the model family's) of topk, finetune: {'repair_epochs': 1}" \
        in text, text
