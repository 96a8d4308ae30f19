"""Tests for partrain.data: IDX files, downloads, and every dataset loader."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA

from partrain import data
from partrain.data import (
    DATASETS,
    DataError,
    Dataset,
    download,
    load_dataset,
    load_idx_pair,
    load_signs_file,
    read_idx,
    write_idx,
)

SHARED = SHARED_DATA
MNIST_DIR = SHARED / "mnist"
SIGNS_DIR = SHARED / "signs"
IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def idx_bytes(header: bytes, payload: bytes, *, compress: bool = True) -> bytes:
    blob = header + payload
    return gzip.compress(blob) if compress else blob


def write_fake_mnist(folder: Path, n_train: int = 12, n_test: int = 5) -> dict[str, bytes]:
    """Write four small valid IDX .gz files into ``folder``; return their bytes by name."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    arrays = {
        IDX_FILES[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        IDX_FILES[1]: (np.arange(n_train) % 10).astype(np.uint8),
        IDX_FILES[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        IDX_FILES[3]: (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    for name, array in arrays.items():
        write_idx(folder / name, array)
    return {name: (folder / name).read_bytes() for name in IDX_FILES}


def use_mirrors(monkeypatch, name: str, mirrors: tuple[str, ...], blobs: dict[str, bytes]):
    """Point ``name``'s downloads at ``mirrors`` and expect the checksums of ``blobs``."""
    source = data._IDX_SOURCES[name]
    fake = dataclasses.replace(
        source, mirrors=mirrors, sha256={n: sha256(b) for n, b in blobs.items()}
    )
    monkeypatch.setitem(data._IDX_SOURCES, name, fake)


def make_opener(served: dict[str, bytes], log: list[str]):
    def opener(url, timeout):
        log.append(url)
        if url not in served:
            raise urllib.error.URLError("offline")
        return io.BytesIO(served[url])

    return opener


# ------------------------------------------------------------------------------ IDX format


@pytest.mark.parametrize("suffix", [".idx", ".idx.gz"])
@pytest.mark.parametrize(
    ("dtype", "shape"),
    [
        (np.uint8, (7, 5, 3)),
        (np.int8, (11,)),
        (np.int16, (2, 3, 4, 5)),
        (np.int32, (4, 1)),
        (np.float32, (3, 0, 2)),
        (np.float64, (2, 6)),
    ],
)
def test_idx_round_trip(tmp_path, suffix, dtype, shape):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal(shape) * 100).astype(dtype)
    path = tmp_path / f"a{suffix}"
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.shape == shape
    np.testing.assert_array_equal(back, array)
    back[...] = 0  # the result is writable


def test_write_idx_layout_is_big_endian_per_spec(tmp_path):
    write_idx(tmp_path / "a.idx", np.array([[1, 258, -2]], dtype=np.int32))
    expected = bytes([0, 0, 0x0C, 2, 0, 0, 0, 1, 0, 0, 0, 3]) + bytes.fromhex(
        "00000001" "00000102" "fffffffe"
    )
    assert (tmp_path / "a.idx").read_bytes() == expected
    write_idx(tmp_path / "b.idx.gz", np.array([1.5], dtype=">f8"))
    assert gzip.decompress((tmp_path / "b.idx.gz").read_bytes())[:4] == bytes([0, 0, 0x0E, 1])


@pytest.mark.parametrize("bad", [np.zeros(3, dtype=np.int64), np.zeros(3, dtype=bool), np.int8(3)])
def test_write_idx_rejects_unsupported(tmp_path, bad):
    with pytest.raises(ValueError, match="`array`"):
        write_idx(tmp_path / "x.idx", bad)


def test_read_idx_bad_magic(tmp_path):
    path = tmp_path / "bad.idx"
    path.write_bytes(bytes([1, 0, 8, 1, 0, 0, 0, 1, 5]))
    with pytest.raises(DataError, match=r"bad\.idx.*magic"):
        read_idx(path)
    path.write_bytes(bytes([0, 0, 0x0A, 1, 0, 0, 0, 1, 5]))  # 0x0A is no IDX type code
    with pytest.raises(DataError, match="magic"):
        read_idx(path)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_truncated_and_trailing(tmp_path, compress):
    header = bytes([0, 0, 0x08, 2, 0, 0, 0, 2, 0, 0, 0, 3])
    path = tmp_path / ("f.idx.gz" if compress else "f.idx")
    path.write_bytes(idx_bytes(header, bytes(5), compress=compress))
    with pytest.raises(DataError, match=r"f\.idx.* 5 bytes, expected 6.*truncated"):
        read_idx(path)
    path.write_bytes(idx_bytes(header, bytes(8), compress=compress))
    with pytest.raises(DataError, match=r"f\.idx.* 8 bytes, expected 6.*trailing"):
        read_idx(path)
    path.write_bytes(idx_bytes(header[:9], b"", compress=compress))
    with pytest.raises(DataError, match="header is truncated"):
        read_idx(path)


def test_read_idx_corrupt_gzip(tmp_path):
    good = gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 4, 1, 2, 3, 4]) * 50)
    path = tmp_path / "c.idx.gz"
    path.write_bytes(good[:-12])  # truncated stream
    with pytest.raises(DataError, match=r"c\.idx\.gz.*gzip"):
        read_idx(path)
    path.write_bytes(good[:-8] + bytes(4) + good[-4:])  # wrong CRC
    with pytest.raises(DataError, match=r"c\.idx\.gz.*gzip"):
        read_idx(path)
    path.write_bytes(b"this is not gzip at all")
    with pytest.raises(DataError, match=r"c\.idx\.gz.*gzip"):
        read_idx(path)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.idx"):
        read_idx(tmp_path / "nope.idx")


