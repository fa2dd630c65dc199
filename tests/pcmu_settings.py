"""Small PCMU training settings shared by the PCMU tests (not tests themselves)."""
from __future__ import annotations

import torch

from unlearn_ext.pcmu import PCMUTrainer
from unlearn_ext.evaluate.pcmu_examples import load

_CACHE: dict = {}


def synthetic_data():
    """docs/design.md §4's setting where m* >= 1 (make_classification, 20k train, standardized)."""
    if "synthetic" not in _CACHE:
        _CACHE["synthetic"] = load("synthetic")
    return _CACHE["synthetic"]


def digits_data():
    if "digits" not in _CACHE:
        _CACHE["digits"] = load("digits")
    return _CACHE["digits"]


def linear(d_in, d_out, zero=True, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Linear(d_in, d_out)
    if zero:
        torch.nn.init.zeros_(m.weight), torch.nn.init.zeros_(m.bias)
    return m


def synthetic_trainer(mode="analytic", exclude=None, max_request=4, **kw):
    x, y, _, _ = synthetic_data()
    args = dict(batch_size=20000, clip_norm=1.0, lr=0.1, tau=0.1, sigma=0.005, mode=mode, max_request=max_request)
    args.update(kw)
    return PCMUTrainer(linear(5, 3), torch.nn.functional.cross_entropy, (x, y), exclude=exclude, **args)


def digits_trainer(exclude=None, batch_size=350, max_request=3, **kw):
    x, y, _, _ = digits_data()
    args = dict(batch_size=batch_size, clip_norm=1.0, lr=0.05, tau=0.006, sigma=0.01, max_request=max_request, seed=0)
    args.update(kw)
    return PCMUTrainer(linear(64, 10, zero=False), torch.nn.functional.cross_entropy, (x, y), exclude=exclude, **args)


def first_difference(a: PCMUTrainer, b: PCMUTrainer):
    """First step whose update differs between two trajectories (None if none): same codes at
    every step from the same start means bit-identical parameters."""
    for ra, rb in zip(a.records, b.records):
        if ra.applied != rb.applied or (ra.applied and not torch.equal(ra.codes, rb.codes)):
            return ra.step
    assert len(a.records) == len(b.records)
    return None


def params_equal(a: PCMUTrainer, b: PCMUTrainer) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.params, b.params))
