"""MNIST files from any faithful copy (issue 21): gzipped by any gzip or not compressed, spelled
`train-images-idx3-ubyte` or `train-images.idx3-ubyte`, verified by the SHA-256 of their
decompressed bytes; clear messages for missing and wrong files (issue 23 item 7)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA

from partrain import data
from partrain.data import DataError, load_dataset

SHARED = SHARED_DATA
STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# the issue's table: SHA-256 of the decompressed official files
CONTENT_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}


def sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def fake_contents(n_train: int = 12, n_test: int = 5) -> dict[str, bytes]:
    """Small valid uncompressed IDX contents of the four files, by stem."""
    rng = np.random.default_rng(3)
    arrays = {
        STEMS[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        STEMS[1]: (np.arange(n_train) % 10).astype(np.uint8),
        STEMS[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        STEMS[3]: (np.arange(n_test) % 10).astype(np.uint8),
    }
    out = {}
    for stem, array in arrays.items():
        header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
        out[stem] = header + array.tobytes()
    return out


def pin(monkeypatch, name: str, contents: dict[str, bytes], *, content: bool = True) -> None:
    """Make `name`'s official files the ones whose content is `contents` (official .gz: gzip
    level 9, mtime 0); pin their content checksums too unless `content` is false."""
    source = data._IDX_SOURCES[name]
    fake = dataclasses.replace(
        source, mirrors=("file:///nonexistent/",),
        sha256={f"{s}.gz": sha256(gzip.compress(b, 9, mtime=0)) for s, b in contents.items()},
        content_sha256={s: sha256(b) for s, b in contents.items()} if content else {})
    monkeypatch.setitem(data._IDX_SOURCES, name, fake)


def other_gzip(blob: bytes) -> bytes:
    """`blob` compressed by "another gzip": level 1, another mtime, a raw zlib stream framed
    by hand with a file name in the header (what `gzip -1 -N` writes)."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, -15)
    body = compressor.compress(blob) + compressor.flush()
    header = b"\x1f\x8b\x08\x08" + (1_600_000_000).to_bytes(4, "little") + b"\x04\x03" + b"x\0"
    trailer = zlib.crc32(blob).to_bytes(4, "little") + (len(blob) % 2**32).to_bytes(4, "little")
    return header + body + trailer


