"""PCMU's training settings in the harness and the CLI: each model family's profile reaches the
trainer (pcmu_profiles.py), an override (`--pcmu KEY=VALUE,...`) reaches it too and is recorded,
and a bad override is refused before any work with one line naming it (exit code 2)."""
import json

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("rich")
pytest.importorskip("matplotlib")

from unlearn_ext.cli import main  # noqa: E402
from unlearn_ext.evaluate import datasets, harness, methods, models, pcmu_profiles  # noqa: E402


def _run(data, model):
    ds = datasets.load(data, form=models.reads(model), limit=60)
    return harness.train_run(ds, model, seed=0, epochs=1)


def _trained_with(trainer, settings):
    """The trainer's configuration read back, and the steps it ran."""
    got = {"batch_size": trainer.batch_size, "clip_norm": trainer.clip_norm, "lr": trainer._lr(0),
           "tau": trainer.tau, "sigma": trainer.sigma, "max_request": trainer.max_request,
           "epochs": trainer.steps_done // trainer.schedule.batches_per_epoch}
    assert trainer.steps_done == settings["epochs"] * trainer.schedule.batches_per_epoch
    return got


@pytest.mark.parametrize("data, model, profile", [("digits", "cnn", "network"), ("digits", "mlp", "tabular"),
                                                   ("tokens", "transformer", "network")])
def test_each_model_family_trains_pcmu_with_its_profile(data, model, profile):
    assert pcmu_profiles.profile_of(model) == profile
    trainer = methods.PCMU.prepare(_run(data, model))
    assert _trained_with(trainer, pcmu_profiles.PROFILES[profile]) == pcmu_profiles.PROFILES[profile]


def test_the_network_profile_differs_from_the_tabular_one():
    """The reason the profiles exist: the tabular setting's quantizer threshold freezes a network."""
    assert pcmu_profiles.PROFILES["network"] != pcmu_profiles.PROFILES["tabular"]


def test_an_override_reaches_the_trainer_and_its_coupled_retraining():
    run = _run("digits", "cnn")
    method = methods.pcmu_method({"lr": 0.003, "epochs": 1, "max_request": 2})
    expected = {**pcmu_profiles.PROFILES["network"], "lr": 0.003, "epochs": 1, "max_request": 2}
    trainer = method.prepare(run)
    assert _trained_with(trainer, expected) == expected
    # the coupled retraining trains with the same settings: forgetting nothing gives the same weights
    retrained = method.own_retrain(run, trainer, run.data.ids[:0])
    assert all(a.equal(b) for a, b in zip(retrained.parameters(), trainer.model.parameters()))
    # the registry's entry keeps the profile
    assert _trained_with(methods.PCMU.prepare(run), pcmu_profiles.PROFILES["network"]) == \
        pcmu_profiles.PROFILES["network"]


def test_the_cli_override_reaches_the_trainer_and_is_recorded(tmp_path, monkeypatch):
    seen = []

    class Recording(methods.PCMUTrainer):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(methods, "PCMUTrainer", Recording)
    js, out = tmp_path / "r.json", tmp_path / "out"
    assert main(["eval", "--data", "digits", "--model", "cnn", "--limit", "60", "--epochs", "1", "--methods", "pcmu",
                 "--ratios", "0.1", "--seeds", "0", "--noise-floor", "0", "--no-ud", "--quiet",
                 "--pcmu", "lr=0.003,epochs=1,batch-size=32", "--json", str(js), "--out", str(out)]) == 0
    expected = {**pcmu_profiles.PROFILES["network"], "lr": 0.003, "epochs": 1, "batch_size": 32}
    assert seen and all({k: kw[k] for k in expected if k != "epochs"} ==
                        {k: v for k, v in expected.items() if k != "epochs"} for kw in seen)
    payload = json.loads(js.read_text())
    assert payload["settings"]["pcmu"] == expected
    assert "PCMU training (network profile, with --pcmu lr=0.003,epochs=1,batch-size=32): batch_size 32" in \
        (out / "report.md").read_text()
    by = {r["method"]: r for r in payload["records"]}
    assert by["pcmu"]["status"] in ("certified", "retrained")


@pytest.mark.parametrize("argv, message", [
    (["--pcmu", "lr=-1"], "--pcmu lr=-1: PCMU setting lr must be a finite number > 0, got '-1'"),
    (["--pcmu", "lr=fast"], "PCMU setting lr must be a finite number > 0, got 'fast'"),
    (["--pcmu", "epochs=2.5"], "PCMU setting epochs must be an integer >= 1, got '2.5'"),
    (["--pcmu", "max_request=-1"], "PCMU setting max_request must be an integer >= 0"),
    (["--pcmu", "momentum=0.9"], "unknown PCMU setting 'momentum'; choose from batch_size"),
    (["--pcmu", "lr"], "KEY=VALUE pairs separated by commas, got 'lr'"),
    (["--pcmu", "lr=0.1,lr=0.2"], "PCMU setting lr given twice"),
    (["--pcmu", "sigma=0"], "PCMU setting sigma must be a finite number > 0, got '0'"),
    (["--pcmu", "tau=inf"], "PCMU setting tau must be a finite number >= 0, got 'inf'"),
    (["--pcmu", ","], "give at least one PCMU setting"),
])
def test_a_bad_override_is_refused_before_any_work(tmp_path, capsys, argv, message):
    out, js = tmp_path / "out", tmp_path / "r.json"
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--data", "digits", "--model", "cnn", "--methods", "pcmu", *argv, "--out", str(out),
              "--json", str(js), "--quiet", "--no-ud"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists() and not js.exists()


def test_an_override_without_the_pcmu_method_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--data", "digits", "--model", "cnn", "--methods", "finetune", "--pcmu", "lr=0.01",
              "--quiet", "--no-ud"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "--pcmu" in err and "--methods" in err, err


def test_the_python_api_refuses_a_bad_override_when_the_method_is_built():
    with pytest.raises(pcmu_profiles.PCMUSettingError, match="PCMU setting clip_norm must be a finite number > 0"):
        methods.pcmu_method({"clip_norm": 0})


def _grid_script():
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "pcmu_networks_grid.py")
    spec = importlib.util.spec_from_file_location("pcmu_networks_grid", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_grid_script_applies_the_written_rule(tmp_path, capsys):
    """benchmarks/pcmu_networks_rule.md: the most accurate configuration within 3x plain SGD's CPU
    time wins; within 0.01 of it the cheaper 1% request wins; M is the smallest choice covering the
    most ids per batch."""
    def line(b, lr, epochs, acc, cost, most):
        return {"data": "d", "seed": 100, "batch_size": b, "lr": lr, "tau": 0.0015, "sigma": 0.0025, "epochs": epochs,
                "test_acc": acc, "plain_test_acc": 0.5, "pcmu_seconds": 1.0, "plain_seconds": 1.0, "steps": 10 * epochs,
                "most_per_batch": {"0.01": 2, "0.05": most}, "request_1pct": {"certified": False, "cost": cost}}
    timing = {"data": "d", "batch_size": 64, "tau": 0.0015, "sigma": 0.0025, "plain_cpu_seconds": 1.0,
              "pcmu_cpu_seconds_per_epoch": 0.2}  # 10 epochs: 2x, 20 epochs: 4x
    lines = [timing, {**timing, "batch_size": 128, "pcmu_cpu_seconds_per_epoch": 0.1},
             line(64, 0.01, 20, 0.99, 0.5, 9),     # the most accurate, but 4x plain SGD's time: out
             line(64, 0.01, 10, 0.90, 0.99, 5),    # within 0.01 of the best allowed, dearer request
             line(128, 0.02, 10, 0.895, 0.98, 5),  # within 0.01, the cheaper request: chosen
             line(128, 0.01, 10, 0.80, 0.10, 7)]   # cheapest request, too far below
    path = tmp_path / "g.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    _grid_script().choose([str(path)])
    out = capsys.readouterr().out
    assert "chosen: b, lr, tau, sigma, epochs = (128, 0.02, 0.0015, 0.0025, 10)" in out
    assert "most ids of a 1%/5% set in one batch: 5 -> M = 6" in out
