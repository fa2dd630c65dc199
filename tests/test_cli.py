"""The `unlearn-ext` command end to end on tiny configurations: the harness table, report.md and
plots, --json with its schema, a user's .npz, and a clear message and exit code 2 for every bad
option or file."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("rich")
pytest.importorskip("matplotlib")

from unlearn_ext.cli import main  # noqa: E402
from unlearn_ext.evaluate.harness import RECORD_FIELDS, TIMING_FIELDS  # noqa: E402

TINY = ["--model", "logreg", "--epochs", "2", "--ratios", "0.05", "--seeds", "0", "--noise-floor", "1",
        "--quiet", "--limit", "300"]


def write_npz(path, n=120, d=5, classes=3, seed=0, **extra):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1)
    arrays = {"x": x, "y": y % classes}
    arrays.update(extra)
    np.savez(path, **arrays)
    return str(path)


def test_eval_with_a_user_npz_writes_json_report_and_plots(tmp_path, capsys):
    data = write_npz(tmp_path / "mine.npz")
    out, js = tmp_path / "out", tmp_path / "r.json"
    assert main(["eval", "--data", data, "--methods", "finetune,pcmu", "--out", str(out), "--json", str(js)]
                + TINY) == 0
    text = capsys.readouterr().out
    assert "original" in text and "retrain" in text and "finetune" in text
    payload = json.loads(js.read_text())
    assert set(payload["schema"]) == set(RECORD_FIELDS)
    methods = {r["method"] for r in payload["records"]}
    assert methods == {"original", "retrain", "finetune", "pcmu", "pcmu-original", "pcmu-retrain"}
    for r in payload["records"]:
        assert set(r) == set(RECORD_FIELDS), set(r) ^ set(RECORD_FIELDS)
        assert r["dataset"] == "mine.npz" and r["model"] == "logreg" and r["ratio"] == 0.05 and r["seed"] == 0
        assert 0.0 <= r["test_acc"] <= 1.0
    by = {r["method"]: r for r in payload["records"]}
    assert by["retrain"]["d_d0"] == 0.0 and by["original"]["d_d0"] == 1.0 and by["retrain"]["mia_gap"] == 0.0
    assert by["pcmu"]["reference"] == "pcmu-coupled-retrain" and by["finetune"]["reference"] == "retrain"
    assert by["pcmu"]["status"] in ("certified", "retrained")
    assert {s["method"] for s in payload["summary"]} == methods
    for name in ("report.md", "accuracy.png", "cost.png"):
        assert (out / name).stat().st_size > 0
    assert "| method |" in (out / "report.md").read_text()


def test_same_seeds_give_the_same_table(tmp_path):
    runs = []
    for i in range(2):
        js = tmp_path / f"{i}.json"
        assert main(["eval", "--data", "digits", "--methods", "finetune", "--json", str(js)] + TINY) == 0
        # Wall and CPU times and peak memory are measured, not computed: they vary run to run.
        runs.append([{k: v for k, v in r.items() if k not in TIMING_FIELDS}
                     for r in json.loads(js.read_text())["records"]])
    assert runs[0] == runs[1]


def test_eval_runs_topk_and_randomk(tmp_path, capsys):
    """The perturbation variants are reachable from the command line."""
    js = tmp_path / "perturb.json"
    assert main(["eval", "--data", "digits", "--methods", "topk,randomk", "--json", str(js)] + TINY) == 0
    methods = {r["method"] for r in json.loads(js.read_text())["records"]}
    assert {"topk", "randomk"} <= methods


def test_demo_runs_on_digits(tmp_path, monkeypatch, capsys):
    """The demo's own settings, shortened (2 ratios) so the suite stays fast."""
    import unlearn_ext.cli as cli
    monkeypatch.setattr(cli, "DEMO_RATIOS", "0.05,0.2")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "digits" in text and "pcmu" in text and "finetune" in text
    assert (tmp_path / "demo" / "accuracy.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["eval", "--ratios", "0.5,1.5"], "forget ratios must be in (0, 1)"),
    (["eval", "--ratios", "abc"], "comma-separated numbers"),
    (["eval", "--seeds", "-1"], "seeds must be integers >= 0"),
    (["eval", "--methods", "magic"], "unknown method 'magic'"),
    (["eval", "--model", "vgg"], "unknown model 'vgg'"),
    (["eval", "--data", "nope"], "unknown dataset 'nope'"),
    (["eval", "--data", "missing.npz"], "no such file"),
    (["eval", "--epochs", "0"], "positive integer"),
    (["eval", "--label-noise", "1.5"], "--label-noise must be in [0, 1)"),
    (["eval", "--device", "tpu"], "--device must be cpu or cuda"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_options_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((20, 3), np.float32)}, "missing array 'y'"),
    ({"x": np.zeros(20, np.float32), "y": np.zeros(20, np.int64)}, "x must be n x d"),
    ({"x": np.zeros((20, 3), np.float32), "y": np.zeros(19, np.int64)}, "one label per row"),
    ({"x": np.zeros((20, 3), np.float32), "y": np.full(20, 0.5)}, "integer class labels"),
    ({"x": np.zeros((20, 3), np.float32), "y": -np.ones(20, np.int64)}, "negative labels"),
    ({"x": np.full((20, 3), np.nan, np.float32), "y": np.zeros(20, np.int64)}, "NaN or infinite"),
    ({"x": np.zeros((20, 3), np.float32), "y": np.zeros(20, np.int64), "x_test": np.zeros((5, 3), np.float32)},
     "both x_test and y_test"),
    ({"x": np.zeros((20, 3), np.float32), "y": np.zeros(20, np.int64), "x_test": np.zeros((5, 4), np.float32),
      "y_test": np.zeros(5, np.int64)}, "x_test has 4"),
])
def test_bad_npz_files_are_named(tmp_path, arrays, message, capsys):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--data", str(path)] + TINY)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_a_file_that_is_not_an_npz_is_refused(tmp_path, capsys):
    path = tmp_path / "fake.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--data", str(path)] + TINY)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "not an .npz file (not a zip archive)" in err and "unsafe" not in err


