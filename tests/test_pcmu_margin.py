"""PCMU's rounding margin (pcmu/margin.py, our derivation) against what it bounds:

* the float64 clipped sum of a linear layer without positions against an exact rational
  computation over many random batches: every error within the proven bound, and the bound not
  vacuous (the largest error reaches a stated fraction of it);
* the closed-form squared norms against exact rationals, within their relative bound;
* on the digits models, |v' - (v - delta)| -- the retrained step's value against the stored value
  minus the removed samples' part -- below the margin;
* near-ties settled by recomputing the step agree with retraining.
"""
from fractions import Fraction

import pytest
import torch

from unlearn_ext.pcmu.margin import FLOAT64_UNIT, float64_sum_error, gamma, rounding_margin
from unlearn_ext.per_sample.layers import Call, LinearForm

from pcmu_settings import digits_data, digits_trainer, first_difference, params_equal


def _linear_case(gen, n, d_in, d_out):
    a = torch.randn(n, d_in, generator=gen) * torch.rand(n, 1, generator=gen) * 4
    b = torch.randn(n, d_out, generator=gen) * torch.rand(n, 1, generator=gen)
    module = torch.nn.Linear(d_in, d_out)
    form = LinearForm(module, {"weight": "w", "bias": "b"})
    return form, [Call((a,), {}, torch.empty(n, d_out), b)], a, b


def test_float64_clipped_sum_error_is_within_its_bound_and_the_bound_is_not_vacuous():
    gen = torch.Generator().manual_seed(0)
    worst_ratio, n, d_in, d_out = 0.0, 48, 5, 3
    for _ in range(60):
        form, calls, a, b = _linear_case(gen, n, d_in, d_out)
        norms2 = torch.zeros(n, dtype=torch.float64)
        form.add_norms2(calls, norms2)
        c = torch.where(norms2.sqrt() > 1.0, 1.0 / norms2.sqrt(), torch.ones(n, dtype=torch.float64))
        sums = {"w": torch.zeros(d_out, d_in, dtype=torch.float64), "b": torch.zeros(d_out, dtype=torch.float64)}
        form.add_sums(calls, c, sums)
        ci = [Fraction(float(v)) for v in c]
        A = [[Fraction(float(v)) for v in row] for row in a.double()]
        B = [[Fraction(float(v)) for v in row] for row in b.double()]
        for j in range(d_out):
            for k in range(d_in):
                exact = sum(ci[i] * B[i][j] * A[i][k] for i in range(n))
                absolute = sum(abs(ci[i] * B[i][j] * A[i][k]) for i in range(n))
                bound = gamma(n + 1) * absolute  # the proven per-element bound (margin.py, term 2)
                err = abs(Fraction(float(sums["w"][j, k])) - exact)
                assert err <= bound
                worst_ratio = max(worst_ratio, float(err / bound) if bound else 0.0)
                # and the a-priori form: absolute <= n * C with C = 1 here (|b_ij a_ik| <= ||g_i||)
                assert absolute <= n
    # Not vacuous: the largest error reaches at least 1/1000 of the bound (measured ~1e-2).
    assert worst_ratio >= 1e-3, worst_ratio


def test_closed_form_norms_are_within_their_relative_bound():
    gen = torch.Generator().manual_seed(1)
    for _ in range(30):
        form, calls, a, b = _linear_case(gen, 16, 37, 11)
        norms2 = torch.zeros(16, dtype=torch.float64)
        form.add_norms2(calls, norms2)
        for i in range(16):
            a2 = sum(Fraction(float(v)) ** 2 for v in a[i].double())
            b2 = sum(Fraction(float(v)) ** 2 for v in b[i].double())
            exact = a2 * b2 + b2  # weight and bias
            rel = abs(Fraction(float(norms2[i])) - exact) / exact
            assert rel <= gamma(2 * 37 + 4)  # the clip factors' relative bound (margin.py, term 2)


def test_margin_terms_are_small_next_to_one_removal():
    beta = 0.005
    m = rounding_margin(1.0, 350, beta, 3)
    assert m < 1e-3 / 350  # a thousandth of C/b: the margin hardly changes which pairs are fragile
    assert 3 * float64_sum_error(2**26) < 1e-7  # the float64 term with the largest admitted sum
    assert float64_sum_error(100) == pytest.approx(301 * FLOAT64_UNIT, rel=1e-6)


@pytest.mark.parametrize("hidden", [None, 32])
def test_removed_part_matches_the_retrained_value_within_the_margin(hidden):
    """|v' - (v - delta)| on the digits setting, measured over steps and removals of 1-3 ids."""
    if hidden is None:
        trainer = digits_trainer()
    else:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10))
        x, y, _, _ = digits_data()
        from unlearn_ext.pcmu import PCMUTrainer
        trainer = PCMUTrainer(model, torch.nn.functional.cross_entropy, (x, y), batch_size=350, clip_norm=1.0,
                              lr=0.05, tau=0.006, sigma=0.01, max_request=3, seed=0)
    trainer.train(epochs=1)
    worst = 0.0
    for r in trainer.records:
        w, ids = trainer.replay(r.step), trainer.batch_ids(r.step)
        v = trainer._gradient_mean(w, ids)  # float32, as stored
        for j in range(0, 30, 5):
            gone = ids[j:j + 1 + j % 3]
            delta = trainer._clipped_mean64(w, gone)
            retrained = trainer._clipped_mean64(w, ids[~torch.isin(ids, gone)])
            worst = max(worst, max(float((rv - (vv.double() - dv)).abs().max())
                                   for rv, vv, dv in zip(retrained, v, delta)))
    # v is float32 as stored, so worst includes its rounding (the margin's term 1).
    assert worst <= trainer.rounding_margin, (worst, trainer.rounding_margin)


def test_near_ties_settled_by_recomputing_agree_with_retraining():
    """A margin of half a removal makes many coordinates 'near': every such step is recomputed as
    retraining would compute it, and the answers must match real retraining runs."""
    margin = 0.5 / 350
    trainer = digits_trainer(rounding_margin=margin).train(epochs=2)
    gen = torch.Generator().manual_seed(5)
    recomputed = 0
    for _ in range(4):
        forget = torch.randperm(1400, generator=gen)[:1]
        check = trainer.check_request(forget)
        recomputed += check.sample_gradients > check.steps_checked_exactly  # a whole batch was computed
        retrained = digits_trainer(rounding_margin=margin, exclude=forget).train(epochs=2)
        diff = first_difference(trainer, retrained)
        assert check.status in ("exact", "diverges"), check
        if check.status == "exact":
            assert diff is None and params_equal(trainer, retrained)
        else:
            assert diff == check.first_divergent_step
    assert recomputed, "no request needed the recomputation: the test does not exercise it"


def test_an_emptied_batch_near_tie_is_settled_against_retraining():
    """Removing every id of a batch: retraining makes no update there. With a margin so wide that
    every coordinate is 'near', the check must settle the step (identical iff all its recorded codes
    are 0) and agree with a real retraining run."""
    margin = 1.0  # every coordinate near: the recomputation path answers
    trainer = digits_trainer(batch_size=2, max_request=2, rounding_margin=margin).train(steps=40)
    for step in (3, 17):
        forget = trainer.batch_ids(step).clone()
        check = trainer.check_request(forget)
        assert check.status in ("exact", "diverges"), check
        retrained = digits_trainer(batch_size=2, max_request=2, rounding_margin=margin, exclude=forget).train(steps=40)
        if check.status == "exact":
            assert params_equal(trainer, retrained)
        else:
            assert check.first_divergent_step == step and not params_equal(trainer, retrained)
