"""The README's demo runs and learns; the certificate is computed from real radii."""
import pytest

pytest.importorskip("sklearn")

from unlearn_ext.cli import main  # noqa: E402


def test_demo_runs_and_certifies(capsys):
    assert main(["demo", "--json"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["analytic"]["test_accuracy"] > 0.9
    assert out["plain_sgd"]["test_accuracy"] > 0.9
    assert out["analytic"]["budget_m_star"] >= 1  # DESIGN section 4: this setting has m* >= 1
    assert out["mc"]["budget_m_star"] >= 0
