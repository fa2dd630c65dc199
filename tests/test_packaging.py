"""What an installed package shows a user before any unlearning: a light import, the command's
version and help, and a plain message when the compiled extension is missing."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from test_layout import PACKAGE, ROOT

pytest.importorskip("rich")
pytest.importorskip("matplotlib")

from unlearn_ext.cli import main  # noqa: E402


def run_python(code: str, path: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=path,
                          timeout=300)


def test_import_does_not_load_the_reporting_libraries():
    """matplotlib, rich and scikit-learn are for the command and the harness only."""
    done = run_python("import sys, unlearn_ext\n"
                      "print(sorted(m for m in ('matplotlib', 'rich', 'sklearn') if m in sys.modules))", str(ROOT))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_version_is_the_packages(capsys):
    declared = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith(f"unlearn-ext {declared} (")


@pytest.mark.parametrize("command", [[], ["demo"], ["eval"], ["pcmu"], ["bench"], ["info"]])
def test_help_shows_no_escaped_percent(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([*command, "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "usage: unlearn-ext" in text and "%%" not in text


def test_a_missing_extension_is_reported_as_not_built(tmp_path):
    """A copy of the package without the compiled module: the first op warns that it is not built
    (an import of a missing submodule used to read as 'a circular import') and still answers."""
    shutil.copytree(PACKAGE, tmp_path / "unlearn_ext", ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    # An editable install answers for unlearn_ext's submodules from its own checkout (its build
    # included) before the path is searched: without its finder, only the copy is seen.
    done = run_python("import sys\n"
                      "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
                      "import warnings, torch, unlearn_ext as ue\n"
                      "warnings.simplefilter('always')\n"
                      "print(ue.backend(), ue.philox_bits(torch.arange(2), 1, seed=1).shape)", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["reference", "torch.Size([2,", "1])"]
    assert "compiled extension not built" in done.stderr and "circular" not in done.stderr
