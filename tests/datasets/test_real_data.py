"""Training on real images, in parallel (n_jobs=2): the 60,000 MNIST training images, the
10,000-image MNIST test set and the 120 SIGNS test images of the shared data folder
(`<repo>/../shared/data`). Skipped where absent."""

import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA

from partrain import Trainer, optim, zoo
from partrain.data import load_dataset, load_idx_pair, load_signs_file

SHARED = SHARED_DATA
MNIST_IMAGES = SHARED / "mnist" / "t10k-images-idx3-ubyte.gz"
MNIST_LABELS = SHARED / "mnist" / "t10k-labels-idx1-ubyte.gz"
SIGNS_H5 = SHARED / "signs" / "test_signs.h5"
SIGNS_NPZ = SHARED / "signs" / "test_signs.npz"
# class counts of the official MNIST t10k labels
T10K_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _require(*paths: Path) -> None:
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        pytest.skip(f"real data not available here (missing {', '.join(missing)}); it lives in "
                    "the shared data folder beside the repository")


@pytest.fixture(scope="module")
def mnist_t10k():
    _require(MNIST_IMAGES, MNIST_LABELS)
    return load_idx_pair(MNIST_IMAGES, MNIST_LABELS)


def test_mnist_t10k_reads_as_the_official_test_set(mnist_t10k):
    x, y = mnist_t10k
    assert x.shape == (10000, 28, 28, 1) and x.dtype == np.float32
    assert y.shape == (10000,) and y.dtype == np.int64
    assert list(np.bincount(y, minlength=10)) == T10K_COUNTS
    assert x.min() == 0.0 and x.max() == 1.0


def test_mnist_cnn_learns_real_digits_in_parallel(mnist_t10k):
    """mnist_cnn, n_jobs=2, Adam 1e-3, batch 32 (the tutorial's), ONE epoch on the first 8,000
    images: > 90% on the other 2,000 (measured 96.05% with seed 0, 95-97% over seeds)."""
    x, y = mnist_t10k
    model = zoo.mnist_cnn(seed=0)
    start = time.perf_counter()
    with Trainer(model, optim.Adam(1e-3), n_jobs=2, batch_size=32, seed=0,
                 progress=False) as trainer:
        history = trainer.fit(x[:8000], y[:8000], epochs=1)
    elapsed = time.perf_counter() - start
    loss, accuracy = model.evaluate(x[8000:], y[8000:])
    print(f"mnist_cnn on 8,000 real MNIST images, 1 epoch, n_jobs=2: held-out accuracy "
          f"{accuracy:.4f} (loss {loss:.4f}), training {elapsed:.1f} s, "
          f"{history.history['examples_per_s'][-1]:,.0f} examples/s")
    assert accuracy > 0.9
    assert history.history["accuracy"][-1] > 0.75  # mean training accuracy over the epoch


@pytest.fixture(scope="module")
def signs():
    _require(SIGNS_H5, SIGNS_NPZ)
    return load_signs_file(SIGNS_H5), load_signs_file(SIGNS_NPZ)


def test_signs_h5_and_npz_hold_the_same_real_images(signs):
    (x_h5, y_h5, names_h5), (x_npz, y_npz, names_npz) = signs
    assert x_h5.shape == (120, 64, 64, 3) and x_h5.dtype == np.uint8
    assert np.array_equal(x_h5, x_npz) and np.array_equal(y_h5, y_npz)
    assert names_h5 == names_npz and len(names_h5) == 6
    assert list(np.bincount(y_h5, minlength=6)) == [20] * 6
    assert x_h5.std() > 10  # real pictures, not a constant placeholder


def test_signs_cnn_fits_the_real_sign_images(signs):
    """signs_cnn, n_jobs=2 (chunks of 8, so both processes compute), Adam 1e-3, batch 16, 20
    epochs on the 120 images: the training accuracy rises from chance (1/6) to well above it
    (inference accuracy at the end measured 0.89-1.0 over seeds 0-7; for seed 0 0.98, and 1.0
    since the optimizer flushes subnormal moments)."""
    x_raw, y, _ = signs[1]
    x = x_raw.astype(np.float32) / 255
    model = zoo.signs_cnn(seed=0)
    start = time.perf_counter()
    with Trainer(model, optim.Adam(1e-3), n_jobs=2, batch_size=16, chunk_size=8, seed=0,
                 progress=False) as trainer:
        history = trainer.fit(x, y, epochs=20)
    elapsed = time.perf_counter() - start
    _, accuracy = model.evaluate(x, y)
    acc = history.history["accuracy"]
    print(f"signs_cnn on the 120 real SIGNS images, n_jobs=2: training accuracy per epoch "
          f"{np.round(acc, 2).tolist()}, final (inference) {accuracy:.3f}, {elapsed:.1f} s")
    assert acc[0] < 0.4
    assert accuracy > 0.6
    assert max(acc[-3:]) > acc[0] + 0.3


MNIST_TRAIN_DIR = SHARED / "mnist-train"


def test_mnist_cnn_one_epoch_on_the_full_training_set(tmp_path):
    """Issue 21: mnist_cnn, n_jobs=2, partrain's defaults (Adam 1e-3, batch 32, pixels / 255),
    ONE epoch over the 60,000 training images (the shared copies, recompressed by another
    gzip, checked by the SHA-256 of their content): >= 97% on the 10,000 test images. Measured
    98.04% for seed 0, 19 s of training (21 s for the test) on 2 shared cores at load 4."""
    if not MNIST_TRAIN_DIR.is_dir():
        pytest.skip(f"the full MNIST training set is not here: no folder {MNIST_TRAIN_DIR}")
    (tmp_path / "mnist").mkdir()
    for path in [*MNIST_TRAIN_DIR.glob("train-*"), MNIST_IMAGES, MNIST_LABELS]:
        (tmp_path / "mnist" / path.name).symlink_to(path)
    data = load_dataset("mnist", tmp_path, download=False)
    assert len(data.x_train) == 60000 and len(data.x_test) == 10000
    model = zoo.mnist_cnn(seed=0)
    start = time.perf_counter()
    with Trainer(model, optim.Adam(1e-3), n_jobs=2, batch_size=32, seed=0,
                 progress=False) as trainer:
        trainer.fit(data.x_train, data.y_train, epochs=1)
    elapsed = time.perf_counter() - start
    _, accuracy = model.evaluate(data.x_test, data.y_test)
    print(f"mnist_cnn, 1 epoch on the 60,000 MNIST training images, n_jobs=2: test accuracy "
          f"{accuracy:.4f}, training {elapsed:.1f} s")
    assert accuracy >= 0.97
