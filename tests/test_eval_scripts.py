"""The per-method scripts are thin wrappers of the evaluation harness: on a tiny configuration a
script's records and table equal the harness's and `unlearn-ext eval --setting`'s (wall times
aside), and the peak-memory column measures what its schema says."""
import copy
import importlib.util
import json
import os

import pytest
import torch

from unlearn_ext import cli
from unlearn_ext.evaluate import report, settings, summarize
from unlearn_ext.evaluate.harness import TIMING_FIELDS
from unlearn_ext.evaluate.memory import PeakMemory

SCRIPTS = os.path.join(os.path.dirname(__file__), "..", "scripts")
TIMING = TIMING_FIELDS  # measured, not computed: differ run to run


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in json.loads(json.dumps(records, default=float))]


def _table_without_timing(records):
    drop = [i for i, (key, _, _) in enumerate(report.COLUMNS) if key in TIMING]
    return [[c for i, c in enumerate(row) if i not in drop] for row in report.rows_for(summarize(records))]


def _cli_records(tmp_path, setting, methods, seed=0):
    path = tmp_path / "cli.json"
    assert cli.main(["eval", "--setting", setting, "--methods", methods, "--ratios", "0.1", "--seeds", str(seed),
                     "--epochs", "2", "--noise-floor", "0", "--no-ud", "--quiet", "--json", str(path)]) == 0
    return json.loads(path.read_text())["records"]


def test_history_script_equals_the_harness_and_the_cli(tmp_path):
    ev = _script("eval_history_methods")
    path = tmp_path / "script.json"
    assert ev.main(["--settings", "logreg", "--seeds", "0", "--ratios", "0.1", "--epochs", "2", "--json",
                    str(path), "--out", str(tmp_path / "table.md")]) == 0
    got = json.loads(path.read_text())["records"]
    want = settings.evaluate_setting("history-logreg", methods=["mini", "mini-int8", "deltagrad"], ratios=[0.1],
                                     seeds=[0], epochs=2, noise_floor_seeds=0)
    assert {r["method"] for r in got} == {"original", "retrain", "mini", "mini-int8", "deltagrad"}
    assert _without_timing(got) == _without_timing(want)
    assert _table_without_timing(got) == _table_without_timing(want)
    from_cli = _cli_records(tmp_path, "history-logreg", "mini,mini-int8,deltagrad")
    assert _without_timing(from_cli) == _without_timing(want)
    assert "| mini-int8 |" in (tmp_path / "table.md").read_text()


def test_perturb_script_equals_the_harness_and_the_cli(tmp_path):
    ev = _script("eval_perturb")
    path = tmp_path / "script.json"
    methods = "finetune,topk-ascent,randomk-dampen"
    assert ev.main(["--setting", "memorizing", "--seed", "1", "--ratios", "0.1", "--epochs", "2",
                    "--noise-floor", "0", "--no-ud", "--methods", methods, "--json", str(path)]) == 0
    got = json.loads(path.read_text())["records"]
    assert {r.pop("setting") for r in got} == {"memorizing"}
    want = settings.evaluate_setting("memorizing", methods=methods.split(","), ratios=[0.1], seeds=[1], epochs=2,
                                     noise_floor_seeds=0)
    assert len(got) == 5 and _without_timing(got) == _without_timing(want)
    from_cli = _cli_records(tmp_path, "memorizing", methods, seed=1)
    assert _without_timing(from_cli) == _without_timing(want)
    ds = settings.get("memorizing").dataset(1)
    assert len(ds.y) == 300  # the setting's data: 300 samples
    # label flips are drawn per training seed: seed 1's labels differ from seed 0's
    assert not torch.equal(ds.y, settings.get("memorizing").dataset(0).y)


def test_cli_setting_refuses_options_it_fixes(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["eval", "--setting", "memorizing", "--model", "logreg", "--quiet"])
    assert exc.value.code == 2
    assert "--setting memorizing fixes" in capsys.readouterr().err


def test_method_rows_carry_cpu_peak_memory():
    records = settings.evaluate_setting("history-logreg", methods=["finetune"], ratios=[0.1], seeds=[0], epochs=1,
                                        noise_floor_seeds=0)
    row = next(r for r in records if r["method"] == "finetune")
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("peak resident memory is measured on Linux only")
    assert row["peak_memory_kind"] == "cpu_rss_growth" and row["peak_memory_bytes"] >= 0
    assert all(r["peak_memory_bytes"] is None for r in records if r["method"] in ("original", "retrain"))


def test_peak_memory_sees_torch_allocations():
    """128 MiB of fresh torch memory, freed before the block ends, shows in the peak (tracemalloc
    would see none of it)."""
    with PeakMemory() as peak:
        big = torch.ones(32 * 2**20)  # 128 MiB, above glibc's mmap threshold: fresh pages
        del big
    if peak.bytes is None:
        pytest.skip("peak resident memory is measured on Linux only")
    assert peak.bytes >= 120 * 2**20
    assert peak.kind == "cpu_rss_growth"


