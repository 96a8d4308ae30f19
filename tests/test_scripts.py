"""The example scripts in scripts/: --help, a short real run of each, their errors."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_cli import MNIST_FILES, ROOT, assert_ok, subprocess_env

import partrain

SCRIPTS = ROOT / "scripts"
SHARED = ROOT.parent / "shared" / "data"
SIGNS_NPZ = SHARED / "signs" / "test_signs.npz"
SIGNS_H5 = SHARED / "signs" / "test_signs.h5"

HELP = {
    "train_signs.py": ["--train", "--test", "--epochs", "--n-jobs", "--seed", "--save"],
    "train_mnist.py": ["--data-dir", "--epochs", "--limit", "--n-jobs", "--seed", "--save",
                       "98%"],
    "train_mlp.py": ["--data-dir", "--epochs", "--dropout", "--batchnorm", "--n-jobs",
                     "--seed", "--save", "96%", "--validation-split"],
    "bench_scaling.py": ["--n-jobs", "--repeats", "--duration"],
    "optimizer_placement.py": ["--model", "--batch-size", "--phases", "--steps", "--json"],
}


def run_script(name: str, *args, cwd, timeout: float = 180):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=subprocess_env())
    proc.elapsed = time.perf_counter() - start
    return proc


def _require(path: Path) -> None:
    if not path.is_file():
        pytest.skip(f"real data not available here ({path} is missing); it lives in the shared "
                    "data folder beside the repository")


@pytest.mark.parametrize("name", list(HELP))
def test_help(name, tmp_path):
    proc = run_script(name, "--help", cwd=tmp_path)
    assert_ok(proc)
    missing = [opt for opt in HELP[name] if opt not in proc.stdout]
    assert not missing, f"{missing} not in {name} --help:\n{proc.stdout}"


# ----------------------------------------------------------------------------- train_signs.py


def test_train_signs_on_the_shared_test_file_only(tmp_path):
    _require(SIGNS_NPZ)
    proc = run_script("train_signs.py", "--test", SIGNS_NPZ, "--epochs", 2, "--n-jobs", 2,
                      "--save", "signs.npz", cwd=tmp_path)
    assert_ok(proc)
    out = proc.stdout
    assert "only --test" in out and str(SIGNS_NPZ) in out, out
    m = re.search(r"train accuracy (\d\.\d+)\s+test accuracy (\d\.\d+)\s+wall time ([\d.]+) s "
                  r"\(n_jobs=2\)", out)
    assert m, out
    # trained on the first 90% of the file (the rest validates), reported on all of it
    assert "epoch" in out and "val_" in out, out
    assert "epoch   2/2" in out
    model = partrain.load(tmp_path / "signs.npz")
    assert model.input_shape == (64, 64, 3) and model.n_classes == 6
    assert model.metadata["model"] == "signs-cnn"


def test_train_signs_with_train_and_test_files(tmp_path):
    _require(SIGNS_NPZ)
    _require(SIGNS_H5)
    pytest.importorskip("h5py")
    proc = run_script("train_signs.py", "--train", SIGNS_H5, "--test", SIGNS_NPZ, "--epochs", 1,
                      "--quiet", cwd=tmp_path)
    assert_ok(proc)
    assert "only" not in proc.stdout
    assert re.search(r"train accuracy \d\.\d+\s+test accuracy \d\.\d+\s+wall time", proc.stdout)
    assert "120 training / 120 test images" in proc.stdout


def test_train_signs_errors(tmp_path):
    proc = run_script("train_signs.py", cwd=tmp_path)
    assert proc.returncode == 2 and "--train" in proc.stderr, proc.stderr
    proc = run_script("train_signs.py", "--test", "nothere.h5", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "nothere.h5" in proc.stderr


# ----------------------------------------------------------------------------- MNIST scripts


@pytest.fixture(scope="module")
def small_mnist_like(tmp_path_factory) -> Path:
    """A tiny 28x28x1, 10-class dataset (random uint8 pixels) in the npz:PATH format: enough
    to run the MNIST scripts' plumbing anywhere; their accuracy is tested on real data in
    test_real_data.py."""
    path = tmp_path_factory.mktemp("npz") / "tiny.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (256, 28, 28), dtype=np.uint8),
             y_train=np.arange(256) % 10, x_test=rng.integers(0, 256, (64, 28, 28),
                                                              dtype=np.uint8),
             y_test=np.arange(64) % 10)
    return path


def test_train_mnist_runs_and_cites_the_tutorial(small_mnist_like, tmp_path):
    proc = run_script("train_mnist.py", "--dataset", f"npz:{small_mnist_like}", "--limit", 128,
                      "--epochs", 1, "--n-jobs", 2, "--quiet", "--save", "m.npz", cwd=tmp_path)
    assert_ok(proc)
    out = proc.stdout
    assert re.search(r"test accuracy \d\.\d+\s+wall time [\d.]+ s \(n_jobs=2\)", out), out
    assert "115 training + 13 validation" in out and "98%" in out and "5 hours" in out, out
    model = partrain.load(tmp_path / "m.npz")
    assert model.input_shape == (28, 28, 1) and model.n_params == partrain.zoo.mnist_cnn().n_params


def test_train_mlp_runs_with_dropout_and_batchnorm(small_mnist_like, tmp_path):
    proc = run_script("train_mlp.py", "--dataset", f"npz:{small_mnist_like}", "--epochs", 2,
                      "--dropout", 0.2, "--batchnorm", "--n-jobs", 2, "--quiet", "--save",
                      "mlp.npz", cwd=tmp_path)
    assert_ok(proc)
    out = proc.stdout
    assert re.search(r"train accuracy \d\.\d+\s+test accuracy \d\.\d+\s+wall time", out), out
    assert "96%" in out and "dropout 0.2" in out and "batchnorm on" in out, out
    kinds = [layer["type"] for layer in partrain.load(tmp_path / "mlp.npz").config()["layers"]]
    assert "Dropout" in kinds and "BatchNorm" in kinds, kinds


@pytest.mark.parametrize("name", ["train_mnist.py", "train_mlp.py"])
def test_mnist_scripts_without_data_fail_in_one_line(name, tmp_path):
    """No MNIST files and no network: exit 2, the files named, no traceback."""
    proc = run_script(name, "--data-dir", tmp_path / "empty", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{name}: error:"), proc.stderr
    for filename in MNIST_FILES:
        assert filename in lines[0]


# ----------------------------------------------------------------------------- bench_scaling.py


def test_bench_scaling_runs(tmp_path):
    proc = run_script("bench_scaling.py", "--repeats", 1, "--duration", 0.2, "--warmup", 0.1,
                      cwd=tmp_path)
    assert_ok(proc)
    out = proc.stdout
    rows = [line.split() for line in out.splitlines()
            if line.startswith(("signs-cnn", "mnist-cnn")) and "partrain" in line]
    assert [(r[0], r[1], r[4]) for r in rows] == [("signs-cnn", "64", "1"),
                                                  ("signs-cnn", "64", "2"),
                                                  ("mnist-cnn", "32", "1"),
                                                  ("mnist-cnn", "32", "2")], out
    assert re.search(r"signs-cnn batch 64: n_jobs=2 runs \d+\.\d+x", out), out
    assert re.search(r"mnist-cnn batch 32: n_jobs=2 runs \d+\.\d+x", out), out
    assert "wall time" in out


def test_scaling_model_predicts_a_step_by_hand():
    """scripts/scaling_model.py's step model on numbers worked out by hand: 4 chunks on 2
    processes make 2 chunks each (2 x 1.0 x slowdown 1.5, plus the addition inside each
    group), the master the one addition across groups, the scaling, Adam and the copy."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("scaling_model", SCRIPTS / "scaling_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pieces = {"add": 0.1, "adam": 1.0, "scale": 0.5, "copy": 0.2}
    assert module.predict(1.0, 4, 2, 1.5, pieces) == pytest.approx(3.0 + 0.1 + 0.1 + 1.5 + 0.2)
    # one process: no slowdown, no copy; its own 3 additions
    assert module.predict(1.0, 4, 1, 1.5, pieces) == pytest.approx(4.0 + 0.3 + 1.5)
    # 3 chunks on 2 processes: groups [0, 2) and [2, 3); the slower group decides
    assert module.predict(1.0, 3, 2, 1.0, pieces) == pytest.approx(2.0 + 0.1 + 0.1 + 1.5 + 0.2)


