"""Framework D of PCMU (docs/design.md §4): data smoothing with vote accumulation.

Per step, n0 + n noisy copies of the batch inputs (x + sigma_data * eps), one clipped,
nominal-b-normalized gradient each, each quantized at +-tau and counted by the `vote_accumulate_`
kernel; then class and radius as in `mc` mode (`vote_finalize`). The radius is in *input* space —
how far the inputs may move — and does not bound what removing a sample does, which is why
framework G (gradient smoothing) is the primary one. Cost: n0 + n per-sample gradient passes per
step instead of one (measured in benchmarks/test_bench_pcmu.py).

The noise of step t comes from a torch generator seeded with (seed, t), so a run replays exactly.
"""
from __future__ import annotations

import torch

from ..forward import eval_mode
from ..per_sample import clipped_sum64
from .smoothing import VoteCounter


def noise_generator(seed: int, step: int, device) -> torch.Generator:
    # Distinct (seed, step) pairs give distinct 63-bit seeds for realistic ranges (step < 2^31).
    return torch.Generator(device=device).manual_seed(((int(seed) & 0xFFFFFFFF) << 31 | int(step)) & (2**63 - 1))


def data_smoothed_quantize(trainer, params, ids: torch.Tensor, step: int, count_below: float):
    """(mean gradient over the noisy copies, QuantizeResult of the votes) for one step."""
    x, y = trainer.batch(ids)
    gen = noise_generator(trainer.seed, step, x.device)
    named = dict(zip(trainer.names, params))
    counter = VoteCounter([p.detach().float() for p in params], tau=trainer.tau, sigma_data=trainer.sigma_data,
                          n0=trainer.n0, n=trainer.n, alpha=trainer.alpha)
    mean = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in params]
    copies = trainer.n0 + trainer.n
    for _ in range(copies):
        noisy = x + trainer.sigma_data * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        with eval_mode(trainer.model):  # as framework G's sums (trainer.py)
            sums = clipped_sum64(trainer.model, trainer.loss_fn, noisy, y, trainer.clip_norm, named, trainer.chunk)
        v = [(sums[k] / trainer.batch_size).to(torch.float32) for k in trainer.names]
        counter.add(v)
        for acc, g in zip(mean, v):
            acc += g
    return [(m / copies).float() for m in mean], counter.finalize(count_below)
