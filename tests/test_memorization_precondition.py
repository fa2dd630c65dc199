"""The memorizing setting's precondition (unlearn_ext/evaluate/precondition.py): counted per run from
the original and retrain rows, and `unlearn-ext eval` says so -- with a warning naming the runs --
when label noise asked for a memorizing run and the model did not memorize."""
from __future__ import annotations

import json

import pytest

from unlearn_ext.evaluate import precondition


def _rows(seed, original, retrain):
    base = dict(dataset="d", model="m", seed=seed, ratio=0.1)
    return [dict(base, method="original", mia_auc=original), dict(base, method="retrain", mia_auc=retrain),
            dict(base, method="topk", mia_auc=0.5)]


def test_counts_runs_against_the_margin():
    records = _rows(0, 0.80, 0.55) + _rows(1, 0.60, 0.55)
    result = precondition.check(records)
    assert (result["met"], result["total"]) == (1, 2)
    assert [r["met"] for r in result["runs"]] == [True, False]
    quiet = precondition.lines(result, memorizing_asked=False)
    assert len(quiet) == 1 and "met in 1 of 2 runs" in quiet[0]
    warned = precondition.lines(result, memorizing_asked=True)
    assert len(warned) == 2 and warned[1].startswith("WARNING") and "seed 1 ratio 0.1" in warned[1]
    assert precondition.lines(precondition.check(_rows(0, 0.9, 0.5)), memorizing_asked=True)[1:] == []


def test_eval_warns_when_a_label_noise_run_did_not_memorize(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("rich")
    from unlearn_ext.cli import main
    out = tmp_path / "r.json"
    # one epoch of logistic regression cannot memorize 20% flipped labels
    assert main(["eval", "--data", "digits", "--model", "logreg", "--label-noise", "0.2", "--limit", "150",
                 "--epochs", "1", "--methods", "finetune", "--ratios", "0.1", "--seeds", "0", "--noise-floor", "0",
                 "--quiet", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    payload = json.loads(out.read_text())
    records = payload["records"]
    orig = next(r for r in records if r["method"] == "original")["mia_auc"]
    gold = next(r for r in records if r["method"] == "retrain")["mia_auc"]
    assert orig - gold < precondition.MEMORIZATION_MARGIN  # what the test relies on
    assert payload["settings"]["memorization"]["met"] == 0
    assert "WARNING: the model did not memorize in 1 of 1 runs" in printed
