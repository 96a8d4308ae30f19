"""Normalisation travels with the model (issue 21 item 4): a standardized load reports its
statistics, a model trained with `--normalize standardize` stores them, and `evaluate` then
needs no training split; `standardize-int` is the NumPy CNN tutorial's integer mean and std."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib

import numpy as np
import pytest

from partrain import cli, data
from partrain.data import load_dataset, write_idx
from partrain.model import load

FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """data_dir with four small MNIST-format files, pinned as the official ones."""
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(5)
    y_train, y_test = rng.integers(0, 10, 200), rng.integers(0, 10, 50)
    # images that a model can learn: a bright row per class, on noise
    x = rng.integers(0, 120, (250, 28, 28)).astype(np.uint8)
    for i, label in enumerate(np.concatenate([y_train, y_test])):
        x[i, 2 * label + 4] = 250
    arrays = dict(zip(FILES, (x[:200], y_train.astype(np.uint8), x[200:],
                              y_test.astype(np.uint8))))
    for name, array in arrays.items():
        write_idx(folder / name, array)
    source = dataclasses.replace(
        data._IDX_SOURCES["mnist"], mirrors=("file:///nonexistent/",),
        sha256={n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in FILES},
        content_sha256={n[:-3]: hashlib.sha256(gzip.decompress((folder / n).read_bytes()))
                        .hexdigest() for n in FILES})
    monkeypatch.setitem(data._IDX_SOURCES, "mnist", source)
    return tmp_path / "data"


def test_standardize_reports_statistics_that_reproduce_the_test_split(fake_mnist):
    full = load_dataset("mnist", fake_mnist, normalize="standardize")
    raw = load_dataset("mnist", fake_mnist, normalize="none", dtype="float64")
    stats = full.normalization
    assert stats["method"] == "standardize"
    np.testing.assert_allclose(stats["mean"], [raw.x_train.mean()], rtol=1e-12)
    np.testing.assert_allclose(stats["std"], [raw.x_train.std()], rtol=1e-12)
    alone = load_dataset("mnist", fake_mnist, normalize="standardize", split="test",
                         statistics=stats)
    assert alone.x_test.tobytes() == full.x_test.tobytes() and len(alone.x_train) == 0
    assert load_dataset("mnist", fake_mnist).normalization is None  # scale: nothing to carry


def test_standardize_int_is_the_tutorials_integer_mean_and_std(fake_mnist):
    raw = load_dataset("mnist", fake_mnist, normalize="none", dtype="float64")
    ds = load_dataset("mnist", fake_mnist, normalize="standardize-int", dtype="float64")
    mean, std = int(np.mean(raw.x_train)), int(np.std(raw.x_train))  # the tutorial's lines
    assert ds.normalization == {"method": "standardize-int", "mean": [mean], "std": [std]}
    np.testing.assert_allclose(ds.x_test, (raw.x_test - mean) / std, rtol=1e-12)


@pytest.mark.parametrize("bad", [{"mean": [1.0]}, {"mean": [1.0], "std": [0.0]},
                                 {"mean": [1.0, 2.0], "std": [1.0, 1.0]},
                                 {"method": "standardize-int", "mean": [1.0], "std": [1.0]}])
def test_bad_statistics_are_refused(fake_mnist, bad):
    with pytest.raises(ValueError, match="`statistics`"):
        load_dataset("mnist", fake_mnist, normalize="standardize", split="test", statistics=bad)


def test_evaluate_needs_no_training_split_with_a_standardized_model(fake_mnist, tmp_path,
                                                                    capsys):
    model_file = tmp_path / "m.npz"
    assert cli.main(["train", "--model", "mlp", "--dataset", "mnist", "--data-dir",
                     str(fake_mnist), "--normalize", "standardize", "--epochs", "2",
                     "--quiet", "--save", str(model_file)]) == 0
    stored = load(model_file).metadata["normalization"]
    assert stored == load_dataset("mnist", fake_mnist, normalize="standardize").normalization
    capsys.readouterr()
    args = ["evaluate", str(model_file), "--data-dir", str(fake_mnist)]
    assert cli.main(args) == 0
    with_train = capsys.readouterr().out
    for name in FILES[:2]:
        (fake_mnist / "mnist" / name).unlink()
    assert cli.main(args) == 0
    assert capsys.readouterr().out == with_train


def test_an_older_model_file_without_statistics_still_evaluates(fake_mnist, tmp_path, capsys):
    model_file = tmp_path / "m.npz"
    assert cli.main(["train", "--model", "mlp", "--dataset", "mnist", "--data-dir",
                     str(fake_mnist), "--normalize", "standardize", "--epochs", "1",
                     "--quiet", "--save", str(model_file)]) == 0
    capsys.readouterr()
    args = ["evaluate", str(model_file), "--data-dir", str(fake_mnist)]
    assert cli.main(args) == 0
    expected = capsys.readouterr().out
    model = load(model_file)
    del model.metadata["normalization"]  # as written before the statistics were recorded
    model.save(model_file)
    assert cli.main(args) == 0
    assert capsys.readouterr().out == expected
