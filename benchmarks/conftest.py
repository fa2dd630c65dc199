"""Collects each benchmark's median time and prints ratios against the baselines of the same run
(DESIGN section 9). Results also go to benchmarks/last_run.json for RESULTS.md."""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

_RESULTS: dict[str, dict] = {}
_PAIRS: list = []   # (name, kernel key, baseline key, field) registered by benchmark files
_NOTES: dict = {}   # other measured figures (e.g. compression ratios), written to last_run.json


@pytest.fixture
def record():
    """record(key, benchmark, elements=..., bytes=..., draws=...) after benchmark(...) ran."""
    def _record(key, benchmark, *, elements, bytes_moved=None, draws=None):
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # --benchmark-disable: nothing was timed
            return
        median = stats.stats.median
        entry = {"median_s": median, "elements": elements, "rounds": stats.stats.rounds}
        if bytes_moved is not None:
            entry["GB_per_s"] = bytes_moved / median / 1e9
        if draws is not None:
            entry["draws_per_s"] = draws / median
        entry["elements_per_s"] = elements / median
        _RESULTS[key] = entry
    return _record


@pytest.fixture
def compare():
    """compare(name, kernel_key, baseline_key, field="elements_per_s"): a ratio printed at the end."""
    def _compare(name, kernel, base, field="elements_per_s"):
        if (name, kernel, base, field) not in _PAIRS:
            _PAIRS.append((name, kernel, base, field))
    return _compare


@pytest.fixture
def note():
    """note(key, value): a non-timing result (JSON-serializable) kept in last_run.json."""
    def _note(key, value):
        _NOTES[key] = value
    return _note


def _ratio(a: str, b: str, field="elements_per_s"):
    if a in _RESULTS and b in _RESULTS:
        return _RESULTS[a][field] / _RESULTS[b][field]
    return None


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS and not _NOTES:  # a run of only untimed figures still reports them
        return
    tr = terminalreporter
    tr.section("unlearn_ext: throughput and ratios (same run)")
    for key, e in sorted(_RESULTS.items()):
        extra = []
        if "GB_per_s" in e:
            extra.append(f"{e['GB_per_s']:.2f} GB/s")
        if "draws_per_s" in e:
            extra.append(f"{e['draws_per_s'] / 1e9:.3f} G draws/s")
        tr.write_line(f"{key:40s} median {e['median_s'] * 1e3:9.2f} ms  "
                      f"{e['elements_per_s'] / 1e6:9.1f} M elem/s  " + "  ".join(extra))
    ratios = {}
    for kernel, base in (("mc/kernel", "mc/eager"), ("mc/kernel", "mc/reference"),
                         ("analytic/kernel", "analytic/eager"), ("analytic/kernel", "analytic/reference"),
                         ("step_analytic/kernel", "step_analytic/eager"),
                         ("step_mc/kernel", "mc/eager"),
                         ("pcmu_step_analytic/pcmu", "pcmu_step/plain_sgd"),
                         ("pcmu_step_analytic/pcmu", "pcmu_step_analytic/eager"),
                         ("pcmu_step_mc/pcmu", "pcmu_step/plain_sgd"),
                         ("pcmu_step_mc/pcmu", "pcmu_step_mc/eager"),
                         ("pcmu_step_D/pcmu", "pcmu_step/plain_sgd"),
                         ("pcmu_step_D/pcmu", "pcmu_step_mc/eager"),
                         ("request/check", "request/retrain")):
        r = _ratio(kernel, base)
        if r is not None:
            ratios[f"{kernel} vs {base}"] = r
    copy = _RESULTS.get("copy/torch")
    for key in ("analytic/kernel", "step_analytic/kernel"):
        if copy and key in _RESULTS and "GB_per_s" in _RESULTS[key]:
            ratios[f"{key} fraction of copy bandwidth"] = _RESULTS[key]["GB_per_s"] / copy["GB_per_s"]
    for name, kernel, base, field in _PAIRS:
        r = _ratio(kernel, base, field)
        if r is not None:
            ratios[name] = r
    for name, r in ratios.items():
        tr.write_line(f"{name:60s} {r:8.2f}" + ("x" if " vs " in name else ""))
    date = datetime.datetime.now().isoformat(timespec="seconds")
    out = {
        "date": date,
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "results": _RESULTS,
        "ratios": ratios,
        "notes": _NOTES,
    }
    path = os.environ.get("UNLEARN_BENCH_JSON", os.path.join(os.path.dirname(__file__), "last_run.json"))
    _merge_into(path, out, date)
    for key, value in _NOTES.items():
        tr.write_line(f"{key}: {value}")
    tr.write_line(f"written to {path}")


def _merge_into(path: str, out: dict, date: str) -> None:
    """Update `path` with this run's entries, keeping those of benchmarks this run did not execute
    (a run of one file must not erase the others' figures). Each entry carries the date of its run;
    ratios are only ever taken within one run (the `ratios` of the newest run that computed them)."""
    previous = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                previous = json.load(f)
        except (OSError, ValueError):
            previous = {}  # unreadable or half-written: start over rather than fail the run
    for section in ("results", "ratios", "notes"):
        merged = dict(previous.get(section) or {})
        for key, value in out[section].items():
            merged[key] = {**value, "date": date} if isinstance(value, dict) else {"value": value, "date": date}
        out[section] = merged
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=2)
    os.replace(tmp, path)
