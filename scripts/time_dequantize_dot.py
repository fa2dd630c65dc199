"""Fastest-of-N wall time of ops.dequantize_dot (int8, block 256) on the CPU, for comparing builds:
run it with PYTHONPATH pointing at each tree, alternated, and compare in the same session.

    OMP_NUM_THREADS=1 PYTHONPATH=TREE python scripts/time_dequantize_dot.py [--numel 5000000] [--runs 200]
"""
import argparse
import time

import torch

import unlearn_ext as ue
from unlearn_ext import ops


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--numel", type=int, default=5_000_000)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    x = [torch.randn(args.numel, generator=gen)]
    v = [torch.randn(args.numel, generator=gen)]
    codes, scales = ops.blockwise_quantize(x, 8, 256)
    best = float("inf")
    for _ in range(args.runs):
        start = time.perf_counter()
        ops.dequantize_dot(codes, scales, v, 8, 256)
        best = min(best, time.perf_counter() - start)
    print(f"{ue.__file__}: backend {ue.backend()}, {args.numel} elements, fastest of {args.runs}: "
          f"{best * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