def test_load_idx_pair_validates(tmp_path):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    write_idx(tmp_path / "i.gz", images)
    write_idx(tmp_path / "l.gz", np.array([9, 0, 4], dtype=np.uint8))
    x, y = load_idx_pair(tmp_path / "i.gz", tmp_path / "l.gz", dtype=np.float64)
    assert x.shape == (3, 4, 5, 1) and x.dtype == np.float64 and y.dtype == np.int64
    np.testing.assert_allclose(x[..., 0], images / 255.0)
    np.testing.assert_array_equal(y, [9, 0, 4])

    write_idx(tmp_path / "l2.gz", np.array([1, 2], dtype=np.uint8))
    with pytest.raises(DataError, match=r"2 labels for 3 images"):
        load_idx_pair(tmp_path / "i.gz", tmp_path / "l2.gz")
    write_idx(tmp_path / "l3.gz", np.array([1, 10, 2], dtype=np.uint8))
    with pytest.raises(DataError, match=r"0\.\.9, got values in 1\.\.10"):
        load_idx_pair(tmp_path / "i.gz", tmp_path / "l3.gz")
    write_idx(tmp_path / "i2.gz", images.astype(np.float32))
    with pytest.raises(DataError, match=r"i2\.gz.*uint8"):
        load_idx_pair(tmp_path / "i2.gz", tmp_path / "l.gz")


# ------------------------------------------------------------------------------ download


def test_download_verifies_and_caches(tmp_path):
    blob = b"partrain" * 1000
    log: list[str] = []
    dest = tmp_path / "sub" / "file.bin"
    result = download("https://x/file.bin", dest, sha256(blob).upper(),
                      opener=make_opener({"https://x/file.bin": blob}, log))
    assert result == dest and dest.read_bytes() == blob and log == ["https://x/file.bin"]
    assert sorted(p.name for p in dest.parent.iterdir()) == ["file.bin"]


def test_download_checksum_mismatch_leaves_nothing(tmp_path):
    blob, wrong = b"real bytes", sha256(b"other bytes")
    dest = tmp_path / "file.bin"
    with pytest.raises(DataError) as info:
        download("https://x/f", dest, wrong, opener=make_opener({"https://x/f": blob}, []))
    message = str(info.value)
    assert "file.bin" in message and wrong in message and sha256(blob) in message
    assert list(tmp_path.iterdir()) == []


