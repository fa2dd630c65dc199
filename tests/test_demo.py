"""The README's demo runs both PCMU examples end to end and its figures are consistent."""
import json

import pytest

pytest.importorskip("sklearn")

from unlearn_ext.cli import main  # noqa: E402


def test_demo_runs_and_certifies(capsys):
    assert main(["demo", "--json", "--requests", "4"]) == 0
    out = {r["example"]: r for r in json.loads(capsys.readouterr().out)["examples"]}
    synthetic, digits = out["synthetic"], out["digits"]
    assert synthetic["pcmu_test_accuracy"] > 0.95 and synthetic["plain_sgd_test_accuracy"] > 0.95
    assert synthetic["certificate"]["budget_m_star"] >= 1  # DESIGN section 4: this setting has m* >= 1
    assert digits["certificate"]["budget_m_star"] == 0     # and digits has m* = 0
    assert digits["pcmu_test_accuracy"] > 0.7
    for r in (synthetic, digits):
        q = r["requests"]
        assert q["certified"] + sum(v for k, v in q["by_status"].items() if k not in ("exact", "probable")) == 4
        assert len(r["deletions"]) >= 1


def test_pcmu_command_prints_a_report(capsys):
    assert main(["pcmu", "synthetic", "--requests", "2"]) == 0
    text = capsys.readouterr().out
    assert "m* =" in text and "plain SGD" in text and "ledger:" in text
