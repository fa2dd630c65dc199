"""Peak memory of training and unlearning over a map-style dataset is flat in the dataset's size.

Each (method, size) runs in its own process (peak RSS, `ru_maxrss`, is per process): a dataset of
3x32x32 float images made on the fly from the index (12 KiB each; nothing held in memory), a small
CNN with GroupNorm, one epoch of the user's loop through `UnlearningEngine`, then a request for 1%
of the ids. Sizes: SMALL items (the "in-memory limit" of this benchmark: SMALL x 12 KiB) and 10x
that. The figure of merit is the growth of peak RSS from SMALL to 10 x SMALL against the 10x
larger dataset's bytes; it is printed and kept in last_run.json.

    .venv/bin/python -m pytest benchmarks/test_bench_memory.py -q --benchmark-only -s
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SMALL = 5_000  # above the 4096-row chunk of full-data gradient passes (mini/vectors.py)
ITEM_BYTES = 3 * 32 * 32 * 4

SCRIPT = r"""
import json, resource, sys, torch
from torch import nn
import unlearn_ext as ue

torch.set_num_threads(1)
method, n = sys.argv[1], int(sys.argv[2])

class OnTheFly(torch.utils.data.Dataset):
    def __len__(self):
        return n
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(int(i))
        return torch.randn(3, 32, 32, generator=g), int(i) % 10

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                      nn.Flatten(), nn.Linear(8 * 16 * 16, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
loss_fn = nn.CrossEntropyLoss()
loader = torch.utils.data.DataLoader(OnTheFly(), batch_size=64)
engine = ue.UnlearningEngine()
options = {"curvature_samples": 256, "lanczos_steps": 4} if method == "mini" else {}
model, optimizer, loader = engine.make_unlearnable(model, optimizer, loader, method=method, epochs=1,
                                                   loss_fn=loss_fn, anchors=1, **options)
for x, y in loader:
    optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()
after_training = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
report = engine.unlearner().unlearn(list(range(0, n, 100)))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"status": report.status, "peak_rss_mib": peak / 1024, "after_training_mib": after_training / 1024}))
"""


def _run(method: str, n: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, method, str(n)], capture_output=True, text=True, env=env,
                         timeout=1800, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method", ["retrain", "topk", "mini"])
def test_peak_memory_is_flat_in_the_dataset_size(method, note, benchmark):
    benchmark.pedantic(lambda: None, rounds=1)  # the figure here is memory, measured in subprocesses
    small, large = _run(method, SMALL), _run(method, 10 * SMALL)
    growth = large["peak_rss_mib"] - small["peak_rss_mib"]
    data_mib = 10 * SMALL * ITEM_BYTES / 2**20
    result = {"items": [SMALL, 10 * SMALL], "peak_rss_mib": [small["peak_rss_mib"], large["peak_rss_mib"]],
              "growth_mib": growth, "large_dataset_mib": data_mib, "status": large["status"]}
    note(f"memory/{method}", result)
    print(f"\n{method}: peak RSS {small['peak_rss_mib']:.0f} MiB at {SMALL} items, {large['peak_rss_mib']:.0f} MiB "
          f"at {10 * SMALL} items (dataset {data_mib:.0f} MiB): growth {growth:.0f} MiB")
    assert growth < 0.1 * data_mib, result
