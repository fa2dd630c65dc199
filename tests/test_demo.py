"""The PCMU examples (`unlearn-ext pcmu ...`) run end to end and their figures are consistent.
The harness demo (`unlearn-ext demo`) is covered in tests/test_cli.py."""
import json

import pytest

pytest.importorskip("sklearn")

from unlearn_ext.cli import main  # noqa: E402


@pytest.mark.parametrize("example", ["synthetic", "digits"])
def test_pcmu_examples_run_and_certify(capsys, example):
    assert main(["pcmu", example, "--json", "--requests", "4"]) == 0
    r = json.loads(capsys.readouterr().out)["examples"][0]
    if example == "synthetic":
        assert r["pcmu_test_accuracy"] > 0.95 and r["plain_sgd_test_accuracy"] > 0.95
        assert r["certificate"]["budget_m_star"] >= 1  # docs/design.md §4: this setting has m* >= 1
    else:
        assert r["certificate"]["budget_m_star"] == 0  # and digits has m* = 0
        assert r["pcmu_test_accuracy"] > 0.7
    q = r["requests"]
    assert q["certified"] + sum(v for k, v in q["by_status"].items() if k not in ("exact", "probable")) == 4
    assert len(r["deletions"]) >= 1


def test_pcmu_command_prints_a_report(capsys):
    assert main(["pcmu", "synthetic", "--requests", "2"]) == 0
    text = capsys.readouterr().out
    assert "m* =" in text and "plain SGD" in text and "ledger:" in text
