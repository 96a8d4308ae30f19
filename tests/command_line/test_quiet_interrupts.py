"""Issue 23, item 7: a Ctrl-C that lands while `python -m partrain` is still importing exits
quietly with status 130, and a resumed run names a changed seed by its numbers.

The import is made slow on cue by a `sitecustomize` module (first on PYTHONPATH) whose import
hook, when partrain imports its first submodule, writes a marker file and sleeps: the test
waits for the marker, sends SIGINT, and reads what the process printed.
"""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_ok, assert_usage_error, run_partrain, subprocess_env

SCRIPT = Path(sys.executable).parent / "partrain"
SLOW_IMPORT = '''
import os, sys, time

class SlowPartrain:
    """Sleep (interruptibly) when partrain imports its first submodule."""
    def find_spec(self, name, path=None, target=None):
        if name == "partrain.functional" and os.environ.get("SLOW_IMPORT_MARKER"):
            open(os.environ["SLOW_IMPORT_MARKER"], "w").close()
            time.sleep(60)
        return None

sys.meta_path.insert(0, SlowPartrain())
'''


@pytest.mark.parametrize("how", [["-m", "partrain"], [str(SCRIPT)]], ids=["-m", "script"])
def test_ctrl_c_while_importing_exits_quietly_with_130(how, tmp_path):
    """Before: a 5-line KeyboardInterrupt traceback (exit status -2, killed by SIGINT)."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SLOW_IMPORT)
    marker = tmp_path / "importing"
    env = subprocess_env()
    env["PYTHONPATH"] = f"{tmp_path / 'site'}:{env['PYTHONPATH']}"
    env["SLOW_IMPORT_MARKER"] = str(marker)
    if not Path(how[0]).exists() and how[0] != "-m":
        pytest.skip("no partrain console script next to this Python")
    command = how if how[0] != "-m" else [sys.executable, *how]
    proc = subprocess.Popen([*command, "train", "--dataset", "synthetic"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.exists(), proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, (proc.returncode, err)
    assert err.strip() == "" and out.strip() == "", err


def test_a_changed_seed_is_named_by_its_numbers(tmp_path):
    """Before: "--seed on (checkpoint: off)": a lookup keyed by True/False matched 1 and 0."""
    options = ["--dataset", "synthetic", "--quiet", "--checkpoint", "ck.npz"]
    assert_ok(run_partrain("train", *options, "--epochs", 1, "--seed", 0, cwd=tmp_path))
    proc = run_partrain("train", *options, "--epochs", 2, "--seed", 1, "--resume", "ck.npz",
                        cwd=tmp_path)
    message = assert_usage_error(proc, "--seed 1 (checkpoint: 0)")
    assert "on" not in message.split("--seed")[1].split(")")[0], message


def test_switches_are_still_named_on_and_off(tmp_path):
    options = ["--model", "mlp", "--dataset", "synthetic", "--quiet", "--checkpoint", "ck.npz"]
    assert_ok(run_partrain("train", *options, "--epochs", 1, cwd=tmp_path))
    proc = run_partrain("train", *options, "--batchnorm", "--epochs", 2, "--resume", "ck.npz",
                        cwd=tmp_path)
    assert_usage_error(proc, "--batchnorm on (checkpoint: off)")

