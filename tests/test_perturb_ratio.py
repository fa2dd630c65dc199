"""The ratio scores (perturb/scores.py, our formulation): fisher_ratio (F's per-sample Fisher over
R's) and grad_ratio (F's |summed gradient| over R's, scaled to |F|).

On a linear softmax model the per-sample gradient of weight (c, j) is (p_c - y_c) x_j, so the score
can be written down by hand; a constructed data set where one input feature only F uses, one only R
uses and one both use pins the ranking the score exists for. Then the unlearner: only the selected
coordinates move, the retained pass is counted in the cost (and R excludes earlier requests), and
bad input is refused with a message naming the problem."""
from __future__ import annotations

import copy

import pytest
import torch

from unlearn_ext import selection as S
from unlearn_ext.data import SGDConfig, TrainingData
from unlearn_ext.parameters import trainable
from unlearn_ext.perturb import TopKUnlearner, forget_scores
from unlearn_ext.perturb.scores import RATIO_FLOOR

from conftest import requires_compiled

FORGET = torch.arange(4)  # rows 0-3 of the constructed set


def _constructed():
    """Feature 0: only F has it; feature 1: only R; feature 2: both, twice as large as feature 0 in F
    (so F's plain gradient is larger on feature 2's weights than on feature 0's)."""
    f_rows = torch.tensor([[1.0, 0.0, 2.0]]).repeat(4, 1)
    r_rows = torch.tensor([[0.0, 1.0, 2.0]]).repeat(12, 1)
    x = torch.cat([f_rows, r_rows])
    y = torch.tensor([1] * 4 + [0] * 12)
    model = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.3, -0.2, 0.1], [-0.1, 0.4, 0.05]]))
    return TrainingData(x, y), model


def _by_hand(model, data, ids):
    """Mean over ids of the squared per-sample gradient of the weight, from (p - onehot(y)) x^T."""
    x, y = data.batch(ids)
    with torch.no_grad():
        residual = torch.softmax(x @ model.weight.T, 1) - torch.nn.functional.one_hot(y, 2).float()
    return (torch.einsum("nc,nj->ncj", residual, x) ** 2).mean(0)


@pytest.mark.parametrize("floor", [None, 0.0, 3.0])
def test_fisher_ratio_equals_the_hand_computed_formula(floor):
    data, model = _constructed()
    retained = data.without(FORGET)
    extra = {} if floor is None else {"ratio_floor": floor}
    scores, cost = forget_scores(model, data, FORGET, "fisher_ratio", batch_size=5, retained=retained, **extra)
    f_fisher, r_fisher = _by_hand(model, data, FORGET), _by_hand(model, data, retained)
    fraction = RATIO_FLOOR if floor is None else floor
    denominator = r_fisher + fraction * r_fisher.mean()
    # with no floor, coordinates R never moves score 0 instead of x / 0
    expected = torch.where(denominator > 0, f_fisher / denominator, torch.zeros_like(f_fisher))
    assert torch.allclose(scores[0], expected, rtol=1e-5, atol=1e-7)
    assert cost == 16  # |F| + |R| sample gradients


def test_grad_ratio_equals_the_hand_computed_formula():
    data, model = _constructed()
    retained = data.without(FORGET)
    scores, cost = forget_scores(model, data, FORGET, "grad_ratio", batch_size=5, retained=retained)

    def summed(ids):  # |sum over ids of (p - onehot(y)) x^T|
        x, y = data.batch(ids)
        with torch.no_grad():
            residual = torch.softmax(x @ model.weight.T, 1) - torch.nn.functional.one_hot(y, 2).float()
        return (residual.T @ x).abs()

    r_term = summed(retained) * len(FORGET) / len(retained)
    expected = summed(FORGET) / (r_term + RATIO_FLOOR * r_term.mean())
    assert torch.allclose(scores[0], expected, rtol=1e-5, atol=1e-7)
    assert cost == 16


@pytest.mark.parametrize("score", ["fisher_ratio", "grad_ratio"])
def test_ratio_scores_rank_what_only_F_uses_first_and_what_only_R_uses_last(score):
    data, model = _constructed()
    ratio, _ = forget_scores(model, data, FORGET, score, retained=data.without(FORGET))
    plain, _ = forget_scores(model, data, FORGET, "grad_abs")
    w_ratio, w_plain = ratio[0], plain[0]
    for c in range(2):
        # F's plain gradient prefers the shared feature (it is twice as large in F) ...
        assert w_plain[c, 2] > w_plain[c, 0]
        # ... the ratio prefers the feature only F uses, and gives R's own feature nothing.
        assert w_ratio[c, 0] > w_ratio[c, 2] > w_ratio[c, 1] == 0.0
    top = S.topk(ratio, 2).masks(ratio)[0]
    assert top[:, 0].all() and not top[:, 1:].any()