def test_download_network_error_leaves_nothing(tmp_path):
    with pytest.raises(urllib.error.URLError):
        download("https://x/f", tmp_path / "f", "0" * 64, opener=make_opener({}, []))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="`sha256`"):
        download("https://x/f", tmp_path / "f", "abc", opener=make_opener({}, []))


def test_mnist_downloads_from_mirrors_end_to_end(tmp_path, monkeypatch):
    served = tmp_path / "server"
    blobs = write_fake_mnist(served)
    mirrors = ((tmp_path / "offline").as_uri() + "/", served.as_uri() + "/")
    use_mirrors(monkeypatch, "mnist", mirrors, blobs)
    ds = load_dataset("mnist", data_dir=tmp_path / "cache")
    for name, blob in blobs.items():  # cached in data_dir/mnist/, byte for byte
        assert (tmp_path / "cache" / "mnist" / name).read_bytes() == blob
    assert ds.x_train.shape == (12, 28, 28, 1) and ds.x_test.shape == (5, 28, 28, 1)
    assert ds.x_train.dtype == np.float32 and ds.n_classes == 10 and not ds.synthetic
    np.testing.assert_array_equal(ds.y_train, np.arange(12) % 10)
    np.testing.assert_array_equal(ds.y_test, [4, 3, 2, 1, 0])
    raw = np.frombuffer(gzip.decompress(blobs[IDX_FILES[2]])[16:], dtype=np.uint8)
    np.testing.assert_allclose(ds.x_test.ravel(), raw / np.float32(255), rtol=1e-6)

    use_mirrors(monkeypatch, "mnist", ("file:///nonexistent/",), blobs)  # now cached: no fetch
    assert load_dataset("mnist", data_dir=tmp_path / "cache").x_train.shape == (12, 28, 28, 1)


