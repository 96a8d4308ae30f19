"""Issue 23, item 5: sizes that come from the user are checked before anything is allocated
from them.

- A batch larger than the training set takes all of it: the engine (gradient slots, shared
  segments) is sized for the training set, not for the batch size given, and the results are
  those of a batch of exactly the training set.
- A model file's shapes (its JSON config) are checked against this machine's memory before
  the model is built: one line, not an attempt to allocate terabytes.
"""

import resource
import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_ok, assert_usage_error, subprocess_env

from partrain import Sequential, Trainer, io, zoo
from partrain.io import check_fits_memory, memory_bytes

LIMIT = 6 << 30  # address space of the CLI runs: far less than any oversized allocation


def run_limited(*args, cwd):
    """`python -m partrain ARGS` with its address space capped at LIMIT, so that an
    allocation sized from a huge number fails at once instead of swapping."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))
    return subprocess.run([sys.executable, "-m", "partrain", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=subprocess_env(),
                          preexec_fn=cap)


def data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 8, 8, 1), dtype=np.float32), rng.integers(0, 10, n)


# ----------------------------------------------------------------------------- batch size


def test_cli_batch_larger_than_the_training_set(tmp_path):
    """Before: a MemoryError traceback (a 15,625,000 x 2,730 float32 array for the slots)."""
    proc = run_limited("train", "--dataset", "synthetic", "--quiet", "--epochs", 2,
                       "--batch-size", 1_000_000_000, "--save", "big.npz", cwd=tmp_path)
    assert_ok(proc)
    assert "Traceback" not in proc.stderr
    assert "note: --batch-size 1,000,000,000 is more than the 921 training examples" \
        in proc.stderr
    chunk = Trainer(zoo.digits_cnn(), batch_size=1_000_000_000).chunk_size
    assert_ok(run_limited("train", "--dataset", "synthetic", "--quiet", "--epochs", 2,
                          "--batch-size", 921, "--chunk-size", chunk, "--save", "exact.npz",
                          cwd=tmp_path))
    big, exact = (io.read_npz(tmp_path / f"{n}.npz", "model")[1] for n in ("big", "exact"))
    assert np.array_equal(big["params"], exact["params"])


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_a_huge_batch_trains_as_a_batch_of_the_whole_set(n_jobs):
    X, y = data(40)
    huge = Trainer(zoo.digits_cnn(), n_jobs=n_jobs, batch_size=10**12, chunk_size=8,
                   progress=False)
    exact = Trainer(zoo.digits_cnn(), n_jobs=1, batch_size=40, chunk_size=8, progress=False)
    with huge:
        huge.fit(X, y, epochs=2)
        assert huge.batch_size == 10**12  # (what defines the run is kept as given)
        # a larger training set later: the engine is sized again, the results still agree
        X2, y2 = data(72, seed=1)
        huge.fit(X2, y2)
    exact.fit(X, y, epochs=2)
    exact.batch_size = 72
    exact.close()
    exact.fit(X2, y2)
    assert np.array_equal(huge.model.params, exact.model.params)


def test_a_tiny_training_set_under_a_huge_batch_with_more_jobs_than_chunks():
    """3 examples, chunks of 8, n_jobs 2: one chunk per step, so one process computes."""
    X, y = data(3)
    with Trainer(zoo.digits_cnn(), n_jobs=2, batch_size=10**9, chunk_size=8,
                 progress=False) as trainer:
        trainer.fit(X, y)
    serial = Trainer(zoo.digits_cnn(), batch_size=3, chunk_size=8, progress=False)
    serial.fit(X, y)
    assert np.array_equal(trainer.model.params, serial.model.params)


# ----------------------------------------------------------------------------- model files


def model_file_claiming(tmp_path, input_shape, model=None):
    """A model file whose config claims `input_shape` (its params are those of `model`)."""
    model = model or zoo.mlp(input_shape=(28, 28, 1))
    model.save(tmp_path / "honest.npz")
    meta, arrays = io.read_npz(tmp_path / "honest.npz", "model")
    meta["config"]["input_shape"] = list(input_shape)
    io.write_npz(tmp_path / "claims.npz", "model",
                 {k: v for k, v in meta.items() if k not in ("kind", "version")}, arrays)
    return tmp_path / "claims.npz"


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_gradcheck_of_a_file_claiming_a_huge_input_is_one_line(model, tmp_path):
    """Before: an attempt to allocate 931 TiB (MemoryError traceback)."""
    source = zoo.digits_cnn() if model == "cnn" else None
    path = model_file_claiming(tmp_path, (1_000_000, 1_000_000, 1), source)
    proc = run_limited("gradcheck", path.name, cwd=tmp_path)
    assert_usage_error(proc, "claims.npz", "(1000000, 1000000, 1)", "3.6 TiB", "memory")
    proc = run_limited("evaluate", path.name, "--dataset", "synthetic", cwd=tmp_path)
    assert_usage_error(proc, "claims.npz", "memory")


def test_a_config_with_huge_layers_is_refused_before_allocation():
    config = zoo.mlp(input_shape=(28, 28, 1)).config()
    dense = next(layer for layer in config["layers"] if layer["type"] == "Dense")
    dense["units"] = 10**8  # 784 x 1e8 weights, then 1e8 x 10: 329.7 GiB
    with pytest.raises(ValueError, match=r"parameters and buffers would take 329.7 GiB"):
        Sequential.from_config(config)
    config["input_shape"] = [28, 0, 1]
    with pytest.raises(ValueError, match="positive"):
        Sequential.from_config(config)


def test_check_fits_memory_bounds():
    available = memory_bytes()
    if available is None:
        pytest.skip("this system does not report its memory")
    check_fits_memory("x", (available // 8,), np.float64)  # exactly the memory: allowed
    with pytest.raises(ValueError, match=r"x would take .* more than this machine's"):
        check_fits_memory("x", (available // 8 + 1,), np.float64)
    with pytest.raises(ValueError, match="1,000,000,000,000,000,000,000,000 float32"):
        check_fits_memory("x", (10**11, 10**11, 100), "float32")  # (no int64 overflow)


def test_an_array_header_claiming_more_than_the_file_holds_is_one_line(tmp_path):
    """Before: NumPy allocated what the .npy header claimed (3.6 TiB): MemoryError traceback."""
    import io as stdio
    import json
    import zipfile

    header = stdio.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})
    meta = stdio.BytesIO()
    np.save(meta, np.array(json.dumps({"kind": "model", "version": io.FORMAT_VERSION})))
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w") as archive:
        archive.writestr("__meta__.npy", meta.getvalue())
        archive.writestr("params.npy", header.getvalue() + bytes(64))
    proc = run_limited("gradcheck", "bomb.npz", cwd=tmp_path)
    assert_usage_error(proc, "bomb.npz", "params", "3.6 TiB", "truncated or corrupt")
    with pytest.raises(io.FileFormatError, match="claims shape"):
        io.read_npz(tmp_path / "bomb.npz", "model")


def test_a_single_npy_array_with_a_huge_header_is_not_loaded(tmp_path):
    """Before: np.load allocated the 3.6 TiB its header claims (MemoryError traceback)."""
    with open(tmp_path / "bomb.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})
        f.write(bytes(64))
    proc = run_limited("gradcheck", "bomb.npy", cwd=tmp_path)
    assert_usage_error(proc, "bomb.npy", "single .npy array")


def test_gradcheck_with_too_many_examples_is_one_line(tmp_path):
    """Before: a MemoryError traceback (477 GiB of random inputs)."""
    proc = run_limited("gradcheck", "--examples", 10**9, cwd=tmp_path)
    assert_usage_error(proc, "--examples 1000000000", "GiB", "memory")