def test_optimizer_placement_times_each_mode(tmp_path):
    """Every mode gets a positive step time, 'free' is its own reference, and a batch of one
    chunk is refused in one line."""
    proc = run_script("optimizer_placement.py", "--model", "digits-cnn", "--batch-size", 64,
                      "--chunk-size", 16, "--phases", 1, "--steps", 2, "--json", "out.json",
                      cwd=tmp_path)
    assert_ok(proc)
    (row,) = json.loads((tmp_path / "out.json").read_text())
    assert (row["model"], row["batch_size"], row["chunk_size"]) == ("digits-cnn", 64, 16)
    assert set(row["step_ms"]) == {"free", "none", "master", "sharded"}
    assert all(ms > 0 for ms in row["step_ms"].values())
    assert row["vs_free"]["free"] == 1.0
    assert "sharded" in proc.stdout and "x1.000 of free" in proc.stdout
    proc = run_script("optimizer_placement.py", "--model", "digits-cnn", "--batch-size", 16,
                      "--chunk-size", 16, cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "error: batch 16 at chunk 16 is one chunk: nothing for a second process"]
    for bad in (["--batch-size", "0"], ["--model", "resnet"], ["--phases", "x"],
                ["--json", "missing/out.json"]):
        proc = run_script("optimizer_placement.py", *bad, cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "optimizer_placement.py: error: " in proc.stderr.strip().splitlines()[-1]
