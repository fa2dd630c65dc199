"""What the per-step history digest costs at record time (docs/design.md §5 and §12): the digest
of a field's codes (history/codecs.py payload_digest, SHA-256 over the encoded arrays), taken once
per recorded field, against recording the same step into a host store, which includes it. Workload:
11.7M gradient-like values in 62 tensors (ResNet-18 shapes), int8 and fp32 codecs.

Reported (same run, median of ROUNDS): the digest's time, the whole record's time, and their ratio
(the share of a record spent on the digest).

Run (it uses the `note` fixture, so not with --benchmark-only):
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m pytest -q -s -p no:cacheprovider benchmarks/test_bench_history_digest.py
"""
from __future__ import annotations

import statistics
import time

import pytest

from unlearn_ext.history import FieldSpec, HistoryStore
from unlearn_ext.history import codecs as hc
from workloads import gradient_list

ROUNDS = 5


def _median(fn) -> float:
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@pytest.mark.parametrize("codec", ["int8", "fp32"])
def test_digest_share_of_a_record(codec, note):
    grads = gradient_list()
    store = HistoryStore({"grads": FieldSpec([tuple(g.shape) for g in grads], codec)}, tier="host")
    steps = iter(range(10**6))
    record = _median(lambda: store.record(next(steps), {"grads": grads}))
    encoded = hc.encode_plain(grads, codec, store.block_size)
    digest = _median(lambda: hc.payload_digest(encoded))
    note(f"history_digest/{codec}", {"values": sum(g.numel() for g in grads), "digest_ms": digest * 1e3,
                                     "record_ms": record * 1e3, "digest_share_of_record": digest / record})
    print(f"\n{codec}: digest {digest * 1e3:.1f} ms, record (digest included) {record * 1e3:.1f} ms, "
          f"share {digest / record:.2f}")
