"""The harness on real model families: every registered method on a GroupNorm CNN, a BatchNorm
ResNet and a transformer with dropout either runs or is recorded as refused with the method's
message (never a traceback); the recipe options; the cost columns; n/a cells keep their reason."""
import math

import pytest
import torch

from unlearn_ext.data import SGDConfig
from unlearn_ext.evaluate import datasets, harness, methods, models, report, training
from unlearn_ext.unlearner import STATUSES

ALL_METHODS = list(methods.AVAILABLE) + list(methods.VARIANTS)


def _sweep(data, model, options):
    ds = datasets.load(data, form=models.reads(model), limit=40)
    return harness.evaluate(ds, model=model, methods=ALL_METHODS, ratios=[0.1], seeds=[0], epochs=1,
                            noise_floor_seeds=0, model_options=options)


def _check_rows(records):
    by = {}
    for r in records:
        by.setdefault(r["method"], r)
        assert r["status"] in (*STATUSES, "reference", "refused"), r["status"]
        if r["status"] == "refused":
            assert r["reason"] and ":" in r["reason"] and "\n" not in r["reason"]  # 'Type: message', one line
            assert r["test_acc"] is None and r["d_d0"] is None and r["cost_vs_retrain"] is None
        else:
            assert 0.0 <= r["test_acc"] <= 1.0
    assert set(ALL_METHODS) <= set(by)  # every method has its row, whatever happened to it
    return by


def test_every_method_serves_a_groupnorm_cnn():
    """GroupNorm is per-sample and the CNN deterministic: no method has a reason to refuse it."""
    by = _check_rows(_sweep("digits", "cnn", {}))
    assert not [m for m, r in by.items() if r["status"] == "refused"]


def test_a_batchnorm_resnet_is_refused_by_per_sample_methods_with_their_message():
    by = _check_rows(_sweep("digits", "resnet", {"norm": "batch"}))
    assert by["pcmu"]["status"] == "refused" and "BatchNorm" in by["pcmu"]["reason"]
    assert by["finetune"]["status"] == "unlearned" and by["topk"]["status"] == "unlearned"


def test_a_transformer_with_dropout_runs_or_is_refused_per_method():
    by = _check_rows(_sweep("tokens", "transformer", {"dropout": 0.1}))
    assert by["finetune"]["status"] == "unlearned" and by["retrain-other"]["status"] == "retrained"


def test_seeded_dropout_makes_retraining_repeat_the_original_run():
    """Dropout masks come from the model's own seeded generator: training twice from the same
    initial model gives identical weights, whatever torch's global RNG did in between."""
    from unlearn_ext.data import TrainingData, train_sgd
    import copy
    ds = datasets.load("tokens", form="tokens", limit=64)
    initial = models.make("transformer", ds.input_shape, ds.classes, 0, vocab=ds.vocab, dropout=0.3)
    config = SGDConfig(epochs=1, batch_size=16, lr=0.1, seed=0)
    a = train_sgd(copy.deepcopy(initial), TrainingData(ds.x, ds.y), config)
    torch.rand(100)  # moves the global generator
    b = train_sgd(copy.deepcopy(initial), TrainingData(ds.x, ds.y), config)
    c = train_sgd(copy.deepcopy(initial), TrainingData(ds.x, ds.y), SGDConfig(1, 16, 0.1, seed=0))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    no_dropout = models.make("transformer", ds.input_shape, ds.classes, 0, vocab=ds.vocab)
    d = train_sgd(no_dropout, TrainingData(ds.x, ds.y), config)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), d.parameters()))


def test_a_method_that_raises_is_recorded_and_the_others_go_on(monkeypatch):
    def broken(run, _):
        raise ValueError("cannot serve this model:\nbecause of a reason")
    monkeypatch.setitem(methods.AVAILABLE, "broken", methods.Method("broken", "retrain", build=broken))
    ds = datasets.load("digits", limit=100)
    records = harness.evaluate(ds, model="logreg", methods=["broken", "finetune"], ratios=[0.1], seeds=[0],
                               epochs=1, noise_floor_seeds=0)
    by = {r["method"]: r for r in records}
    assert by["broken"]["status"] == "refused"
    assert by["broken"]["reason"] == "ValueError: cannot serve this model: because of a reason"
    assert by["finetune"]["status"] == "unlearned"
    summary = {s["method"]: s for s in harness.summarize(records)}
    assert summary["broken"]["test_acc"] is None and "cannot serve" in summary["broken"]["test_acc_note"]
    rows, notes = report.rows_and_notes(harness.summarize(records))
    broken_row = next(r for r in rows if r[0] == "broken")
    assert broken_row[2].startswith("n/a [") and any("cannot serve" in n for n in notes)


def test_ud_that_cannot_be_computed_stays_in_the_table_with_its_reason():
    ds = datasets.load("digits", limit=100)
    records = harness.evaluate(ds, model="logreg", methods=["finetune"], ratios=[0.05], seeds=[0], epochs=1,
                               noise_floor_seeds=0, ud=True)
    assert all(r["ud"] is None and "< 30" in r["ud_note"] for r in records)
    text = report.markdown(harness.summarize(records), "t", [])
    assert "| UD |" in text
    marker = text.split("Why a cell is n/a:")[1]
    assert "< 30 (too few points for SPD-GAN)" in marker
    ud_col = [h for _, h, _ in report.COLUMNS].index("UD")
    assert all(r[ud_col].startswith("n/a [") for r in report.rows_for(harness.summarize(records)))