def test_mnist_bad_mirror_checksum_raises_and_leaves_nothing(tmp_path, monkeypatch):
    served = tmp_path / "server"
    blobs = write_fake_mnist(served)
    use_mirrors(monkeypatch, "mnist", (served.as_uri() + "/",), dict(blobs))
    data._IDX_SOURCES["mnist"].sha256[IDX_FILES[0]] = "0" * 64
    with pytest.raises(DataError, match=f"{IDX_FILES[0]}.*expected SHA-256 {'0' * 64}"):
        load_dataset("mnist", data_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # (issue 23: no empty folder left behind)


def test_mnist_offline_names_all_files_and_folder(tmp_path, monkeypatch):
    blobs = write_fake_mnist(tmp_path / "server")
    use_mirrors(monkeypatch, "mnist", ((tmp_path / "nowhere").as_uri() + "/",), blobs)
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("mnist", data_dir=tmp_path / "cache")
    message = str(info.value)
    assert all(name in message for name in IDX_FILES)
    assert str(tmp_path / "cache" / "mnist") in message and "Downloading failed" in message


def test_unreachable_mirror_is_not_retried(tmp_path, monkeypatch):
    blobs = write_fake_mnist(tmp_path / "server")
    dead = ((tmp_path / "dead1").as_uri() + "/", (tmp_path / "dead2").as_uri() + "/")
    use_mirrors(monkeypatch, "mnist", dead, blobs)
    calls: list[str] = []

    def counting_download(url, dest, sha):
        calls.append(url)
        return download(url, dest, sha)

    monkeypatch.setattr(data, "download", counting_download)
    with pytest.raises(FileNotFoundError, match="dead2"):
        load_dataset("mnist", data_dir=tmp_path / "cache")
    assert calls == [mirror + IDX_FILES[0] for mirror in dead]


def test_http_error_does_not_retire_the_mirror(tmp_path, monkeypatch):
    served = tmp_path / "server"
    blobs = write_fake_mnist(served)
    use_mirrors(monkeypatch, "mnist", ("https://m/",), blobs)
    calls: list[str] = []

    def flaky_download(url, dest, sha):
        calls.append(url)
        if len(calls) == 1:
            raise urllib.error.HTTPError(url, 503, "busy", None, None)
        return download(url, dest, sha, opener=lambda u, timeout: io.BytesIO(
            (served / u.rsplit("/", 1)[1]).read_bytes()))

    monkeypatch.setattr(data, "download", flaky_download)
    with pytest.raises(FileNotFoundError, match="503") as info:
        load_dataset("mnist", data_dir=tmp_path / "cache")
    assert len(calls) == 4 and str(info.value).count("missing from") == 1
    assert IDX_FILES[0] in str(info.value).split("Put")[0]


def test_mnist_download_false_does_not_fetch(tmp_path, monkeypatch):
    served = tmp_path / "server"
    use_mirrors(monkeypatch, "mnist", (served.as_uri() + "/",), write_fake_mnist(served))
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_dataset("mnist", data_dir=tmp_path / "cache", download=False)
    assert not (tmp_path / "cache").exists()


def test_mnist_default_data_dir_flat_layout_and_local_checksum(tmp_path, monkeypatch):
    blobs = write_fake_mnist(tmp_path / "data")  # flat data/ layout, default data_dir
    use_mirrors(monkeypatch, "mnist", ("file:///nonexistent/",), blobs)
    monkeypatch.chdir(tmp_path)
    ds = load_dataset("mnist", download=False, normalize="none", dtype="float64")
    assert ds.x_train.dtype == np.float64 and ds.x_train.max() > 1
    assert ds.source.endswith("data")
    write_idx(tmp_path / "data" / IDX_FILES[3], np.zeros(5, dtype=np.uint8))  # valid, other bytes
    with pytest.raises(DataError, match=f"{IDX_FILES[3]}: SHA-256"):
        load_dataset("mnist", download=False)


def test_fashion_mnist_reads_its_subfolder(tmp_path, monkeypatch):
    blobs = write_fake_mnist(tmp_path / "fashion-mnist", n_train=10, n_test=3)
    use_mirrors(monkeypatch, "fashion-mnist", ("file:///nonexistent/",), blobs)
    ds = load_dataset("fashion-mnist", data_dir=tmp_path, download=False)
    assert ds.x_train.shape == (10, 28, 28, 1) and ds.class_names[0] == "T-shirt/top"
    assert ds.class_names[9] == "Ankle boot" and ds.n_classes == 10
    with pytest.raises(FileNotFoundError, match="fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=tmp_path / "empty", download=False)


# ------------------------------------------------------------------------------ real data


def test_real_mnist_t10k():
    images, labels = MNIST_DIR / IDX_FILES[2], MNIST_DIR / IDX_FILES[3]
    if not images.is_file() or not labels.is_file():
        pytest.skip(f"real MNIST t10k files not found in {MNIST_DIR}")
    for path in (images, labels):
        assert sha256(path.read_bytes()) == data._MNIST_SHA256[path.name]
        assert sha256(gzip.decompress(path.read_bytes())) == \
            data._MNIST_CONTENT_SHA256[path.name.removesuffix(".gz")]
    x, y = load_idx_pair(images, labels)
    assert x.shape == (10000, 28, 28, 1) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    # Published MNIST test-set class frequencies.
    np.testing.assert_array_equal(
        np.bincount(y), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    )


def test_real_signs_npz_and_h5_agree():
    npz, h5 = SIGNS_DIR / "test_signs.npz", SIGNS_DIR / "test_signs.h5"
    if not npz.is_file() or not h5.is_file():
        pytest.skip(f"real SIGNS test files not found in {SIGNS_DIR}")
    pytest.importorskip("h5py", reason="h5py is needed to read test_signs.h5")
    x1, y1, names1 = load_signs_file(npz)
    x2, y2, names2 = load_signs_file(h5)
    assert x1.shape == (120, 64, 64, 3) and x1.dtype == np.uint8 and y1.dtype == np.int64
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert names1 == names2 == ("0", "1", "2", "3", "4", "5")
    np.testing.assert_array_equal(np.bincount(y1), [20] * 6)


def test_real_signs_without_train_file_names_it(tmp_path):
    if not (SIGNS_DIR / "test_signs.npz").is_file():
        pytest.skip(f"real SIGNS test files not found in {SIGNS_DIR}")
    with pytest.raises(FileNotFoundError, match=r"train_signs\.h5") as info:
        load_dataset("signs", data_dir=SHARED)
    assert "test_signs" not in str(info.value).split("Put")[0]


# ------------------------------------------------------------------------------ signs


def test_signs_dataset_from_fake_files(tmp_path):
    rng = np.random.default_rng(1)
    classes = np.arange(6)
    x_train = rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    y_train = np.array([[0, 1, 2, 3, 4, 5, 0, 1]])  # Coursera-style (1, m)
    x_test = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    np.savez(tmp_path / "train_signs.npz", x=x_train, y=y_train, classes=classes)
    np.savez(tmp_path / "test_signs.npz", x=x_test, y=np.array([5, 4, 3, 2]), classes=classes)
    ds = load_dataset("signs", data_dir=tmp_path, normalize="standardize", dtype=np.float64)
    assert ds.input_shape == (64, 64, 3) and ds.n_classes == 6
    np.testing.assert_array_equal(ds.y_train, y_train[0])
    np.testing.assert_allclose(ds.x_train.mean(axis=(0, 1, 2)), 0, atol=1e-12)
    np.testing.assert_allclose(ds.x_train.std(axis=(0, 1, 2)), 1, rtol=1e-12)
    mean = x_train.mean(axis=(0, 1, 2))
    np.testing.assert_allclose(ds.x_test, (x_test - mean) / x_train.std(axis=(0, 1, 2)))


def test_signs_h5_fake_file_and_errors(tmp_path, monkeypatch):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "train_signs.h5"
    x = np.full((3, 64, 64, 3), 7, dtype=np.uint8)
    with h5py.File(path, "w") as f:
        f["train_set_x"] = x
        f["train_set_y"] = np.array([0, 2, 1])
        f["list_classes"] = np.array([b"fist", b"one", b"two"])
    images, labels, names = load_signs_file(path)
    np.testing.assert_array_equal(images, x)
    assert labels.tolist() == [0, 2, 1] and names == ("fist", "one", "two")

    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["images"] = x
    with pytest.raises(DataError, match=r"other\.h5.*_set_x.*found \['images'\]"):
        load_signs_file(tmp_path / "other.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(DataError, match=r"junk\.h5"):
        load_signs_file(tmp_path / "junk.h5")
    (tmp_path / "x.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="`path` must end with"):
        load_signs_file(tmp_path / "x.txt")
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match=r'pip install "partrain\[h5\]"'):
        load_signs_file(path)


# ------------------------------------------------------------------------------ digits


def test_digits_split_and_scale():
    pytest.importorskip("sklearn")
    ds = load_dataset("digits")
    # 1,797 images; per-class counts 178,182,177,183,181,182,181,179,174,180 -> 20% rounds
    # to 36,36,35,37,36,36,36,36,35,36 = 359 test images.
    assert ds.x_train.shape == (1438, 8, 8, 1) and ds.x_test.shape == (359, 8, 8, 1)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.x_train.min() >= 0.0 and ds.x_train.max() == 1.0 and ds.x_test.max() <= 1.0
    np.testing.assert_array_equal(
        np.bincount(ds.y_test), [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]
    )
    assert ds.class_names == tuple("0123456789") and ds.source.startswith("scikit-learn")
    again = load_dataset("digits")
    np.testing.assert_array_equal(ds.x_test, again.x_test)
    np.testing.assert_array_equal(ds.y_train, again.y_train)
    other = load_dataset("digits", split_seed=1, test_fraction=0.5)
    assert len(other.y_test) == 898 and not np.array_equal(other.y_test[:359], ds.y_test)


def test_digits_standardize():
    pytest.importorskip("sklearn")
    ds = load_dataset("digits", normalize="standardize", dtype=np.float64)
    assert ds.x_train.dtype == np.float64
    assert abs(ds.x_train.mean()) < 1e-12 and abs(ds.x_train.std() - 1) < 1e-12
    assert abs(ds.x_test.mean()) < 0.1  # test set uses the training statistics


def test_digits_missing_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r'pip install "partrain\[digits\]"'):
        load_dataset("digits")


# ------------------------------------------------------------------------------ npz


def save_npz(path: Path, **arrays) -> str:
    base = {
        "x_train": np.zeros((4, 3, 3), dtype=np.uint8),
        "y_train": np.array([0, 1, 2, 1]),
        "x_test": np.full((2, 3, 3), 255, dtype=np.uint8),
        "y_test": np.array([2, 0]),
    }
    base.update(arrays)
    np.savez(path, **{k: v for k, v in base.items() if v is not None})
    return f"npz:{path}"


def test_npz_valid(tmp_path):
    ds = load_dataset(save_npz(tmp_path / "d.npz"))
    assert ds.x_train.shape == (4, 3, 3, 1) and ds.class_names == ("0", "1", "2")
    assert ds.x_test.max() == 1.0 and ds.source == str(tmp_path / "d.npz")
    named = load_dataset(save_npz(tmp_path / "n.npz", class_names=np.array(["a", "b", "c", "d"])))
    assert named.class_names == ("a", "b", "c", "d") and named.n_classes == 4


def test_npz_label_forms_are_converted(tmp_path):
    one_hot = np.eye(3, dtype=np.float32)[[0, 1, 2, 1]]
    ds = load_dataset(save_npz(tmp_path / "h.npz", y_train=one_hot, y_test=np.array([[2, 0]])))
    np.testing.assert_array_equal(ds.y_train, [0, 1, 2, 1])
    np.testing.assert_array_equal(ds.y_test, [2, 0])
    assert ds.y_train.dtype == np.int64


@pytest.mark.parametrize(
    ("arrays", "pattern"),
    [
        ({"y_test": None}, r"missing array\(s\) \['y_test'\]"),
        ({"y_train": np.array([0, 1, 2])}, "3 labels for 4 images"),
        ({"y_test": np.array([-1, 0])}, r"labels must be class ids in 0\.\.2, got values in -1"),
        ({"x_train": np.full((4, 3, 3), np.nan)}, r"x_train contains 36 NaN"),
        ({"y_train": np.array([[0, 1], [1, 1], [1, 0], [0, 1]])}, "not one-hot"),
        ({"y_train": np.array([0.0, 1.0, 2.0, 1.0])}, "integer class ids"),
        ({"x_train": np.zeros((4, 9))}, r"image array .* got float64 \(4, 9\)"),
        ({"x_test": np.zeros((2, 4, 4), dtype=np.uint8)}, r"train images are \(3, 3, 1\)"),
        ({"class_names": np.array(["a", "b"])}, r"0\.\.1, got values in 0\.\.2"),
    ],
)
def test_npz_invalid(tmp_path, arrays, pattern):
    with pytest.raises(DataError, match=pattern):
        load_dataset(save_npz(tmp_path / "bad.npz", **arrays))


def test_npz_unreadable(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent\.npz"):
        load_dataset(f"npz:{tmp_path / 'absent.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"junk\.npz: not an \.npz"):
        load_dataset(f"npz:{tmp_path / 'junk.npz'}")
    spec = save_npz(tmp_path / "obj.npz", class_names=np.array(["a", 1], dtype=object))
    with pytest.raises(DataError, match=r"obj\.npz.*allow_pickle"):
        load_dataset(spec)


# ------------------------------------------------------------------------------ synthetic


def test_synthetic_deterministic_and_options():
    ds = load_dataset("synthetic", n_train=40, n_test=8, shape=(5, 6, 2), n_classes=3, seed=3)
    assert ds.synthetic and ds.name == "synthetic" and ds.source.startswith("SYNTHETIC")
    assert ds.x_train.shape == (40, 5, 6, 2) and ds.x_test.shape == (8, 5, 6, 2)
    assert ds.n_classes == 3 and set(ds.y_train.tolist()) <= {0, 1, 2}
    assert ds.x_train.min() >= 0.0 and ds.x_train.max() <= 1.0
    same = load_dataset("synthetic", n_train=40, n_test=8, shape=(5, 6, 2), n_classes=3, seed=3)
    np.testing.assert_array_equal(ds.x_train, same.x_train)
    np.testing.assert_array_equal(ds.y_test, same.y_test)
    other = load_dataset("synthetic", n_train=40, n_test=8, shape=(5, 6, 2), n_classes=3, seed=4)
    assert not np.array_equal(ds.x_train, other.x_train)


def test_synthetic_defaults_are_weakly_learnable():
    ds = load_dataset("synthetic")
    assert ds.x_train.shape == (1024, 28, 28, 1) and ds.x_test.shape == (256, 28, 28, 1)
    # Nearest class mean (from train) classifies the test set far above chance (10%).
    flat = ds.x_train.reshape(len(ds.x_train), -1)
    means = np.stack([flat[ds.y_train == c].mean(axis=0) for c in range(10)])
    test = ds.x_test.reshape(len(ds.x_test), -1)
    predicted = ((test[:, None, :] - means[None]) ** 2).sum(axis=2).argmin(axis=1)
    assert (predicted == ds.y_test).mean() > 0.5


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"n_train": 0}, "`n_train`"),
        ({"n_classes": True}, "`n_classes`"),
        ({"shape": (4, 4)}, "`shape`"),
    ],
)
def test_synthetic_rejects_bad_options(options, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_dataset("synthetic", **options)


# ------------------------------------------------------------------------------ load_dataset


def test_load_dataset_argument_errors():
    with pytest.raises(ValueError, match=r"Invalid dataset: 'foo', expected one of \[.*'mnist'"):
        load_dataset("foo")
    with pytest.raises(ValueError, match="`normalize` must be one of"):
        load_dataset("synthetic", normalize="minmax")
    with pytest.raises(ValueError, match="`dtype` must be float32 or float64"):
        load_dataset("synthetic", dtype=np.int32)
    with pytest.raises(TypeError, match=r"\['n_trian'\].*'n_train'"):
        load_dataset("synthetic", n_trian=3)
    with pytest.raises(TypeError, match="valid options: none"):
        load_dataset("mnist", seed=1)


def test_registry_and_dataset_properties():
    assert DATASETS == ("digits", "mnist", "fashion-mnist", "signs", "synthetic")
    assert set(data._LOADERS) == {*DATASETS, "npz"}
    ds = load_dataset("synthetic", n_train=2, n_test=1, shape=(2, 2, 1), n_classes=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.name = "x"
    assert ds.input_shape == (2, 2, 1) and "train=(2, 2, 2, 1)" in repr(ds)
    with pytest.raises(DataError, match=r"Dataset 'x' \(test\)"):
        Dataset("x", ds.x_train, ds.y_train, ds.x_test, ds.y_train, ("a", "b"), "test")


# ------------------------------------------------------------------------------ one split only
# (issue 12: evaluation needs only the split it evaluates; classes come from the dataset)


def test_mnist_test_split_needs_and_downloads_only_the_t10k_files(tmp_path, monkeypatch):
    served = tmp_path / "server"
    blobs = write_fake_mnist(served)
    use_mirrors(monkeypatch, "mnist", (served.as_uri() + "/",), blobs)
    cache = tmp_path / "cache"
    ds = load_dataset("mnist", data_dir=cache, split="test")
    assert sorted(p.name for p in (cache / "mnist").iterdir()) == sorted(IDX_FILES[2:])
    assert ds.x_test.shape == (5, 28, 28, 1) and ds.x_train.shape == (0, 28, 28, 1)
    assert ds.y_train.shape == (0,) and ds.input_shape == (28, 28, 1) and ds.n_classes == 10
    with pytest.raises(FileNotFoundError, match="train files") as info:
        load_dataset("mnist", data_dir=cache, split="train", download=False)
    assert "t10k" not in str(info.value)


def test_real_mnist_t10k_only_folder_loads_its_test_split():
    """The shared folder holds only the two t10k files (checked against their SHA-256)."""
    if not (MNIST_DIR / IDX_FILES[2]).is_file() or (MNIST_DIR / IDX_FILES[0]).is_file():
        pytest.skip(f"needs a t10k-only MNIST folder at {MNIST_DIR}")
    ds = load_dataset("mnist", data_dir=SHARED, split="test", download=False)
    assert len(ds.x_test) == 10000 and len(ds.x_train) == 0


def test_signs_test_split_needs_only_test_signs(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    np.savez(tmp_path / "test_signs.npz", x=x, y=np.array([0, 5, 2]), classes=np.arange(6))
    ds = load_dataset("signs", data_dir=tmp_path, split="test")
    assert ds.x_test.shape == (3, 64, 64, 3) and len(ds.x_train) == 0 and ds.n_classes == 6
    with pytest.raises(FileNotFoundError, match=r"train_signs\.h5"):
        load_dataset("signs", data_dir=tmp_path)


def test_npz_in_the_signs_layout_is_a_test_set(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (4, 5, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", x=x, y=np.array([[1, 0, 2, 1]]), classes=np.array([7, 8, 9]))
    ds = load_dataset(f"npz:{tmp_path / 's.npz'}", split="test")
    np.testing.assert_array_equal(ds.y_test, [1, 0, 2, 1])
    assert ds.class_names == ("7", "8", "9") and ds.x_test.max() <= 1.0 and len(ds.x_train) == 0
    with pytest.raises(DataError, match=r"SIGNS layout.*test set only.*x_train"):
        load_dataset(f"npz:{tmp_path / 's.npz'}")


def test_split_leaves_the_other_split_empty_for_every_loader(tmp_path):
    for name in ("synthetic", save_npz(tmp_path / "d.npz")):
        test_only = load_dataset(name, split="test")
        train_only = load_dataset(name, split="train")
        both = load_dataset(name)
        assert len(test_only.x_train) == len(train_only.x_test) == 0
        np.testing.assert_array_equal(test_only.x_test, both.x_test)
        np.testing.assert_array_equal(train_only.y_train, both.y_train)
        assert test_only.input_shape == both.input_shape


def test_standardize_needs_the_training_split():
    with pytest.raises(ValueError, match="standardize.*training split"):
        load_dataset("digits", normalize="standardize", split="test")
    with pytest.raises(ValueError, match="Invalid split"):
        load_dataset("digits", split="validation")


def test_npz_class_count_comes_from_the_labels_not_the_largest_one(tmp_path):
    """Labels 0, 5 and 99: three classes (not 100), renumbered 0..2 and named '0', '5', '99',
    with a warning that says what was found."""
    spec = save_npz(tmp_path / "d.npz", y_train=np.array([0, 99, 5, 99]), y_test=np.array([5, 0]))
    with pytest.warns(data.DataWarning, match=r"3 distinct values \(0, 5, 99\).*97 of 0\.\.99"):
        ds = load_dataset(spec)
    assert ds.n_classes == 3 and ds.class_names == ("0", "5", "99")
    np.testing.assert_array_equal(ds.y_train, [0, 2, 1, 2])
    np.testing.assert_array_equal(ds.y_test, [1, 0])


def test_npz_labels_already_0_to_k_minus_1_are_kept_silently(tmp_path, recwarn):
    ds = load_dataset(save_npz(tmp_path / "d.npz"))
    assert ds.class_names == ("0", "1", "2") and not recwarn.list