def test_help_names_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for word in ("demo", "eval", "bench", "pcmu", "retraining"):
        assert word in text


def test_mnist1d_is_generated_locally_and_leaves_numpy_alone():
    pytest.importorskip("mnist1d")
    from unlearn_ext.evaluate import datasets
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    ds = datasets.load("mnist1d")
    assert np.array_equal(np.random.get_state()[1], before)  # make_dataset reseeds the global generator
    assert ds.x.shape == (4000, 40) and ds.x_test.shape == (1000, 40) and ds.classes == 10
    assert abs(float(ds.x.mean())) < 1e-3  # standardized with the training statistics


def test_digits_pixels_are_the_unstandardized_calibration_data():
    """digits-pixels: pixels / 16 in [0, 1], sklearn's first 1400 samples for training (the data the
    history settings and PCMU's digits example were calibrated on), label noise drawn per seed."""
    from sklearn.datasets import load_digits

    from unlearn_ext.evaluate import datasets, settings
    ds = datasets.load("digits-pixels")
    raw = load_digits()
    assert ds.x.shape == (1400, 64) and ds.x_test.shape == (397, 64)
    assert torch.equal(ds.x, torch.tensor(raw.data[:1400], dtype=torch.float32) / 16.0)
    assert torch.equal(ds.y_test, torch.tensor(raw.target[1400:]))
    noisy = settings.get("overfit")
    a, b = noisy.dataset(0), noisy.dataset(1)
    assert a.x.shape[0] == 300 and float(a.x.min()) >= 0.0 and float(a.x.max()) <= 1.0
    flipped = float((a.y != ds.y[:300]).float().mean())
    assert 0.1 < flipped < 0.3 and not torch.equal(a.y, b.y)
