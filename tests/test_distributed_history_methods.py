"""Mini-Unlearning and DeltaGrad across 2 and 3 gloo ranks (unlearn_ext.distributed.history_methods)
against the single-process unlearners on the same data, history and request: the weights after
the request equal the single-process answer within float tolerance (the sums are grouped per rank),
and are the same bits on every rank. The curvature subsample (101 ids), F and the batches split
unevenly over 2 and 3 ranks. Set-ups or requests that differ between ranks are refused on every rank."""
from __future__ import annotations

import copy

import pytest
import torch

import unlearn_ext as ue
from unlearn_ext.distributed import DistributedDeltaGradUnlearner, DistributedMiniUnlearner
from unlearn_ext.mini.vectors import FlatModel

from distributed_setup import launch
from history_methods_setup import recorded_run as _problem

TIMEOUT_S = 120
FORGET = [3, 17, 42, 77, 101, 150, 199]
MINI_OPTIONS = dict(curvature_samples=101, lanczos_steps=6)
DELTAGRAD_OPTIONS = dict(burn_in=4, period=3, memory=2)


SINGLE = {"mini": (ue.MiniUnlearner, MINI_OPTIONS), "deltagrad": (ue.DeltaGradUnlearner, DELTAGRAD_OPTIONS)}
DISTRIBUTED = {"mini": DistributedMiniUnlearner, "deltagrad": DistributedDeltaGradUnlearner}


def _answer(unlearner) -> dict:
    report = unlearner.unlearn(FORGET)
    return {"weights": FlatModel(unlearner.model, unlearner.data).flat(), "status": report.status,
            "sample_gradients": report.sample_gradients,
            "ritz": report.details.get("ritz_values"), "exact_steps": report.details.get("exact_steps")}


def _refusal(build) -> str:
    try:
        build()
    except ValueError as exc:
        return str(exc)
    return "accepted"


def history_worker(rank, world):
    return {method: _rank_outcome(rank, method) for method in SINGLE}


def _rank_outcome(rank, method):
    model, data, store = _problem(method)
    _, options = SINGLE[method]
    cls = DISTRIBUTED[method]
    answer = _answer(cls(copy.deepcopy(model), data, store, **options))
    refusals = []
    if method == "mini":  # the ranks disagree on the curvature seed
        refusals.append(_refusal(lambda: cls(model, data, store, **options, seed=rank)))
    else:  # on DeltaGrad's period
        refusals.append(_refusal(lambda: cls(model, data, store, **{**options, "period": 3 + rank})))
    # rank 1 trained on one sample fewer: the ranks disagree on the data size
    other = _problem(method, n=199, epochs=1) if rank == 1 else _problem(method, epochs=1)
    refusals.append(_refusal(lambda: cls(*other, **options)))
    fresh = cls(model, data, store, **options)
    refusals.append(_refusal(lambda: fresh.unlearn([5] if rank == 0 else [6])))      # different requests
    refusals.append(_refusal(lambda: fresh.unlearn([5, 10**6] if rank == 0 else [5])))  # unknown id on rank 0
    return answer, refusals


def _single(method: str) -> dict:
    model, data, store = _problem(method)
    cls, options = SINGLE[method]
    return _answer(cls(model, data, store, **options))


def _compare(world: int):
    got = launch(history_worker, world, TIMEOUT_S)
    for method in SINGLE:
        want = _single(method)
        assert want["status"] == "unlearned", want  # the approximate path runs, not the fallback
        for rank, outcomes in enumerate(got):
            answer, refusals = outcomes[method]
            assert torch.equal(answer["weights"], got[0][method][0]["weights"]), \
                f"{method}: rank {rank} ended with other weights than rank 0"
            assert answer["status"] == want["status"]
            assert answer["sample_gradients"] == want["sample_gradients"]
            assert answer["exact_steps"] == want["exact_steps"]
            if want["ritz"] is not None:
                assert torch.allclose(torch.tensor(answer["ritz"]), torch.tensor(want["ritz"]), rtol=1e-4, atol=1e-6)
            assert torch.allclose(answer["weights"], want["weights"], rtol=1e-4, atol=1e-5), \
                (method, float((answer["weights"] - want["weights"]).abs().max()))
            assert "disagree on options" in refusals[0], refusals
            assert "disagree on data size" in refusals[1], refusals
            assert "disagree on the request's ids" in refusals[2], refusals
            assert "rank(s) [0] refused" in refusals[3], refusals
            assert rank != 0 or "never trained on" in refusals[3], refusals
        # the request moved the weights (the comparison above is not between two unchanged models)
        assert not torch.equal(want["weights"], FlatModel(*_problem(method)[:2]).flat())


@pytest.mark.slow
def test_two_ranks_unlearn_as_one_process():
    _compare(2)


@pytest.mark.slow
def test_three_ranks_uneven_split_unlearn_as_one_process():
    _compare(3)


def _exact_sums_data():
    """5 samples of integer features; the per-sample loss is the linear model's output, so each
    sample's gradient is its input and every sum of them is exact in float32 and float64. Over 2
    ranks (2 and 3 ids) the mean then has one rounding only: the division by 5."""
    x = torch.randint(-1000, 1000, (5, 64), generator=torch.Generator().manual_seed(0)).float()
    model = torch.nn.Linear(64, 1, bias=False)
    return model, ue.TrainingData(x, torch.zeros(5), loss=lambda out, _: out.reshape(-1))


def mean_grad_worker(rank, world):
    from unlearn_ext.distributed.history_methods import RankSplitFlatModel
    model, data = _exact_sums_data()
    flat = RankSplitFlatModel(model, data, torch.distributed.group.WORLD)
    return flat.mean_loss_grad(flat.flat(), data.ids)


def test_rank_split_mean_gradient_is_one_process_mean_when_the_sums_are_exact():
    """Each rank's sum enters as it was computed, not as its float32 mean times its count (3
    samples' mean 1/3-rounds): with exact sums the answer is the one-process FlatModel's, bit for bit."""
    model, data = _exact_sums_data()
    single = FlatModel(model, data).mean_loss_grad(FlatModel(model, data).flat(), data.ids)
    # The rounding the test catches is there: a float32 mean times its count is not the sum.
    third = data.inputs[2:].sum(0)
    assert not torch.equal((third / 3).double() * 3, third.double())
    for got in launch(mean_grad_worker, 2, TIMEOUT_S):
        assert torch.equal(got, single)