def test_fisher_ratio_grows_when_R_stops_using_a_coordinate():
    """Halving R's share of the shared feature (R rows' x_2: 2 -> 1) lowers R's Fisher there, so the
    shared weights' scores rise; F-only scores stay above them."""
    data, model = _constructed()
    before, _ = forget_scores(model, data, FORGET, "fisher_ratio", retained=data.without(FORGET))
    x = data.inputs.clone()
    x[4:, 2] = 1.0
    lighter = TrainingData(x, data.targets)
    after, _ = forget_scores(model, lighter, FORGET, "fisher_ratio", retained=lighter.without(FORGET))
    assert (after[0][:, 2] > before[0][:, 2]).all()


@requires_compiled
def test_topk_fisher_ratio_touches_only_selected_and_counts_the_retained_pass():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(60, 5, generator=gen)
    data = TrainingData(x, (x[:, 0] > 0).long())
    torch.manual_seed(1)
    original = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    config = SGDConfig(epochs=2, batch_size=16, lr=0.1, seed=0)
    model = copy.deepcopy(original)
    u = TopKUnlearner(model, data, config, k=0.1, score="fisher_ratio", repair_epochs=0)
    first = torch.arange(6)
    scores, _ = forget_scores(original, data, first, "fisher_ratio", retained=data.without(first))
    mask = torch.cat([m.reshape(-1) for m in S.topk(scores, 0.1).masks(scores)])
    flat = lambda m: torch.cat([p.detach().reshape(-1) for p in trainable(m).values()])  # noqa: E731
    report = u.unlearn(first)
    changed = flat(model) != flat(original)
    assert changed.any() and not (changed & ~mask).any()
    assert report.details["scoring_sample_gradients"] == 6 + 54
    # A second request: R excludes what the first forgot as well as the new ids.
    second = u.unlearn(torch.arange(6, 10))
    assert second.details["scoring_sample_gradients"] == 4 + (60 - 10)


@pytest.mark.parametrize("score", ["fisher_ratio", "grad_ratio"])
def test_ratio_scores_refuse_bad_input(score):
    data, model = _constructed()
    retained = data.without(FORGET)
    with pytest.raises(ValueError, match="retained"):
        forget_scores(model, data, FORGET, score)
    with pytest.raises(ValueError, match="retained"):
        forget_scores(model, data, FORGET, score, retained=torch.empty(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="overlap"):
        forget_scores(model, data, FORGET, score, retained=torch.arange(2, 16))
    with pytest.raises(ValueError, match="not in the training data"):
        forget_scores(model, data, FORGET, score, retained=torch.tensor([5, 99]))
    with pytest.raises(ValueError, match="at least one forget id"):
        forget_scores(model, data, torch.empty(0, dtype=torch.int64), score, retained=retained)
    with pytest.raises(ValueError, match="unknown score"):
        forget_scores(model, data, FORGET, "fisher_ratios", retained=retained)
    for floor in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="ratio_floor"):
            forget_scores(model, data, FORGET, score, retained=retained, ratio_floor=floor)
        with pytest.raises(ValueError, match="ratio_floor"):
            TopKUnlearner(model, data, SGDConfig(epochs=1, batch_size=4, lr=0.1), score=score,
                          ratio_floor=floor)


