"""Peak memory of one unlearning call, for the harness's peak_memory_bytes column.

CPU ("cpu_rss_growth"): the process's peak resident set size during the call minus its resident
size when the call began. Linux keeps the peak (VmHWM in /proc/self/status); writing 5 to
/proc/self/clear_refs resets it to the current size, so the peak is the call's own, exact, with no
sampling. What it measures and what it does not:
  * pages the process newly made resident during the call — torch, numpy and Python allocations
    alike (tracemalloc would see only Python's);
  * not memory the allocator already held from earlier work and reused (freed blocks kept by
    glibc or torch's CPU allocator): the figure is a lower bound of the call's working memory and
    depends on what ran before it in the same process;
  * anything else the process did meanwhile (other threads, e.g. a progress bar) is included;
  * elsewhere than Linux, or where /proc/self/clear_refs cannot be written, it is None.
CUDA ("cuda_max_allocated"): torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus
the allocation at the start: tensors only, not the caching allocator's reserve or the context.
"""
from __future__ import annotations

import torch

_STATUS, _CLEAR_REFS = "/proc/self/status", "/proc/self/clear_refs"


def _status_kib(key: str) -> int | None:
    try:
        with open(_STATUS, encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        with open(_CLEAR_REFS, "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """with PeakMemory(cuda=False) as peak: work() -> peak.bytes (None if not measurable), peak.kind."""

    def __init__(self, cuda: bool = False):
        self.cuda = cuda and torch.cuda.is_available()
        self.kind = "cuda_max_allocated" if self.cuda else "cpu_rss_growth"
        self.bytes: int | None = None
        self._start: int | None = None

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        elif _reset_rss_peak():
            self._start = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self._start is None:
            return
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = max(torch.cuda.max_memory_allocated() - self._start, 0)
            return
        peak = _status_kib("VmHWM")
        self.bytes = None if peak is None else max(peak - self._start, 0) * 1024
