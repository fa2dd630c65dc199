"""Distributed PCMU (unlearn_ext.distributed.pcmu) with 2 and 3 gloo ranks against the single-process
PCMUTrainer on the same data, batches and seed: parameters, every step record, the a-priori
certificate, a per-request check, and an unlearning request (certified or resumed without the ids)
equal bit for bit; the resumed model equals PCMU retraining from scratch without the ids. With 3
ranks the digits batch of 350 splits 116/117/117 (an uneven split)."""
from __future__ import annotations

import dataclasses

import torch

from unlearn_ext.distributed import DistributedPCMUTrainer, rank_slice
from unlearn_ext.pcmu import PCMUTrainer, PCMUUnlearner
from distributed_setup import launch
from pcmu_settings import digits_data

TIMEOUT_S = 90
OPTIONS = dict(batch_size=350, clip_norm=1.0, lr=0.05, tau=0.006, sigma=0.01, max_request=3, seed=0)
CHECKED = [5]                            # a small request: its check is compared
FORGOTTEN = list(range(0, 1400, 35))     # 40 ids, about 10 per batch: beyond M = 3, so resumed


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(64, 10)


def _outcome(trainer) -> dict:
    """What must be equal: weights, records, certificate, a check and an unlearning request."""
    trainer.train(epochs=2)
    out = {"params": [p.detach().clone() for p in trainer.params],
           "records": [r.to_state() for r in trainer.records],
           "certificate": dataclasses.asdict(trainer.certificate())}
    check = trainer.check_request(CHECKED)
    out["check"] = (check.status, check.first_divergent_step, check.reason, check.steps_checked_exactly)
    report = PCMUUnlearner(trainer).unlearn(FORGOTTEN)
    out["report"] = (report.status, report.how, report.sample_gradients)
    out["after"] = [p.detach().clone() for p in trainer.params]
    out["records_after"] = [r.to_state() for r in trainer.records]
    return out


def pcmu_worker(rank, world, x, y):
    outcome = _outcome(DistributedPCMUTrainer(_model(), torch.nn.functional.cross_entropy, (x, y), **OPTIONS))
    return outcome, _refusals(rank, x, y)


def _refusals(rank, x, y) -> list[str]:
    """Set-ups that would train different models on different ranks are refused on every rank."""
    messages = []
    for model, options in ((_model(), {**OPTIONS, "batch_size": 350 + rank}),
                           (torch.nn.Linear(64, 10) if rank else _model(), OPTIONS),
                           (_model(), {**OPTIONS, "clip_norm": 0.0 if rank == 1 else 1.0})):
        try:
            DistributedPCMUTrainer(model, torch.nn.functional.cross_entropy, (x, y), **options)
            messages.append("accepted")
        except ValueError as exc:
            messages.append(str(exc))
    return messages


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(p, q) for p, q in zip(a, b))
    return a == b


def _compare(world: int):
    x, y, _, _ = digits_data()
    want = _outcome(PCMUTrainer(_model(), torch.nn.functional.cross_entropy, (x, y), **OPTIONS))
    assert want["report"][0] == "retrained"  # the request exercises the fallback (resume), not only records
    got = launch(pcmu_worker, world, TIMEOUT_S, x, y)
    for rank, (outcome, refusals) in enumerate(got):
        assert "disagree on batch_size" in refusals[0], refusals
        assert "initial parameters differ" in refusals[1], refusals
        assert "rank(s) [1] refused" in refusals[2], refusals
        assert rank != 1 or "clip_norm must be > 0" in refusals[2], refusals
        for key in want:
            assert _same(outcome[key], want[key]), (rank, key)
    retrained = PCMUTrainer(_model(), torch.nn.functional.cross_entropy, (x, y), exclude=FORGOTTEN, **OPTIONS)
    retrained.train(epochs=2)
    assert all(torch.equal(p, q) for p, q in zip(got[0][0]["after"], retrained.params))


def test_two_ranks_train_check_and_unlearn_as_one_process():
    _compare(2)


def test_three_ranks_uneven_split_train_check_and_unlearn_as_one_process():
    _compare(3)


def test_rank_slices_cover_the_batch_in_order():
    ids = torch.arange(350)
    for world in (1, 2, 3, 7):
        parts = [rank_slice(ids, r, world) for r in range(world)]
        assert torch.equal(torch.cat(parts), ids)
        assert max(p.numel() for p in parts) - min(p.numel() for p in parts) <= 1
