"""PCMU against coupled retraining (same seed, same batch order minus F): wherever a certificate
says exact, the retrained parameters must be bit-identical; where the per-request check names a
first divergent step, retraining must first differ exactly there."""
import json

import pytest
import torch

from unlearn_ext.data import BatchSchedule
from unlearn_ext.pcmu.certificate import AprioriCertificate

from pcmu_settings import (digits_data, digits_trainer, first_difference, params_equal, synthetic_data,
                           synthetic_trainer)


@pytest.fixture(scope="module")
def synthetic():
    return synthetic_trainer(max_request=8).train(steps=20)


@pytest.fixture(scope="module")
def digits():
    return digits_trainer().train(epochs=6)


def test_synthetic_setting_is_accurate_and_has_a_budget(synthetic):
    _, _, x_test, y_test = synthetic_data()
    acc = float((synthetic.model(x_test).argmax(1) == y_test).float().mean())
    cert = synthetic.certificate()
    assert acc > 0.95
    assert cert.budget >= 1
    # m* is the largest m with m*C/b + margin < every step's smallest radius.
    m = cert.budget
    assert m * cert.unit + cert.rounding_margin < cert.min_radius <= (m + 1) * cert.unit + cert.rounding_margin


def test_within_budget_retraining_is_bit_identical(synthetic):
    m_star = synthetic.certificate().budget
    gen = torch.Generator().manual_seed(11)
    for m in sorted({1, m_star}):
        forget = torch.randperm(20000, generator=gen)[:m]
        check = synthetic.check_request(forget)
        assert check.status == "exact" and check.steps_checked_exactly == 0  # a-priori, no gradients
        retrained = synthetic_trainer(exclude=forget).train(steps=20)
        assert first_difference(synthetic, retrained) is None
        assert params_equal(synthetic, retrained)


def test_per_request_check_beyond_budget_on_synthetic(synthetic):
    """A request larger than m* but within M: the check re-quantizes the fragile coordinates."""
    m_star = synthetic.certificate().budget
    assert m_star + 3 <= synthetic.max_request
    forget = torch.arange(100, 100 + m_star + 3)
    check = synthetic.check_request(forget)
    assert check.steps_checked_exactly > 0  # this request really needs the per-request check
    retrained = synthetic_trainer(exclude=forget, max_request=8).train(steps=20)
    diff = first_difference(synthetic, retrained)
    if check.status == "exact":
        assert diff is None and params_equal(synthetic, retrained)
    else:
        assert check.status == "diverges" and diff == check.first_divergent_step


@pytest.mark.parametrize("batch_size,epochs", [(350, 6), (1400, 30)])
def test_per_request_check_predicts_retraining_on_digits(batch_size, epochs):
    """Random requests of 1..3 ids: each answer is compared with a real retraining run."""
    digits = digits_trainer(batch_size=batch_size).train(epochs=epochs)
    gen = torch.Generator().manual_seed(2024)
    outcomes = []
    for i in range(8):
        forget = torch.randperm(1400, generator=gen)[: 1 + i % 3]
        check = digits.check_request(forget)
        retrained = digits_trainer(batch_size=batch_size, exclude=forget).train(epochs=epochs)
        diff = first_difference(digits, retrained)
        outcomes.append(check.status)
        if check.status == "exact":
            assert diff is None, f"certified exact but retraining differs at step {diff}"
            assert params_equal(digits, retrained)
        elif check.status == "diverges":
            assert diff == check.first_divergent_step
        else:  # undecided or over budget: every step before it must still be identical
            assert diff is None or diff >= check.first_divergent_step
    assert "exact" in outcomes or "diverges" in outcomes


def test_resume_from_divergent_step_equals_retraining(digits):
    gen = torch.Generator().manual_seed(7)
    for _ in range(10):
        forget = torch.randperm(1400, generator=gen)[:2]
        check = digits.check_request(forget)
        if not check.certified:
            break
    else:
        pytest.skip("every sampled request was certified; nothing to resume")
    resumed = digits_trainer().train(epochs=6)
    resumed.resume_without(forget, check.first_divergent_step)
    retrained = digits_trainer(exclude=forget).train(epochs=6)
    assert params_equal(resumed, retrained)
    assert first_difference(resumed, retrained) is None