def test_noise_floor_is_retraining_from_other_seeds_against_the_reference():
    """Each floor gap is |test / MIA of a retrain from seed + 1000 j (other initial weights and batch
    order) - the reference retrain's|, recomputed here outside the harness; the first of them is the
    `retrain-other` row's retrain; the max fields are the max of the gaps."""
    from unlearn_ext.data import retrain
    from unlearn_ext.evaluate import harness, methods

    named = settings.get("perturb-digits")
    records = settings.evaluate_setting("perturb-digits", methods=["retrain-other"], ratios=[0.05], seeds=[0],
                                        epochs=2, noise_floor_seeds=2)
    gold = next(r for r in records if r["method"] == "retrain")
    other = next(r for r in records if r["method"] == "retrain-other")
    ds, _ = harness.carve_validation(named.dataset(0))  # the test pool less the validation split, as evaluate()
    data, initial, config = named.training(0, epochs=2)
    forget = harness.forget_ids(data, 0.05, 0)
    want_test, want_mia = [], []
    for j in (1, 2):
        seed = 1000 * j
        m = harness.measure(retrain(methods.reinitialized(initial, seed), data,
                                     methods.other_seed_config(config, seed), forget), ds, data, forget)
        want_test.append(abs(m["test_acc"] - gold["test_acc"]))
        want_mia.append(abs(m["mia_auc"] - gold["mia_auc"]))
    assert gold["retrain_floor_test_gaps"] == pytest.approx(want_test)
    assert gold["retrain_floor_mia_gaps"] == pytest.approx(want_mia)
    assert gold["retrain_floor_mia_gap"] == max(gold["retrain_floor_mia_gaps"])
    assert gold["retrain_floor_test_gap"] == max(gold["retrain_floor_test_gaps"])
    assert other["mia_gap"] == pytest.approx(want_mia[0])
    none = settings.evaluate_setting("perturb-digits", methods=["finetune"], ratios=[0.05], seeds=[0], epochs=2,
                                     noise_floor_seeds=0)
    assert all(r["retrain_floor_test_gaps"] == [] and r["retrain_floor_mia_gap"] is None for r in none)


def test_perturb_calibration_grid_refuses_adaptive_fields_without_adaptive(capsys):
    ev = _script("eval_perturb")
    with pytest.raises(SystemExit):
        ev.main(["--calibrate", "--grid", "0.5;3;all;0;mean"])
    assert "need --adaptive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ev.main(["--calibrate", "--adaptive", "--grid", "0.5;3"])
    assert "--grid is" in capsys.readouterr().err


def test_perturb_script_overrides_build_new_entries_and_leave_the_registry_as_it_was():
    """--k / --repair-epochs reach the perturbation family through new entries (methods.perturb_family);
    the registry's settings, which every other caller in the process reads, stay as they were."""
    from unlearn_ext.evaluate import methods

    registry = copy.deepcopy(methods.PERTURB_SETTINGS)
    ev = _script("eval_perturb")
    payload = ev.run("memorizing", 1, [0.1], 0, False, ["topk"], 2, {"k": 0.3, "repair_epochs": 1})
    assert payload["perturb_settings"]["k"] == 0.3 and payload["perturb_settings"]["repair_epochs"] == 1
    assert methods.PERTURB_SETTINGS == registry
    run = methods.Run("d", "mlp-wide", 0, None, None, None, None, 0.0)
    assert methods.perturb_settings(run, {"k": 0.3})["k"] == 0.3 and methods.perturb_settings(run)["k"] == registry[
        "memorizing"]["k"]
    topk = [r for r in payload["records"] if r["method"] == "topk"]
    assert topk and all(r["cost_vs_retrain"] is not None for r in topk)


def test_record_bytes_script_prints_the_trainers_own_byte_counts(capsys):
    """scripts/pcmu_record_bytes.py is a wrapper of PCMUTrainer.record_bytes / estimate_record_bytes:
    its row equals what an independently trained trainer of the same setting holds, and the
    estimate made before training (every coordinate fragile) bounds what the records hold."""
    script = _script("pcmu_record_bytes")
    script.main(["--max-requests", "1"])
    row = capsys.readouterr().out.strip().splitlines()[-1]
    trainer, epochs = script.make_trainer("logreg", 1, "analytic")
    estimate = trainer.estimate_record_bytes(epochs=epochs)["per_step"]
    got = trainer.train(epochs=epochs).record_bytes()
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "1"
    assert cells[5] == f"{got['mean_per_step']:,.0f}" and cells[6] == f"{estimate:,}"
    assert got["mean_per_step"] <= estimate
    assert cells[2] == f"{got['layouts']['sparse']}/{got['layouts']['dense']}"
