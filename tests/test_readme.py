"""The README's examples run as written: the "Your own model" block for every method the engine
offers (only the `method=` value changes)."""
from __future__ import annotations

import pathlib
import re

import pytest
import torch

from unlearn_ext.engine import METHODS

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def example(name: str) -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"<!-- example: {name} [^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README has no example {name!r}"
    return match.group(1)


def run_example(name: str, replace: tuple[str, str] | None = None) -> dict:
    code = example(name)
    if replace is not None:
        code = code.replace(*replace)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


def test_your_own_model_example_gives_the_same_answer_every_run(capsys):
    """The example is seeded (initial weights, batch order): Mini-Unlearning's answer -- replayed
    or fallen back -- and the weights are the same in every run, as a reader copying it sees."""
    first, second = run_example("user-loop"), run_example("user-loop")
    torch.manual_seed(12345)  # another process-wide RNG state before the run: the example seeds its own
    third = run_example("user-loop")
    assert first["report"].status == second["report"].status == third["report"].status
    for other in (second, third):
        assert all(torch.equal(a, b) for a, b in zip(first["model"].state_dict().values(),
                                                     other["model"].state_dict().values()))


@pytest.mark.parametrize("method", METHODS)
def test_your_own_model_example_runs_for_every_method(method, capsys):
    code = example("user-loop")
    assert 'method="mini"' in code
    namespace: dict = {}
    # PCMU needs its smoothing options (README's table says so); the rest of the block is as written.
    options = ', clip_norm=1.0, tau=0.006, sigma=0.01' if method == "pcmu" else ""
    code = code.replace('method="mini"', f'method="{method}"{options}')
    exec(compile(code, str(README), "exec"), namespace)
    report, ratio = namespace["report"], None
    assert report.ids == [3, 17, 42] and report.status in ("unlearned", "retrained", "fallback", "certified")
    out = capsys.readouterr().out
    ratio = float(out.split("d/d0 against retraining:")[1].split()[0])
    if method == "retrain":
        assert ratio == 0.0
    elif method in ("mini", "deltagrad") and report.status == "unlearned":
        assert ratio < 1.0