def test_replay_rebuilds_every_step_bit_for_bit():
    trainer = digits_trainer()
    snapshots = []
    for ids in trainer.batches(epochs=2):
        snapshots.append([p.detach().clone() for p in trainer.params])
        trainer.step(ids)
    for t in (0, 3, len(snapshots) - 1):
        assert all(torch.equal(a, b) for a, b in zip(trainer.replay(t), snapshots[t]))


def test_batches_follow_the_schedule_minus_forgotten_ids():
    schedule = BatchSchedule(torch.arange(10, 30), batch_size=6, seed=3)
    full = [s.ids for s in schedule.steps(0, 8)]
    removed = torch.tensor([full[1][0].item(), full[1][1].item(), full[5][2].item()])
    cut = [s.ids for s in schedule.steps(0, 8, removed)]
    assert schedule.batches_per_epoch == 4 and [len(b) for b in full[:4]] == [6, 6, 6, 2]
    assert torch.equal(torch.sort(torch.cat(full[:4])).values, torch.arange(10, 30))  # one epoch = all ids
    assert not torch.equal(full[0], full[4])  # a fresh permutation each epoch
    for a, b in zip(full, cut):
        assert torch.equal(a[~torch.isin(a, removed)], b)  # deleted inside their batch, never re-chunked
    # Steps asked out of order (the cached permutation switches epochs) give the same batches, and
    # a caller changing a returned batch does not change the schedule.
    for t in (6, 1, 5, 0, 7):
        got = schedule.step(t).ids
        assert torch.equal(got, full[t])
        got.fill_(-1)
    assert torch.equal(BatchSchedule(torch.arange(10, 30), batch_size=6, seed=3).step(1).ids, schedule.step(1).ids)


def test_empty_batch_makes_no_update():
    x, y, _, _ = digits_data()
    trainer = digits_trainer(batch_size=700)
    first = trainer.schedule.step(0).ids
    trainer.forgotten = first.clone()
    trainer.train(steps=1)
    assert not trainer.records[0].applied
    assert all(torch.equal(p, q) for p, q in zip(trainer.params, trainer.initial))


def test_step_refuses_a_batch_other_than_the_scheduled_one():
    trainer = digits_trainer()
    with pytest.raises(ValueError, match="scheduled batch"):
        trainer.step(torch.arange(350))


def test_certificate_is_json_and_readable(synthetic):
    cert = synthetic.certificate()
    data = json.loads(cert.to_json())
    assert data["budget_m_star"] == cert.budget and data["mode"] == "analytic"
    assert data["clip_norm"] == 1.0 and data["batch_size"] == 20000 and len(data["min_radius_per_step"]) == 20
    assert all(0.0 <= c <= 1.0 for c in data["coverage"])
    assert data["coverage"] == sorted(data["coverage"], reverse=True)
    text = str(cert)
    assert f"m* = {cert.budget}" in text and "C/b" in text
    rebuilt = AprioriCertificate.from_dict(data)
    assert rebuilt.budget == cert.budget and rebuilt == cert


def test_mc_mode_trains_and_states_its_probability():
    trainer = synthetic_trainer(mode="mc").train(steps=5)
    cert = trainer.certificate()
    assert cert.mode == "mc" and "probability" in str(cert)
    check = trainer.check_request([1])
    assert check.status in ("probable", "undecided")


def test_framework_d_goes_to_the_fallback():
    x, y, _, _ = digits_data()
    trainer = digits_trainer(framework="D", sigma_data=0.1, n0=2, n=6, batch_size=700).train(steps=2)
    check = trainer.check_request([int(trainer.batch_ids(0)[0])])
    assert check.status == "uncertifiable" and check.first_divergent_step == 0
    assert trainer.certificate().mode == "D"


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="clip_norm"):
        synthetic_trainer(clip_norm=0.0)
    with pytest.raises(ValueError, match="sigma_data"):
        synthetic_trainer(framework="D")
    with pytest.raises(ValueError, match="sigma"):
        synthetic_trainer(sigma=-1.0)
