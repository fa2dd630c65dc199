"""`unlearn-ext eval` on images, signals, tokens, CIFAR files and a user's model factory, end to end
on tiny configurations (report.md, PNGs and JSON, with the recipe and the command line recorded);
and every input the harness could not evaluate refused before any work: exit code 2, one line,
nothing written."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("rich")
pytest.importorskip("matplotlib")

from unlearn_ext.cli import main  # noqa: E402

from test_harness_data import write_cifar  # noqa: E402

FAST = ["--epochs", "1", "--ratios", "0.1", "--seeds", "0", "--noise-floor", "0", "--quiet", "--no-ud",
        "--methods", "finetune,topk"]


def _run(tmp_path, *argv):
    out, js = tmp_path / "out", tmp_path / "r.json"
    assert main(["eval", *argv, *FAST, "--out", str(out), "--json", str(js)]) == 0
    _wrote_report_and_plots(out)
    payload = json.loads(js.read_text())
    return payload, (out / "report.md").read_text()


def _wrote_report_and_plots(out):
    assert "| method |" in (out / "report.md").read_text()
    for name in ("accuracy.png", "cost.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def _ran_every_row(payload, model):
    by = {r["method"]: r for r in payload["records"]}
    assert set(by) == {"original", "retrain", "finetune", "topk"}
    assert all(r["model"] == model for r in payload["records"])
    assert by["finetune"]["status"] == "unlearned" and by["topk"]["status"] == "unlearned"
    return by


def test_cnn_on_digits_images_records_recipe_and_command(tmp_path):
    payload, text = _run(tmp_path, "--data", "digits", "--model", "cnn", "--limit", "150", "--lr", "0.05",
                         "--schedule", "cosine", "--batch-size", "32")
    _ran_every_row(payload, "cnn")
    s = payload["settings"]
    assert s["data_kind"] == "image" and s["input_shape"] == [1, 8, 8]
    assert s["recipe"] == {"optimizer": "sgd", "epochs": 1, "batch_size": 32, "lr": 0.05,
                           "weight_decay": s["recipe"]["weight_decay"], "momentum": None, "schedule": "cosine"}
    assert s["command"].startswith("unlearn-ext eval --data digits --model cnn") and "--schedule cosine" in s["command"]
    assert f"command: `{s['command']}`" in text
    assert "training recipe: optimizer sgd, epochs 1, batch_size 32, lr 0.05" in text and "schedule cosine" in text
    assert "wall/rt" in text and "cpu/rt" in text


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_momentum_and_adam_recipes_train_retrain_and_repair(tmp_path, optimizer):
    """The methods that take any recipe run with it; the history methods, plain SGD only, are
    recorded as refused with their message."""
    out, js = tmp_path / "out", tmp_path / "r.json"
    assert main(["eval", "--data", "digits", "--model", "logreg", "--limit", "150", "--optimizer", optimizer,
                 "--schedule", "step", "--epochs", "2", "--ratios", "0.1", "--seeds", "0", "--noise-floor", "1",
                 "--quiet", "--no-ud", "--methods", "finetune,topk,mini", "--out", str(out), "--json", str(js)]) == 0
    payload = json.loads(js.read_text())
    by = {r["method"]: r for r in payload["records"]}
    assert by["finetune"]["status"] == "unlearned" and by["topk"]["status"] == "unlearned"
    assert by["mini"]["status"] in ("refused", "unlearned", "fallback")
    if by["mini"]["status"] == "refused":
        assert by["mini"]["reason"]
    recipe = payload["settings"]["recipe"]
    assert recipe["optimizer"] == optimizer and recipe["schedule"] == "step"
    assert (recipe["momentum"] == 0.9) == (optimizer == "momentum")
    assert f"optimizer {optimizer}" in (out / "report.md").read_text()


def test_resnet_with_batchnorm(tmp_path):
    payload, _ = _run(tmp_path, "--data", "digits", "--model", "resnet", "--norm", "batch", "--limit", "100")
    _ran_every_row(payload, "resnet")
    assert payload["settings"]["model_options"] == {"norm": "batch"}


def test_transformer_on_a_tokens_npz(tmp_path):
    from unlearn_ext.evaluate import tokens
    x, y = tokens.generate(120, 5)
    np.savez(tmp_path / "seq.npz", x=x.astype(np.int32), y=y)
    payload, _ = _run(tmp_path, "--data", str(tmp_path / "seq.npz"), "--model", "transformer", "--dropout", "0.1")
    _ran_every_row(payload, "transformer")
    assert payload["settings"]["data_kind"] == "tokens" and payload["settings"]["input_shape"] == [tokens.LENGTH]


def test_a_users_model_factory(tmp_path, monkeypatch):
    pkg = tmp_path / "my_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(
        "import torch\n"
        "SEEN = []\n"
        "def make_net(input_shape, classes):\n"
        "    SEEN.append((tuple(input_shape), classes))\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(torch.tensor(input_shape).prod()), classes))\n"
        "def not_a_module(input_shape, classes):\n"
        "    return 'a string'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    payload, _ = _run(tmp_path, "--data", "digits", "--model", "my_pkg.models:make_net", "--limit", "150")
    _ran_every_row(payload, "my_pkg.models:make_net")
    assert sys.modules["my_pkg.models"].SEEN[0] == ((1, 8, 8), 10)  # digits reach a user's model as images


def test_the_installed_command_runs_a_groupnorm_resnet(tmp_path):
    """`unlearn-ext eval --data digits --model resnet` as a user types it (a new process through the
    package's entry point, the default GroupNorm ResNet)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out, js = tmp_path / "out", tmp_path / "r.json"
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "unlearn_ext", "eval", "--data", "digits", "--model", "resnet",
                           "--limit", "60", *FAST, "--out", str(out), "--json", str(js)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    _wrote_report_and_plots(out)
    payload = json.loads(js.read_text())
    _ran_every_row(payload, "resnet")
    assert payload["settings"]["model_options"] == {} and payload["settings"]["input_shape"] == [1, 8, 8]
    assert payload["settings"]["command"].startswith("unlearn-ext eval --data digits --model resnet")


def test_cifar10_files(tmp_path):
    write_cifar(tmp_path / "cifar")
    payload, _ = _run(tmp_path, "--data", f"cifar10:{tmp_path / 'cifar'}", "--model", "cnn")
    _ran_every_row(payload, "cnn")
    assert payload["settings"]["input_shape"] == [3, 32, 32]


# ---- refused before any work: exit 2, one line, nothing written ----------------------------------------

def _npz(tmp_path, **arrays):
    path = tmp_path / f"bad{len(list(tmp_path.glob('bad*.npz')))}.npz"  # one file per case
    np.savez(path, **arrays)
    return str(path)


X = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
Y = np.arange(40) % 2


def _cases(tmp_path):
    """(argv, what the one line must say) for every input the harness cannot evaluate."""
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "text.npz").write_text("x,y\n1,2\n")
    factory = tmp_path / "bad_factory.py"
    factory.write_text("def make(input_shape, classes):\n    return 42\n"
                       "def wrong(input_shape, classes):\n    import torch\n    return torch.nn.Flatten()\n")
    write_cifar(tmp_path / "cifar")
    (tmp_path / "cifar" / "test_batch").unlink()
    return [
        (["--data", _npz(tmp_path, x=X, y=np.zeros(40, np.int64))], "hold 1 class"),
        (["--data", _npz(tmp_path, x=np.zeros((40, 0), np.float32), y=Y)], "every sample needs at least one value"),
        (["--widths", "0"], "hidden widths must be integers >= 1"),
        (["--data", _npz(tmp_path, x=X, y=np.where(Y == 0, 3, 7))], "labels must be 0..C-1"),
        (["--data", _npz(tmp_path, x=X, y=Y, x_test=X[:5], y_test=np.array([0, 1, 2, 0, 1]))],
         "test labels never in the training labels: {2}"),
        (["--limit", "1"], "hold 1 class"),
        (["--data", _npz(tmp_path, x=X, y=Y, x_test=X[:4], y_test=Y[:4]), "--limit", "2", "--ratios", "0.9"],
         "forgets 2, all of them"),
        (["--data", _npz(tmp_path, x=np.full((40, 3), 3e38, np.float32) * np.where(Y[:, None], 1, -1), y=Y)],
         "standardizing the inputs overflowed"),
        (["--data", _npz(tmp_path, x=X, y=np.where(Y == 0, 0, 10**9))], "renumber them 0..1"),
        (["--data", _npz(tmp_path, x=X, y=np.where(Y == 0, 0, 2**40))], "renumber them 0..1"),
        (["--data", _npz(tmp_path, x=X, y=np.where(Y == 0, 0, 2**63 + 5).astype(np.uint64))], "renumber them 0..1"),
        (["--seeds", str(2**64)], "seeds must be integers in 0.."),
        (["--seeds", "2**64"], "comma-separated integers"),
        (["--out", str(tmp_path / "a_file")], "exists and is not a folder"),
        (["--json", str(tmp_path / "missing" / "r.json")], "does not exist"),
        (["--json", str(tmp_path)], "is a folder"),
        (["--data", str(tmp_path / "text.npz")], "not an .npz file (not a zip archive)"),
        (["--data", _npz(tmp_path, x=np.zeros((40, 1, 1, 2, 2), np.float32), y=Y)], "x must be n x d"),
        (["--data", _npz(tmp_path, x=X.astype(np.complex64), y=Y)], "must hold real numbers"),
        (["--data", _npz(tmp_path, x=np.zeros((40, 1, 8, 8), np.float32), y=Y), "--model", "transformer"],
         "the model reads integer token sequences"),
        (["--data", _npz(tmp_path, x=X, y=Y), "--model", "transformer"], "token ids must be stored as integers"),
        (["--data", _npz(tmp_path, x=np.full((40, 6), -1, np.int64), y=Y), "--model", "transformer"],
         "token ids must be >= 0"),
        (["--data", _npz(tmp_path, x=np.full((40, 6), 2**40, np.int64), y=Y), "--model", "transformer"],
         "renumber them 0..V-1"),
        (["--data", _npz(tmp_path, x=X, y=Y), "--model", "cnn"], "the model reads images"),
        (["--data", "tokens", "--model", "mlp"], "the model reads a table"),
        (["--model", "vgg"], "unknown model 'vgg'"),
        (["--model", "no_such_module_here:make"], "cannot import no_such_module_here"),
        (["--model", "bad_factory:missing"], "has no callable 'missing'"),
        (["--model", "bad_factory:make"], "returned int, not a torch.nn.Module"),
        (["--model", "bad_factory:wrong"], "outputs must be (batch, 10) logits"),
        (["--model", "cnn", "--norm", "batch"], "--norm applies to --model resnet"),
        (["--model", "transformer", "--data", "tokens", "--dropout", "1.5"], "--dropout must be in [0, 1)"),
        (["--model", "cnn", "--dropout", "0.1"], "--dropout applies to --model transformer or causal-lm, not cnn"),
        (["--data", "corpus", "--model", "transformer"], "the data are documents for a causal language model"),
        (["--data", "corpus", "--model", "mlp"], "the data are documents for a causal language model"),
        (["--data", "digits", "--model", "causal-lm"], "next-token targets; use --data corpus"),
        (["--data", "corpus", "--model", "causal-lm", "--label-noise", "0.1"], "documents have next-token targets"),
        (["--data", "corpus", "--model", "bad_factory:wrong"], "outputs must be (batch, 16, 32) next-token logits"),
        (["--optimizer", "adamw"], "--optimizer must be one of"),
        (["--optimizer", "sgd", "--momentum", "0.9"], "--momentum applies to --optimizer momentum"),
        (["--schedule", "linear"], "--schedule must be one of"),
        (["--lr", "-1"], "--lr must be a positive finite number"),
        (["--lr", "nan"], "--lr must be a positive finite number"),
        (["--noise-floor", "-1"], "expected an integer >= 0"),
        (["--data", f"cifar10:{tmp_path / 'cifar'}", "--model", "cnn"], "missing test_batch"),
        (["--data", f"cifar100:{tmp_path / 'nowhere'}", "--model", "cnn"], "no such folder"),
    ] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "--device cuda: no CUDA device")])


def test_every_input_the_harness_cannot_evaluate_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the user's factory module is found in the current folder
    cases = _cases(tmp_path)
    for argv, message in cases:
        out, js = tmp_path / "out", tmp_path / "r.json"
        extra = [] if "--out" in argv or "--json" in argv else ["--out", str(out), "--json", str(js)]
        with pytest.raises(SystemExit) as exc:
            main(["eval", *argv, *extra, "--quiet", "--no-ud", "--epochs", "1"])
        err = capsys.readouterr().err
        assert exc.value.code == 2, (argv, err)
        assert err.count("\n") == 1 and message in err, (argv, message, err)
        assert not out.exists() and not js.exists(), argv
    assert not (tmp_path / "missing").exists()
    sys.modules.pop("bad_factory", None)
