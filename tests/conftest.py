"""What the test modules share: paths, running the command line and scripts in
subprocesses (offline, with this checkout first on the path), their checks, and random data."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent  # support modules and scripts live here
ROOT = TESTS.parent
SHARED_DATA = ROOT.parent / "shared" / "data"  # the real data sets every developer and CI has
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def subprocess_env() -> dict:
    """The environment of every subprocess: this checkout's partrain first on the path, and
    every HTTP(S) request sent to a closed local port so that no test can download anything."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    for key in ("no_proxy", "NO_PROXY"):
        env.pop(key, None)
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):
        env[key] = "http://127.0.0.1:9"
    env["PYTHONWARNINGS"] = "ignore"  # e.g. a DeprecationWarning must not count as an error line
    return env


def run_partrain(*args, cwd, timeout: float = 180, env: dict | None = None):
    """`python -m partrain ARGS` in `cwd`; the CompletedProcess (text) with `.elapsed` set."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "partrain", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env=env or subprocess_env())
    proc.elapsed = time.perf_counter() - start
    return proc


def assert_ok(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n" \
                                 f"{proc.stderr}"


def assert_usage_error(proc, *needles: str) -> str:
    """Exit status 2, exactly one non-empty line on stderr, no traceback, every needle in it."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (f"exit {proc.returncode}, expected 2\nstdout:\n{proc.stdout}"
                                  f"\nstderr:\n{proc.stderr}")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, f"expected ONE line on stderr, got {len(lines)}:\n{proc.stderr}"
    message = lines[0]
    assert message.startswith("partrain"), message
    for needle in needles:
        assert needle.lower() in message.lower(), f"{needle!r} not in: {message}"
    return message


def run_python(script: Path, *args, cwd, timeout: float = 180):
    """`python SCRIPT ARGS` in `cwd`, as `run_partrain` runs the command line."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=subprocess_env())
    proc.elapsed = time.perf_counter() - start
    return proc


def make_data(model, m: int, seed: int = 0, normal: bool = False):
    """`m` random examples of `model`'s input shape and dtype (uniform in [0, 1), or standard
    normal), with random labels."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(m, *model.input_shape)) if normal else \
        rng.random((m, *model.input_shape))
    return X.astype(model.dtype), rng.integers(0, model.n_classes, size=m)


HOLDER = """
import sys
from partrain import Callback, Trainer, zoo
from partrain.data import load_dataset

class Wait(Callback):
    def on_train_begin(self, trainer):
        print("claimed", flush=True)
        sys.stdin.readline()

data = load_dataset("synthetic", shape=(8, 8, 1))
with Trainer(zoo.digits_cnn(), checkpoint=sys.argv[1], progress=False) as trainer:
    trainer.fit(data.x_train[:64], data.y_train[:64], epochs=1, callbacks=[Wait()])
print("done", flush=True)
"""


def start_holder(checkpoint: Path, cwd: Path) -> subprocess.Popen:
    """A Python process whose Trainer holds `checkpoint` (inside fit) until told to go on."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(checkpoint)], cwd=cwd,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=subprocess_env())
    assert holder.stdout.readline().strip() == "claimed"
    return holder


def write_mnist_like_npz(path: Path, n_train: int, n_test: int) -> Path:
    """A tiny 28x28x1, 10-class dataset of random uint8 pixels in the npz:PATH layout: enough
    to run the MNIST plumbing anywhere (accuracy is tested on the real files)."""
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
             y_train=np.arange(n_train) % 10,
             x_test=rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
             y_test=np.arange(n_test) % 10)
    return path
