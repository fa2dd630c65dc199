"""The README's distributed examples run as written on 2 gloo ranks (the launcher creates the group,
so the examples' own init and destroy lines are the only ones left out), in a temporary directory."""
from __future__ import annotations

import os
import tempfile

import pytest

from unlearn_ext.ledger import read_ledger

from distributed_setup import launch
from test_readme import example

TIMEOUT_S = 90
INIT = 'dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))'


def readme_worker(rank, world, code, directory):
    os.chdir(directory)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    return {"status": namespace["report"].status, "reset": namespace["count"],
            "k": namespace["selection"].count, "picked": namespace["picked"].count}


@pytest.mark.slow
def test_distributed_example_runs_on_two_ranks():
    code = example("distributed")
    assert INIT in code and "dist.destroy_process_group()" in code
    code = code.replace(INIT, "").replace("dist.destroy_process_group()", "")
    with tempfile.TemporaryDirectory() as directory:
        got = launch(readme_worker, 2, TIMEOUT_S, code, directory)
        requests = read_ledger(os.path.join(directory, "deletions"))["requests"]
    assert got[0]["status"] == got[1]["status"] == requests[0]["status"]
    assert [r["ids"] for r in requests] == [[3, 17, 42]]
    assert got[0]["k"] == got[1]["k"] == sum(g["reset"] for g in got) > 0
    assert got[0]["picked"] == 10


def ddp_readme_worker(rank, world, code):
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    report = namespace.get("report")
    return {"status": None if report is None else report.status, "ids": None if report is None else report.ids}


@pytest.mark.slow
def test_ddp_loop_example_runs_on_two_ranks():
    code = example("distributed-ddp")
    assert INIT in code and "dist.destroy_process_group()" in code
    code = code.replace(INIT, "").replace("dist.destroy_process_group()", "")
    got = launch(ddp_readme_worker, 2, TIMEOUT_S, code)
    assert got[0]["ids"] == [3, 17, 42] and got[0]["status"] in ("unlearned", "fallback")
    assert got[1] == got[0]  # every rank answered the same request
