"""Top-K / Random-k's settings on the command line (`unlearn-ext eval --perturb KEY=VALUE,...`):
parsed and checked (perturb_options.py), refused before any work with one line naming the problem
(exit code 2), and reaching the unlearners of the run, the held-out guard reading the harness's
validation split, never the reported test points."""
import json

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