def test_cost_columns_are_relative_to_that_ratios_retraining():
    ds = datasets.load("digits", limit=200)
    records = harness.evaluate(ds, model="logreg", methods=["finetune"], ratios=[0.1], seeds=[0], epochs=2,
                               noise_floor_seeds=0)
    by = {r["method"]: r for r in records}
    gold, tuned = by["retrain"], by["finetune"]
    assert gold["wall_vs_retrain"] == 1.0 and gold["cpu_vs_retrain"] == 1.0 and gold["cpu_seconds"] >= 0
    assert tuned["wall_vs_retrain"] == pytest.approx(tuned["seconds"] / gold["seconds"])
    if gold["cpu_seconds"] > 0:
        assert tuned["cpu_vs_retrain"] == pytest.approx(tuned["cpu_seconds"] / gold["cpu_seconds"])
    assert tuned["build_seconds"] is not None and by["original"]["build_seconds"] is None


def test_mini_pays_the_forward_ad_warm_up_when_built(monkeypatch):
    """The one-off warm-up runs in build (outside the timed request), once per process."""
    calls = []
    monkeypatch.setattr(methods, "_warmed_up", False)
    real = torch.func.jvp
    monkeypatch.setattr(torch.func, "jvp", lambda *a, **k: calls.append(1) or real(*a, **k))
    ds = datasets.load("digits", limit=100)
    run = harness.train_run(ds, "logreg", 0, epochs=1)
    store = methods.MINI.prepare(run)
    methods.MINI.build(run, store)
    methods.MINI.build(run, store)
    assert calls == [1] and methods._warmed_up


# ---- the recipe ------------------------------------------------------------------------------------

def test_plain_sgd_options_build_the_same_config_as_the_model_defaults():
    plain = training.RecipeOptions().build("mlp", 3, 1000)
    assert plain == SGDConfig(**training.DEFAULTS["mlp"], seed=3)
    custom = training.RecipeOptions(lr=0.02, weight_decay=0.0, epochs=4, batch_size=16).build("cnn", 1, 100)
    assert custom == SGDConfig(epochs=4, batch_size=16, lr=0.02, weight_decay=0.0, seed=1)
    setting = training.RecipeOptions(epochs=2).build("mlp", 0, 100, base=dict(epochs=40, batch_size=128, lr=0.3,
                                                                                weight_decay=1e-3))
    assert setting == SGDConfig(epochs=2, batch_size=128, lr=0.3, weight_decay=1e-3, seed=0)


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_optimizer_recipes_retrain_to_the_original_run_when_nothing_is_forgotten(optimizer):
    """momentum / adam build the library's OptimizerRecipe; retraining with it and no forgotten ids
    repeats the original training bit for bit (the harness's reference depends on it)."""
    import copy
    from unlearn_ext.data import TrainingData, retrain
    from unlearn_ext.recipe import OptimizerRecipe
    ds = datasets.load("digits", form="grid", limit=64)
    recipe = training.RecipeOptions(optimizer=optimizer, schedule="cosine", epochs=2, batch_size=16).build("cnn", 0, 64)
    assert isinstance(recipe, OptimizerRecipe)
    data = TrainingData(ds.x, ds.y)
    initial = models.make("cnn", ds.input_shape, ds.classes, 0)
    original = recipe.train(copy.deepcopy(initial), data)
    again = retrain(initial, data, recipe, [])
    assert all(torch.equal(p, q) for p, q in zip(original.parameters(), again.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(original.parameters(), initial.parameters()))


def test_schedules_follow_the_step_of_the_original_schedule():
    cfg = training.RecipeOptions(schedule="cosine", lr=0.2, epochs=4, batch_size=10).build("mlp", 0, 100)
    total = 4 * 10
    assert cfg.lr_at(0) == pytest.approx(0.2) and cfg.lr_at(total) == pytest.approx(0.0, abs=1e-12)
    assert cfg.lr_at(total // 2) == pytest.approx(0.1)
    assert all(cfg.lr_at(t) >= cfg.lr_at(t + 1) for t in range(total))
    step = training.RecipeOptions(schedule="step", lr=0.2, epochs=4, batch_size=10).build("mlp", 0, 100)
    assert [step.lr_at(e * 10) for e in range(4)] == pytest.approx([0.2, 0.2, 0.02, 0.002])


@pytest.mark.parametrize("options, message", [
    (dict(optimizer="rmsprop"), "--optimizer must be one of"),
    (dict(schedule="linear"), "--schedule must be one of"),
    (dict(lr=0.0), "--lr must be a positive finite number"),
    (dict(lr=math.inf), "--lr must be a positive finite number"),
    (dict(weight_decay=-1.0), "--weight-decay must be a finite number >= 0"),
    (dict(momentum=0.9), "--momentum applies to --optimizer momentum"),
    (dict(optimizer="momentum", momentum=1.0), "--momentum must be in [0, 1)"),
])
def test_bad_recipe_options_are_refused(options, message):
    with pytest.raises(training.RecipeError, match=message.replace("[", r"\[").replace(")", r"\)")):
        training.RecipeOptions(**options).check()
