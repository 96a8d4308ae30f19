"""The README's quick start and commands are what the project really runs."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _fenced(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_quick_start_runs_and_learns(tmp_path, monkeypatch):
    """The Python quick start, verbatim, trains digits_cnn to > 90 % validation accuracy."""
    pytest.importorskip("sklearn")
    block = next(b for b in _fenced("python") if "load_dataset(\"digits\")" in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README quick start", "exec"), namespace)
    assert namespace["history"].history["val_accuracy"][-1] > 0.9
    assert (tmp_path / "digits.npz").is_file()


def test_ci_runs_the_readme_test_command():
    """.ci/run ends with exactly the README's test command."""
    test_command = next(b.strip() for b in _fenced("bash") if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()


def test_cli_help_lists_every_command():
    """`python -m partrain --help` names train, evaluate, gradcheck and bench."""
    out = subprocess.run([sys.executable, "-m", "partrain", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for command in ("train", "evaluate", "gradcheck", "bench"):
        assert command in out
