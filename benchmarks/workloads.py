"""Benchmark workloads: parameter lists shaped like real models (DESIGN section 9)."""
from __future__ import annotations

import dataclasses
import os

import torch

# Which device the kernel benchmarks run on (UNLEARN_BENCH_DEVICE=cuda on a GPU machine).
DEVICE = os.environ.get("UNLEARN_BENCH_DEVICE", "cpu")


def resnet18_shapes() -> list[tuple[int, ...]]:
    """Trainable parameter shapes of torchvision's ResNet-18 (62 tensors, 11,689,512 values)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for out_ch, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            first = block == 0
            shapes += [(out_ch, in_ch if first else out_ch, 3, 3), (out_ch,), (out_ch,),
                       (out_ch, out_ch, 3, 3), (out_ch,), (out_ch,)]
            if first and (stride != 1 or in_ch != out_ch):
                shapes += [(out_ch, in_ch, 1, 1), (out_ch,), (out_ch,)]
        in_ch = out_ch
    shapes += [(1000, 512), (1000,)]
    return shapes


def gradient_list(scale: float = 1e-2, seed: int = 0, dtype=torch.float32, device="cpu"):
    """Gradient-like tensors (normal, std `scale`) with ResNet-18's shapes."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen) * scale).to(dtype=dtype, device=device) for s in resnet18_shapes()]


def sync() -> None:
    """Waits for queued GPU work, so a timing covers the kernel and not just its launch."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def run_timed(benchmark, fn, rounds: int, warmup_rounds: int = 1):
    """benchmark.pedantic over fn, synchronizing after each call; returns fn's result."""
    def timed():
        out = fn()
        sync()
        return out
    return benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)


def pcmu_with_long_history(make_trainer, trained: int, steps: int, make_fresh=None):
    """A fresh PCMU trainer (`make_fresh()`, default `make_trainer()`) holding `steps` step records:
    `trained` steps are really trained (by `make_trainer()`) and their records repeated, renumbered,
    up to `steps` (training that many is out of reach here). The records share their tensors, which
    is what a benchmark of reads wants (a fresh trainer over a history store writes every one)."""
    trainer = make_trainer().train(steps=trained)
    state, base = trainer.state_dict(), list(trainer.records)
    records = [dataclasses.replace(base[t % trained], step=t, offset=trainer.offset_of(t)).to_state()
               for t in range(steps)]
    fresh = (make_fresh or make_trainer)()
    fresh.load_state_dict({**state, "records": records})
    return fresh