def write_files(folder: Path, contents: dict[str, bytes], how: str) -> None:
    """Write the files as `how`: official, recompressed, plain, dotted (plain, dotted name)."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem, blob in contents.items():
        if how == "official":
            (folder / f"{stem}.gz").write_bytes(gzip.compress(blob, 9, mtime=0))
        elif how == "recompressed":
            (folder / f"{stem}.gz").write_bytes(other_gzip(blob))
        elif how == "plain":
            (folder / stem).write_bytes(blob)
        elif how == "dotted":
            (folder / stem.replace("-idx", ".idx")).write_bytes(blob)
        elif how == "dotted-gz":
            (folder / f"{stem.replace('-idx', '.idx')}.gz").write_bytes(other_gzip(blob))


def test_the_pinned_content_checksums_are_the_issues():
    assert data._MNIST_CONTENT_SHA256 == CONTENT_SHA256
    assert data._IDX_SOURCES["fashion-mnist"].content_sha256 == {}


def test_other_gzip_really_differs_but_decompresses_the_same():
    blob = fake_contents()[STEMS[0]]
    assert other_gzip(blob) != gzip.compress(blob, 9, mtime=0)
    assert gzip.decompress(other_gzip(blob)) == blob


@pytest.mark.parametrize("how", ["official", "recompressed", "plain", "dotted", "dotted-gz"])
def test_any_faithful_copy_loads_the_same_arrays(tmp_path, monkeypatch, how):
    contents = fake_contents()
    pin(monkeypatch, "mnist", contents)
    write_files(tmp_path / "ref" / "mnist", contents, "official")
    write_files(tmp_path / how / "mnist", contents, how)
    ref = load_dataset("mnist", tmp_path / "ref", download=False, normalize="none")
    ds = load_dataset("mnist", tmp_path / how, download=False, normalize="none")
    for split in ("train", "test"):
        np.testing.assert_array_equal(getattr(ds, f"x_{split}"), getattr(ref, f"x_{split}"))
        np.testing.assert_array_equal(getattr(ds, f"y_{split}"), getattr(ref, f"y_{split}"))
    assert ds.x_train.shape == (12, 28, 28, 1) and ds.y_test.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("how", ["recompressed", "plain"])
def test_a_corrupt_copy_is_one_line_naming_file_expected_found_and_an_offline_fix(
        tmp_path, monkeypatch, how):
    contents = fake_contents()
    pin(monkeypatch, "mnist", contents)
    bad = dict(contents)
    bad[STEMS[0]] = contents[STEMS[0]][:-1] + b"\x01"  # one pixel changed: still valid IDX
    write_files(tmp_path / "mnist", bad, how)
    with pytest.raises(DataError) as info:
        load_dataset("mnist", tmp_path, download=False)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "mnist" / STEMS[0]) in message
    assert sha256(contents[STEMS[0]]) in message and sha256(bad[STEMS[0]]) in message
    assert "good copy" in message and "npz:PATH" in message


def test_fashion_mnist_without_pinned_content_keeps_the_gz_rule_and_says_so(tmp_path, monkeypatch):
    contents = fake_contents()
    pin(monkeypatch, "fashion-mnist", contents, content=False)
    write_files(tmp_path / "fashion-mnist", contents, "official")
    assert load_dataset("fashion-mnist", tmp_path, download=False).x_train.shape[0] == 12
    write_files(tmp_path / "fashion-mnist", contents, "recompressed")
    with pytest.raises(DataError, match="pins no checksum of the decompressed Fashion-MNIST"):
        load_dataset("fashion-mnist", tmp_path, download=False)


def test_missing_message_names_only_the_missing_files_and_their_folder(tmp_path, monkeypatch):
    """Issue 23 item 7: only the t10k files, in the flat data_dir/ layout."""
    contents = fake_contents()
    pin(monkeypatch, "mnist", contents)
    write_files(tmp_path, {s: b for s, b in contents.items() if s.startswith("t10k")}, "plain")
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("mnist", tmp_path, download=False)
    head = str(info.value).split(". Put")[0]
    assert head == (f"MNIST files missing from {tmp_path}: train-images-idx3-ubyte.gz, "
                    "train-labels-idx1-ubyte.gz")
    assert load_dataset("mnist", tmp_path, split="test", download=False).x_test.shape[0] == 5


def test_failed_offline_download_leaves_no_folder(tmp_path, monkeypatch):
    pin(monkeypatch, "mnist", fake_contents())
    with pytest.raises(FileNotFoundError, match="Downloading failed"):
        load_dataset("mnist", tmp_path / "new" / "data")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "data").mkdir()  # a folder the user made stays
    with pytest.raises(FileNotFoundError):
        load_dataset("mnist", tmp_path / "data")
    assert [p.name for p in tmp_path.iterdir()] == ["data"]
    assert list((tmp_path / "data").iterdir()) == []


# ------------------------------------------------------------------------------ real files


def _real(folder: Path, *stems: str) -> dict[str, Path]:
    paths = {s: folder / f"{s}.gz" for s in stems}
    if not all(p.is_file() for p in paths.values()):
        pytest.skip(f"real MNIST files {', '.join(stems)} not found in {folder}")
    return paths


@pytest.mark.parametrize("how", ["recompressed", "plain", "dotted"])
def test_real_t10k_files_in_any_wrapping_pass_the_pinned_checksums(tmp_path, how):
    paths = _real(SHARED / "mnist", *STEMS[2:])
    contents = {s: gzip.decompress(p.read_bytes()) for s, p in paths.items()}
    write_files(tmp_path / "mnist", contents, how)
    ds = load_dataset("mnist", tmp_path, split="test", download=False)
    assert ds.x_test.shape == (10000, 28, 28, 1)
    assert np.bincount(ds.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028,
                                               974, 1009]


def test_real_recompressed_training_files_load(tmp_path):
    """The shared training files were recompressed by another gzip (issue 21)."""
    train = _real(SHARED / "mnist-train", *STEMS[:2])
    test = _real(SHARED / "mnist", *STEMS[2:])
    (tmp_path / "mnist").mkdir()
    for stem, path in {**train, **test}.items():
        shutil.copyfile(path, tmp_path / "mnist" / f"{stem}.gz")
    ds = load_dataset("mnist", tmp_path, download=False)
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    # published class counts of the 60,000 training labels
    assert np.bincount(ds.y_train).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918,
                                                6265, 5851, 5949]