def test_registry_ratio_entries_carry_their_settings():
    """topk-ratio and its controls build from the registry with RATIO_SETTINGS (the memorizing
    profile on the wide MLP, the generalizing one otherwise), unaffected by edits of PERTURB_SETTINGS
    (eval_perturb.py's --k), and unlearn."""
    pytest.importorskip("sklearn")
    from unlearn_ext.baselines import FinetuneUnlearner
    from unlearn_ext.evaluate import datasets, harness, methods
    ds = datasets.load("digits", limit=120)
    forget = torch.arange(6)
    for model_name, family in (("logreg", "generalizing"), ("mlp-wide", "memorizing")):
        run = harness.train_run(ds, model_name, 0, epochs=2)
        want = methods.RATIO_SETTINGS[family]
        saved = dict(methods.PERTURB_SETTINGS[family])
        methods.PERTURB_SETTINGS[family]["k"] = 0.9  # what --k does; must not reach the -ratio rows
        try:
            topk, randomk, finetune = (m.build(run, None) for m in
                                       methods.resolve(["topk-ratio", "randomk-ratio", "finetune-ratio"]))
        finally:
            methods.PERTURB_SETTINGS[family].clear()
            methods.PERTURB_SETTINGS[family].update(saved)
        assert (topk.score, topk.k, topk.perturbation, topk.repair, topk.repair_epochs) == \
            ("grad_ratio", want["k"], want["perturbation"], want["repair"], want["repair_epochs"])
        assert (randomk.k, randomk.perturbation, randomk.repair_epochs) == \
            (want["k"], want["perturbation"], want["repair_epochs"])
        assert isinstance(finetune, FinetuneUnlearner) and finetune.epochs == want["repair_epochs"]
        report = topk.unlearn(forget)
        assert report.status == "unlearned"
        assert report.details["scoring_sample_gradients"] == len(run.data)  # |F| + |R|


@pytest.mark.slow
@requires_compiled
def test_memorizing_topk_ratio_moves_toward_retraining_more_than_its_controls():
    """Memorizing setting (tests/perturb_setup.py: the harness's `memorizing` setting, 10% forget set),
    seed 0, topk-ratio at its registry settings (RATIO_SETTINGS["memorizing"]: grad_ratio, dampen,
    K = 10%, 5 repair epochs) against its controls with the same budget (finetune-ratio: 5 epochs;
    randomk-ratio: same K and perturbation). Measured once on seeds 10-14 (never on seed 0; the
    registry settings were chosen on seeds 100-102):
      |forget acc - retrain's|: topk-ratio 0.000 / 0.100 / 0.133 / 0.067 / 0.067; finetune-ratio and
        randomk-ratio 0.367 / 0.500 / 0.367 / 0.433 / 0.467 (both left F at accuracy 1.0, the
        original's) -> smallest improvement 0.233;
      per-run |MIA - MIA_retrain|: topk-ratio 0.048 / 0.068 / 0.083 / 0.061 / 0.097; finetune-ratio
        0.269 / 0.273 / 0.253 / 0.286 / 0.288; randomk-ratio 0.234 / 0.264 / 0.240 / 0.262 / 0.282;
        the original 0.276 / 0.281 / 0.256 / 0.295 / 0.292 -> smallest improvement 0.157 (over
        randomk-ratio, seed 12);
      test accuracy - retrain's: topk-ratio -0.022 / -0.039 / -0.017 / -0.008 / -0.086 (seed 14
        misses the 2-point target by far).
    Asserted with margins about half the smallest improvements (0.10 forget accuracy, 0.08 MIA gap),
    and test accuracy no more than 0.12 below retraining's: a guard against collapse, not the
    2-point target, which these seeds show is not met on every seed."""
    from perturb_setup import run_methods
    r = run_methods(0, ("original", "retrain", "finetune-ratio", "randomk-ratio", "topk-ratio"))
    gap = lambda m, key: abs(r[m][key] - r["retrain"][key])  # noqa: E731
    for control in ("original", "finetune-ratio", "randomk-ratio"):
        assert gap("topk-ratio", "forget_acc") <= gap(control, "forget_acc") - 0.10, (control, r)
        assert gap("topk-ratio", "mia") <= gap(control, "mia") - 0.08, (control, r)
    assert r["topk-ratio"]["test_acc"] >= r["retrain"]["test_acc"] - 0.12, r


@pytest.mark.parametrize("score", ["fisher_ratio", "grad_ratio"])
def test_ratio_scores_refuse_a_retained_set_that_moves_nothing(score):
    """R's rows all zero on a bias-free linear model: R's gradient is 0 on every coordinate, every
    ratio would be 0 and Top-K would silently take the lowest indices; refused, naming the cause."""
    data, model = _constructed()
    x, y = data.batch(torch.arange(16))
    x = x.clone()
    x[4:] = 0.0
    zero_r = TrainingData(x, y)
    with pytest.raises(ValueError, match="zero on every coordinate"):
        forget_scores(model, zero_r, FORGET, score, retained=zero_r.without(FORGET))
