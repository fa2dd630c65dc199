"""`unlearn-ext eval` writing to a log file or a pipe: progress arrives as one line per finished
step while the run goes on (a live bar would reach a file only when the run ends)."""
import re

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("rich")
pytest.importorskip("matplotlib")

from unlearn_ext.cli import main  # noqa: E402


def test_progress_to_a_file_is_one_flushed_line_per_step(tmp_path, capsys):
    # capsys: stdout is not a terminal, as when the user redirects it to a log.
    assert main(["eval", "--data", "digits", "--model", "logreg", "--limit", "120", "--epochs", "1",
                 "--ratios", "0.05,0.1", "--seeds", "0", "--noise-floor", "0", "--no-ud",
                 "--methods", "finetune,topk", "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    steps = [re.match(r"\[(\d+)/(\d+)\] \d+ s  \S", line) for line in captured.err.splitlines()]
    assert steps and all(steps), captured.err[-2000:]
    counts = [int(m.group(1)) for m in steps]
    totals = {int(m.group(2)) for m in steps}
    # seed 0: training + 2 methods' preparation, then per ratio: retrain + 2 methods.
    assert totals == {1 + 2 + 2 * (1 + 2)}
    assert counts == list(range(1, len(counts) + 1)) and counts[-1] == totals.pop()
    # stdout keeps the table alone
    assert not any(re.match(r"\[\d+/\d+\]", line) for line in captured.out.splitlines())
