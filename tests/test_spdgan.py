"""SPD-GAN and the unlearning degree (docs/design.md §7, our formulation): the generator's bounds,
the held-out detector (chance on two samples of one distribution, high on clearly different ones),
the generator making points hard for a model that never saw them, UD's formula and its n/a rules,
and the harness's ud column."""

import pytest
import torch

pytest.importorskip("sklearn")

from unlearn_ext import metrics, spdgan  # noqa: E402
from unlearn_ext.data import SGDConfig, TrainingData, train_sgd  # noqa: E402


def _gauss(n, d, seed, shift=0.0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + shift


def test_detector_is_at_chance_on_one_distribution_and_high_on_two():
    # Same distribution: the expected held-out accuracy is exactly 0.5; over 600 test points its
    # standard deviation is ~0.02, so 0.1 is a 5-sigma bound (false failure < 1e-6).
    same = spdgan.detector_accuracy(_gauss(300, 8, 1), _gauss(300, 8, 2), _gauss(300, 8, 3), _gauss(300, 8, 4))
    assert abs(same - 0.5) <= 0.1, same
    # Shifted by 1 in each of 8 dimensions (distance 2.8 between the means): nearly separable.
    apart = spdgan.detector_accuracy(_gauss(300, 8, 1), _gauss(300, 8, 2, 1.0), _gauss(300, 8, 3),
                                     _gauss(300, 8, 4, 1.0))
    assert apart >= 0.9, apart
    with pytest.raises(ValueError, match="test_real"):
        spdgan.detector_accuracy(_gauss(10, 2, 1), _gauss(10, 2, 2), torch.zeros(1, 2), _gauss(10, 2, 4))


def test_generator_stays_within_eps_and_range_and_freezes_constant_features():
    x = _gauss(50, 5, 0)
    x[:, 2] = 0.0  # a constant feature
    low, high = x.min(0).values, x.max(0).values
    gen = spdgan.SPDGenerator(5, low, high, eps=0.5)
    torch.nn.init.normal_(gen.net[2].weight, std=10.0)  # saturate tanh: the largest moves possible
    xt = gen.perturb(x, seed=1)
    assert (xt - x).abs().max() <= 0.5 + 1e-6 and (xt - x).abs().max() > 0.3
    assert (xt >= low - 1e-6).all() and (xt <= high + 1e-6).all()
    assert torch.equal(xt[:, 2], x[:, 2])
    assert torch.equal(spdgan.SPDGenerator(5, low, high, eps=0.0).perturb(x, 1), x)
    with pytest.raises(ValueError, match="eps"):
        spdgan.SPDGenerator(5, low, high, eps=-1.0)


def _two_blobs(n, seed):
    x = _gauss(n, 4, seed)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return x, y


def test_generator_makes_points_hard_for_a_model_that_never_saw_them():
    x, y = _two_blobs(400, 0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    reference = train_sgd(model, TrainingData(x, y), SGDConfig(epochs=20, batch_size=32, lr=0.1))
    xf, yf = _two_blobs(60, 1)
    low, high = x.min(0).values, x.max(0).values
    gen = spdgan.fit_generator(xf, yf, reference, low, high, eps=0.5, steps=200, seed=0)
    xt = gen.perturb(xf, seed=2)
    clean, perturbed = metrics.accuracy(reference, xf, yf), metrics.accuracy(reference, xt, yf)
    assert perturbed <= clean - 0.1, (clean, perturbed)
    assert (xt - xf).abs().max() <= 0.5 + 1e-6


def test_unlearning_degree_formula_cap_and_na_rules():
    ud, note = spdgan.unlearning_degree(0.9, 0.6, 0.3, 40)  # half the gap closed
    assert ud == pytest.approx(0.5) and "24" in note
    assert spdgan.unlearning_degree(0.9, 0.1, 0.3, 40)[0] == 1.0  # past retraining: capped
    assert spdgan.unlearning_degree(0.9, 0.9, 0.3, 40)[0] == 0.0
    assert spdgan.unlearning_degree(0.9, 0.95, 0.3, 40)[0] < 0  # more accurate than before
    ud, note = spdgan.unlearning_degree(0.9, 0.5, 0.3, 29)
    assert ud is None and "|F| = 29 < 30" in note
    ud, note = spdgan.unlearning_degree(0.9, 0.5, 0.9 - 1 / 40, 40)  # a gap of one point
    assert ud is None and "< 2" in note


@pytest.mark.slow
def test_harness_ud_column():
    """Memorizing-style run at test size (|F| = 30): original UD 0, retrain UD 1, checks recorded;
    below 30 forget samples the column is None with the reason."""
    from unlearn_ext.evaluate import datasets, harness
    ds = datasets.load("digits", label_noise=0.2, noise_seed=3, limit=300)
    recs = harness.evaluate(ds, model="mlp-wide", methods=["finetune"], ratios=[0.05, 0.1], seeds=[3], epochs=40,
                            noise_floor_seeds=0, ud=True)
    by = {(r["ratio"], r["method"]): r for r in recs}
    assert by[(0.05, "finetune")]["ud"] is None and "|F| = 15 < 30" in by[(0.05, "finetune")]["ud_note"]
    checks = by[(0.1, "original")]["ud_checks"]
    assert 0.0 <= checks["detector_acc"] <= 1.0 and checks["max_shift"] <= 0.5 + 1e-6
    if checks["before_acc"] - checks["retrain_acc"] >= 2 / 30:
        assert by[(0.1, "original")]["ud"] == 0.0 and by[(0.1, "retrain")]["ud"] == 1.0
        assert by[(0.1, "finetune")]["ud"] is not None
    assert checks["before_acc"] > checks["retrain_acc"], checks  # the model trained on x~(F) memorized it
