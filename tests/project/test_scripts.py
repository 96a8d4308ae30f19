"""The example scripts in scripts/: --help, a short real run of each, their errors."""

import re
from pathlib import Path

import pytest
from conftest import MNIST_FILES, ROOT, assert_ok, run_python, write_mnist_like_npz

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
}


def run_script(name: str, *args, cwd, timeout: float = 180):
    return run_python(SCRIPTS / name, *args, cwd=cwd, timeout=timeout)

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
                  r"\(n_jobs=2: 2 processes\)", out)
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
    return write_mnist_like_npz(tmp_path_factory.mktemp("npz") / "tiny.npz", 256, 64)


def test_train_mnist_runs_and_cites_the_tutorial(small_mnist_like, tmp_path):
    proc = run_script("train_mnist.py", "--dataset", f"npz:{small_mnist_like}", "--limit", 128,
                      "--epochs", 1, "--n-jobs", 2, "--quiet", "--save", "m.npz", cwd=tmp_path)
    assert_ok(proc)
    out = proc.stdout
    assert re.search(r"test accuracy \d\.\d+\s+wall time [\d.]+ s "
                     r"\(n_jobs=2: \d process(es)?\)", out), out
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
