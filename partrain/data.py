"""Datasets for partrain: digits, MNIST, Fashion-MNIST, SIGNS, ``.npz`` files and synthetic data."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import importlib
import inspect
import logging
import math
import os
import struct
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "DATASETS",
    "SPLITS",
    "DataError",
    "DataWarning",
    "Dataset",
    "download",
    "load_dataset",
    "load_idx_pair",
    "load_signs_file",
    "read_idx",
    "write_idx",
]

logger = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "signs", "synthetic")
"""Names accepted by :func:`load_dataset`, besides the ``"npz:PATH"`` form."""

SPLITS: tuple[str, ...] = ("train", "test")
"""The splits :func:`load_dataset` can be limited to (``split=``)."""

DEFAULT_DATA_DIR = "data"
_NORMALIZE = ("scale", "standardize", "standardize-int", "none")
_STANDARDIZE = ("standardize", "standardize-int")
_OUTPUT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_STD_EPS = 1e-8  # channels with a smaller std are only centred, never divided by ~0
_SYNTHETIC_SIGNAL = 0.25  # weight of the class template in a synthetic image
_CHUNK = 1 << 20

# IDX type codes (http://yann.lecun.com/exdb/mnist/): all multi-byte values are big-endian.
_IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: "i2", 0x0C: "i4", 0x0D: "f4", 0x0E: "f8"}
_IDX_CODES = {np.dtype(kind): code for code, kind in _IDX_TYPES.items()}

_IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
# SHA-256 of the official gzip files, as listed in TensorFlow Datasets' url_checksums/mnist.txt
# and fashion_mnist.txt; the t10k MNIST values were also checked against local copies.
_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz":
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz":
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz":
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz":
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
_FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz":
        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte.gz":
        "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte.gz":
        "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte.gz":
        "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}


# SHA-256 of the decompressed official MNIST files (issue 21): a copy gzipped by any gzip, or
# not compressed at all, is verified by its content. Fashion-MNIST has none pinned yet.
_MNIST_CONTENT_SHA256 = {
    "train-images-idx3-ubyte":
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte":
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte":
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte":
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
_GZIP_MAGIC = b"\x1f\x8b"


class DataError(ValueError):
    """A data file or array exists but its content is corrupt or invalid."""


class DataWarning(UserWarning):
    """The data were read, but not quite as they were stored (e.g. labels renumbered)."""


@dataclass(frozen=True)
class _IdxSource:
    """Where the four IDX files of an MNIST-like dataset live and how to verify them."""

    title: str
    folders: tuple[str, ...]  # sub-folders of data_dir searched in order; the first gets downloads
    mirrors: tuple[str, ...]  # base URLs, tried in order
    sha256: dict[str, str]  # of the official .gz files, by file name
    class_names: tuple[str, ...]
    content_sha256: dict[str, str] = dataclasses.field(default_factory=dict)  # decompressed


_IDX_SOURCES = {
    "mnist": _IdxSource(
        "MNIST",
        ("mnist", ""),
        (
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        _MNIST_SHA256,
        tuple(str(i) for i in range(10)),
        _MNIST_CONTENT_SHA256,
    ),
    "fashion-mnist": _IdxSource(
        "Fashion-MNIST",
        ("fashion-mnist",),
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        _FASHION_MNIST_SHA256,
        (
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ),
    ),
}


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A labelled image dataset split into a training and a test set.

    Attributes
    ----------
    name : str
        The name the dataset was loaded under, e.g. ``"mnist"`` or ``"npz:runs/x.npz"``.
    x_train, x_test : numpy.ndarray
        Images in NHWC layout, shape ``(m, H, W, C)``, floating point. A split that was not
        loaded (``load_dataset(..., split=...)``, or a test-only file) holds 0 images.
    y_train, y_test : numpy.ndarray
        Integer class ids, shape ``(m,)``, in ``0 .. n_classes - 1``.
    class_names : tuple of str
        One name per class id.
    source : str
        Where the data came from (file paths, ``"scikit-learn load_digits"``, or a text
        starting with ``"SYNTHETIC"``).
    synthetic : bool
        True for generated data that carries no real-world signal.
    normalization : dict or None
        For the standardize modes, what was subtracted and divided by, JSON-ready:
        ``{"method": ..., "mean": [one float per channel], "std": [...]}``; pass it back as
        ``load_dataset(..., statistics=)`` to normalise other images the same way.

    Raises
    ------
    DataError
        If the arrays are inconsistent: wrong number of dimensions, image and label counts
        that differ, different image shapes in train and test, or labels outside
        ``0 .. len(class_names) - 1``.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    source: str
    synthetic: bool = False
    normalization: dict | None = None

    def __post_init__(self) -> None:
        n_classes = len(self.class_names)
        _check_pair(self.x_train, self.y_train, n_classes, f"Dataset {self.name!r} (train)")
        _check_pair(self.x_test, self.y_test, n_classes, f"Dataset {self.name!r} (test)")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(
                f"Dataset {self.name!r}: train images are {self.x_train.shape[1:]} but test "
                f"images are {self.x_test.shape[1:]}; both must have the same (H, W, C)."
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape ``(H, W, C)`` of one image."""
        return tuple(self.x_train.shape[1:])

    @property
    def n_classes(self) -> int:
        """Number of classes, ``len(class_names)``."""
        return len(self.class_names)

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={self.x_train.shape}, test={self.x_test.shape}, "
            f"dtype={self.x_train.dtype}, n_classes={self.n_classes}, synthetic={self.synthetic})"
        )


@dataclass(frozen=True)
class _Request:
    """The arguments of :func:`load_dataset` shared by every loader."""

    name: str
    data_dir: Path
    normalize: str
    dtype: np.dtype
    download: bool
    split: str | None  # None: both splits

    def wants(self, split: str) -> bool:
        """Whether the caller needs `split` ("train" or "test")."""
        return self.split in (None, split)


# ------------------------------------------------------------------------------ public API


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    normalize: str = "scale",
    dtype: npt.DTypeLike = np.float32,
    download: bool = True,
    split: str | None = None,
    statistics: dict | None = None,
    **options: Any,
) -> Dataset:
    """Load a dataset by name.

    Parameters
    ----------
    name : str
        One of :data:`DATASETS` or ``"npz:PATH"``:

        ``"digits"``
            scikit-learn's 1,797 real 8x8 digit images (needs ``partrain[digits]``), split
            into train/test by a seeded, stratified split. Options: ``test_fraction=0.2``,
            ``split_seed=0``.
        ``"mnist"``, ``"fashion-mnist"``
            The four standard ``*-idx?-ubyte.gz`` files, looked up in ``data_dir/mnist/`` then
            ``data_dir/`` (MNIST) or in ``data_dir/fashion-mnist/`` (Fashion-MNIST). Missing
            files are downloaded into the folder holding most of the others (the first on a
            tie) when ``download`` is true. Every file is checked against the official one:
            MNIST files may be gzipped by any gzip or uncompressed, and spelled
            ``train-images.idx3-ubyte`` too (the SHA-256 of the decompressed bytes is checked);
            Fashion-MNIST files must be the official ``.gz`` bytes (no decompressed checksums
            are pinned).
        ``"signs"``
            ``train_signs`` and ``test_signs`` as ``.npz`` (keys ``x``, ``y``, ``classes``)
            or ``.h5`` (needs ``partrain[h5]``) in ``data_dir/signs/`` or ``data_dir/``.
            Never downloaded.
        ``"synthetic"``
            Seeded random images with a weak class signal, for timing experiments only.
            Options: ``n_train=1024``, ``n_test=256``, ``shape=(28, 28, 1)``,
            ``n_classes=10``, ``seed=0``.
        ``"npz:PATH"``
            Any ``.npz`` file (path relative to the current directory) holding ``x_train``,
            ``y_train``, ``x_test``, ``y_test`` and optionally ``class_names``; or one set
            in the SIGNS layout (``x``, ``y``, ``classes``), read as a test set only
            (``split="test"``). Without ``class_names``, the classes are the distinct label
            values: labels that are not exactly 0..K-1 are renumbered in sorted order, the
            class names keep the original values, and a :class:`DataWarning` says so.
    data_dir : str or os.PathLike, optional
        The dataset cache folder, default ``"data"`` relative to the current directory.
    normalize : {"scale", "standardize", "standardize-int", "none"}
        ``"scale"`` maps pixels to [0, 1] (uint8 / 255, digits / 16; float images of an
        ``npz`` file are kept as they are); ``"standardize"`` subtracts the per-channel
        mean and divides by the per-channel std of the training set (channels with std
        below 1e-8 are only centred); ``"standardize-int"`` does the same with the mean and
        std truncated to integers (the NumPy CNN tutorial's ``X -= int(np.mean(X)); X /=
        int(np.std(X))``); ``"none"`` only casts.
    dtype : float32 or float64
        dtype of the returned images.
    download : bool
        Whether missing MNIST / Fashion-MNIST files may be downloaded.
    split : {"train", "test"}, optional
        Load only this split (the other holds 0 images): only its files are needed, checked
        and downloaded, e.g. the two ``t10k-*`` files of MNIST or ``test_signs``. Default:
        both. The standardize modes need the training split (its statistics), unless
        ``statistics`` are given.
    statistics : dict, optional
        For the standardize modes: use this ``Dataset.normalization`` of an earlier load
        instead of the training set's statistics.
    **options
        Dataset-specific options listed above.

    Returns
    -------
    Dataset
        Images ``(m, H, W, C)`` in ``dtype`` and int64 labels.

    Raises
    ------
    ValueError
        For an unknown name, ``normalize`` or ``dtype``, or an invalid option value.
    TypeError
        For an option the dataset does not accept.
    FileNotFoundError
        If a needed file is absent and cannot be downloaded.
    DataError
        If a file is corrupt, fails its checksum, or holds invalid arrays.
    ImportError
        If an optional dependency (scikit-learn, h5py) is needed but not installed.
    """
    out_dtype = _check_dtype(dtype)
    _check_normalize(normalize)
    if split is not None and split not in SPLITS:
        raise ValueError(f"Invalid split: {split!r}, expected one of {list(SPLITS)} or None.")
    if split == "test" and normalize in _STANDARDIZE and statistics is None:
        raise ValueError(
            f"normalize={normalize!r} uses the training set's mean and std, so it needs the "
            "training split too: load both splits (split=None), or pass its statistics."
        )
    key = "npz" if isinstance(name, str) and name.startswith("npz:") else name
    loader = _LOADERS.get(key)
    if loader is None:
        raise ValueError(
            f"Invalid dataset: {name!r}, expected one of {list(DATASETS)} or 'npz:PATH'."
        )
    valid = [
        p.name for p in inspect.signature(loader).parameters.values() if p.kind is p.KEYWORD_ONLY
    ]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(
            f"Dataset {key!r} does not accept option(s) {unknown}; "
            f"valid options: {valid or 'none'}."
        )
    standardize = normalize in _STANDARDIZE  # (done here, for every loader alike)
    request = _Request(
        name, Path(DEFAULT_DATA_DIR if data_dir is None else data_dir),
        "none" if standardize else normalize, out_dtype, bool(download), split,
    )
    dataset = loader(request, **options)
    if standardize:
        stats = _statistics(dataset.x_train, normalize) if statistics is None else \
            _check_statistics(statistics, normalize, dataset.input_shape[-1])
        _standardize((dataset.x_train, dataset.x_test), stats)
        dataset = dataclasses.replace(dataset, normalization=stats)
    if split is not None:  # (loaders without files per split made both: keep one)
        (x_train, y_train), (x_test, y_test) = _fill_missing_split(
            {split: (getattr(dataset, f"x_{split}"), getattr(dataset, f"y_{split}"))})
        dataset = dataclasses.replace(dataset, x_train=x_train, y_train=y_train,
                                      x_test=x_test, y_test=y_test)
    return dataset


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file, gzip-compressed (by any gzip) or not.

    Parameters
    ----------
    path : str or os.PathLike
        The file to read.

    Returns
    -------
    numpy.ndarray
        A writable array in native byte order with the dimensions stored in the file.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    DataError
        For a bad gzip stream (a name ending with ``.gz``, or the gzip magic bytes, means
        compressed), a bad magic number, an unknown type code, or a payload whose
        size differs from the product of the dimensions times the item size.
    """
    path = _require_file(path)
    return _parse_idx(_idx_content(path, path.read_bytes()), path)


def _idx_content(path: Path, blob: bytes) -> bytes:
    """The IDX bytes of a file holding `blob`: gunzipped when the name ends with ``.gz`` or
    the bytes start with the gzip magic (an IDX file starts with 00 00), else as they are."""
    if not (path.name.endswith(".gz") or blob[:2] == _GZIP_MAGIC):
        return blob
    try:
        return gzip.decompress(blob)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"{path}: not a valid gzip file ({exc}); delete it and fetch it again."
        ) from exc


def _parse_idx(data: bytes, path: Path) -> np.ndarray:
    """The array stored in the IDX bytes `data` read from `path` (named in errors)."""
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_TYPES or data[3] == 0:
        raise DataError(
            f"{path}: bad IDX magic number {data[:4].hex() or '(empty file)'}; expected "
            f"00 00, a type code in {[f'0x{c:02X}' for c in _IDX_TYPES]} and a dimension count."
        )
    ndim = data[3]
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise DataError(f"{path}: IDX header is truncated ({len(data)} of {offset} bytes).")
    dims = struct.unpack(f">{ndim}I", data[4:offset])
    dtype = np.dtype(">" + _IDX_TYPES[data[2]])
    expected = math.prod(dims) * dtype.itemsize
    actual = len(data) - offset
    if actual != expected:
        problem = "truncated" if actual < expected else "followed by trailing bytes"
        raise DataError(
            f"{path}: IDX payload is {actual} bytes, expected {expected} for shape {dims} of "
            f"{dtype.name}; the file is {problem}. Delete it and fetch it again."
        )
    array = np.frombuffer(data, dtype=dtype, offset=offset).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike[str], array: npt.ArrayLike) -> None:
    """Write an array as an IDX file, gzip-compressed if ``path`` ends with ``.gz``.

    Parameters
    ----------
    path : str or os.PathLike
        The file to write (its folder must exist).
    array : array_like
        1 to 255 dimensions, dtype uint8, int8, int16, int32, float32 or float64.

    Raises
    ------
    ValueError
        For an unsupported dtype or number of dimensions.
    """
    array = np.asarray(array)
    code = _IDX_CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        valid = [np.dtype(kind).name for kind in _IDX_TYPES.values()]
        raise ValueError(f"`array` dtype must be one of {valid}, got {array.dtype}.")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"`array` must have 1 to 255 dimensions, got {array.ndim}.")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    blob = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(blob, mtime=0) if path.name.endswith(".gz") else blob)


def load_idx_pair(
    images_path: str | os.PathLike[str],
    labels_path: str | os.PathLike[str],
    *,
    normalize: str = "scale",
    dtype: npt.DTypeLike = np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """Read an MNIST-style pair of IDX image and label files.

    Parameters
    ----------
    images_path : str or os.PathLike
        A 3-D uint8 IDX file ``(m, rows, cols)``.
    labels_path : str or os.PathLike
        A 1-D uint8 IDX file with ``m`` labels in 0..9.
    normalize : {"scale", "standardize", "standardize-int", "none"}
        As in :func:`load_dataset`; the standardize modes use the statistics of these images.
    dtype : float32 or float64
        dtype of the returned images.

    Returns
    -------
    images : numpy.ndarray
        Shape ``(m, rows, cols, 1)``, dtype ``dtype``.
    labels : numpy.ndarray
        Shape ``(m,)``, int64.

    Raises
    ------
    FileNotFoundError
        If a file does not exist.
    DataError
        If a file is corrupt, has the wrong type or shape, the counts differ, or a label is
        outside 0..9.
    """
    out_dtype = _check_dtype(dtype)
    _check_normalize(normalize)
    images, labels = _read_idx_pair(images_path, labels_path)
    (images,) = _normalize((images,), normalize, out_dtype, 255.0)
    return images, labels


def load_signs_file(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Read one SIGNS file (``train_signs`` or ``test_signs``) in ``.h5`` or ``.npz`` form.

    Parameters
    ----------
    path : str or os.PathLike
        An ``.h5``/``.hdf5`` file with datasets ``<split>_set_x``, ``<split>_set_y`` and
        ``list_classes`` (needs ``partrain[h5]``), or an ``.npz`` file with ``x``, ``y``
        and ``classes``.

    Returns
    -------
    images : numpy.ndarray
        Raw uint8 images ``(m, 64, 64, 3)``.
    labels : numpy.ndarray
        int64 class ids ``(m,)``.
    class_names : tuple of str
        One name per class.

    Raises
    ------
    ValueError
        If the file name ends with neither ``.h5``/``.hdf5`` nor ``.npz``.
    FileNotFoundError
        If the file does not exist.
    DataError
        If the file cannot be read or holds missing or invalid arrays.
    ImportError
        For an ``.h5`` file when h5py is not installed.
    """
    path = _require_file(path)
    if path.suffix == ".npz":
        arrays = _read_npz(path, ("x", "y", "classes"))
        images, labels, classes = arrays["x"], arrays["y"], arrays["classes"]
    elif path.suffix in (".h5", ".hdf5"):
        images, labels, classes = _read_signs_h5(path)
    else:
        raise ValueError(f"`path` must end with .h5, .hdf5 or .npz, got {str(path)!r}.")
    if images.ndim != 4 or images.dtype != np.uint8:
        raise DataError(
            f"{path}: images must be a uint8 array (m, H, W, C), got {images.dtype} {images.shape}."
        )
    labels = _as_labels(labels, f"{path}: labels")
    names = _as_names(classes, f"{path}: classes")
    _check_pair(images, labels, len(names), str(path))
    return images, labels, names


def download(
    url: str,
    dest: str | os.PathLike[str],
    sha256: str,
    *,
    opener: Callable[..., Any] = urllib.request.urlopen,
    timeout: float = 30,
) -> Path:
    """Download ``url`` to ``dest``, verifying its SHA-256 before the file appears.

    The bytes go to a temporary file in ``dest``'s folder, which is renamed to ``dest``
    (atomically, with :func:`os.replace`) only when the checksum matches; on any failure
    the temporary file is deleted.

    Parameters
    ----------
    url : str
        What to download.
    dest : str or os.PathLike
        Where to store it; missing parent folders are created.
    sha256 : str
        Expected SHA-256, 64 hexadecimal digits.
    opener : callable
        ``opener(url, timeout=timeout)`` returns a context manager with a ``read(n)``
        method, like :func:`urllib.request.urlopen` (the default).
    timeout : float
        Seconds before a stalled connection fails.

    Returns
    -------
    pathlib.Path
        ``dest``.

    Raises
    ------
    ValueError
        If ``sha256`` is not 64 hexadecimal digits.
    DataError
        If the downloaded bytes do not match ``sha256``.
    OSError
        For network and file-system errors (e.g. :class:`urllib.error.URLError`).
    """
    expected = sha256.lower()
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise ValueError(f"`sha256` must be 64 hexadecimal digits, got {sha256!r}.")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    temp = Path(temp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, opener(url, timeout=timeout) as response:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != expected:
            raise DataError(
                f"Checksum mismatch for {dest.name} downloaded from {url}: expected SHA-256 "
                f"{expected}, got {digest.hexdigest()}. The download was discarded; retry later "
                "or fetch the file by hand."
            )
        os.replace(temp, dest)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return dest


# ------------------------------------------------------------------------------ loaders


def _load_idx_dataset(request: _Request) -> Dataset:
    """Load MNIST or Fashion-MNIST, downloading missing files if allowed."""
    source = _IDX_SOURCES[request.name]
    folders = [request.data_dir / sub for sub in source.folders]
    needed = [n for n in _IDX_FILES if request.wants("test" if n.startswith("t10k") else "train")]
    # the folder holding most of the needed files (the first on a tie) is the one to complete
    found_in = [{n: p for n in needed if (p := _find_idx_file(f, n))} for f in folders]
    best = max(range(len(folders)), key=lambda i: (len(found_in[i]), -i))
    folder, found = folders[best], found_in[best]
    missing = [n for n in needed if n not in found]
    failures: list[str] = []
    if missing and request.download:
        failures = _fetch_into(source, folder, missing)
        found = {n: p for n in needed if (p := _find_idx_file(folder, n))}
        missing = [n for n in needed if n not in found]
    if missing:
        reason = (
            "Downloading failed: " + "; ".join(failures) if failures
            else "Pass download=True to fetch them"
        )
        which = "four files" if len(needed) == 4 else f"{request.split} files"
        raise FileNotFoundError(
            f"{source.title} files missing from {folder}: {', '.join(missing)}. Put the {which} "
            f"{', '.join(needed)} in {folder}/ (each may also be uncompressed, and spelled "
            f"train-images.idx3-ubyte; they are published at {source.mirrors[0]}). {reason}."
        )
    arrays = {n: _read_verified_idx(found[n], n, source) for n in needed}
    pairs = {}
    for split, (images, labels) in (("train", _IDX_FILES[:2]), ("test", _IDX_FILES[2:])):
        if request.wants(split):
            pairs[split] = _check_idx_pair(arrays[images], arrays[labels],
                                           found[images], found[labels])
    (x_train, y_train), (x_test, y_test) = _fill_missing_split(pairs)
    x_train, x_test = _normalize((x_train, x_test), request.normalize, request.dtype, 255.0)
    return Dataset(
        request.name, x_train, y_train, x_test, y_test, source.class_names,
        source=f"{source.title} IDX files in {folder}",
    )


def _load_digits(request: _Request, *, test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """Load scikit-learn's 8x8 digits with a seeded, stratified train/test split."""
    if not (isinstance(test_fraction, (int, float)) and 0 < test_fraction < 1):
        raise ValueError(f"`test_fraction` must be a number in (0, 1), got {test_fraction!r}.")
    datasets = _import_optional("sklearn.datasets", "digits", "The 'digits' dataset")
    bunch = datasets.load_digits()
    images = bunch.images[..., np.newaxis]
    labels = bunch.target.astype(np.int64)
    rng = np.random.default_rng(split_seed)
    test = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        test[rng.choice(members, round(test_fraction * len(members)), replace=False)] = True
    x_train, x_test = _normalize(
        (images[~test], images[test]), request.normalize, request.dtype, 16.0
    )
    return Dataset(
        request.name, x_train, labels[~test], x_test, labels[test],
        tuple(str(i) for i in range(10)),
        source=f"scikit-learn load_digits (stratified split, test_fraction={test_fraction}, "
        f"split_seed={split_seed})",
    )


def _load_signs(request: _Request) -> Dataset:
    """Load the SIGNS hand-gesture dataset from local ``.npz`` or ``.h5`` files."""
    folders = (request.data_dir / "signs", request.data_dir)
    paths: dict[str, Path] = {}
    missing = []
    for split in [s for s in SPLITS if request.wants(s)]:
        candidates = [f / f"{split}_signs{ext}" for f in folders for ext in (".npz", ".h5")]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            missing.append(f"{split}_signs.h5 (or .npz)")
        else:
            paths[split] = found
    if missing:
        wanted = " and ".join(f"{s}_signs.h5" for s in SPLITS if request.wants(s))
        wanted_npz = " and ".join(f"{s}_signs.npz" for s in SPLITS if request.wants(s))
        raise FileNotFoundError(
            f"SIGNS files missing: {', '.join(missing)}. Put {wanted} (or {wanted_npz} with "
            f"arrays x, y, classes) in {folders[0]}/ or {folders[1]}/; SIGNS is never "
            "downloaded automatically."
        )
    loaded = {split: load_signs_file(path) for split, path in paths.items()}
    names = {split: split_names for split, (_, _, split_names) in loaded.items()}
    if len(set(names.values())) > 1:
        raise DataError(
            f"{paths['train']} has classes {names['train']} but {paths['test']} has "
            f"{names['test']}."
        )
    (x_train, y_train), (x_test, y_test) = _fill_missing_split(
        {split: (x, y) for split, (x, y, _) in loaded.items()})
    x_train, x_test = _normalize((x_train, x_test), request.normalize, request.dtype, 255.0)
    return Dataset(
        request.name, x_train, y_train, x_test, y_test, next(iter(names.values())),
        source=f"SIGNS file{'s' * (len(paths) > 1)} {' and '.join(map(str, paths.values()))}",
    )


def _load_npz(request: _Request) -> Dataset:
    """Load a user ``.npz`` file named by ``npz:PATH``."""
    path = _require_file(request.name[len("npz:"):])
    if _npz_names(path) >= {"x", "y", "classes"} and "x_train" not in _npz_names(path):
        if request.split != "test":
            raise DataError(
                f"{path} holds one set in the SIGNS layout (x, y, classes), which partrain reads "
                "as a test set only (e.g. `partrain evaluate --split test`); to train, store "
                "x_train, y_train, x_test and y_test."
            )
        x_test, y_test, names = load_signs_file(path)
        (x_train, y_train), _ = _fill_missing_split({"test": (x_test, y_test)})
    else:
        arrays = _read_npz(path, ("x_train", "y_train", "x_test", "y_test"), ("class_names",))
        x_train = _as_images(arrays["x_train"], f"{path}: x_train")
        x_test = _as_images(arrays["x_test"], f"{path}: x_test")
        y_train = _as_labels(arrays["y_train"], f"{path}: y_train")
        y_test = _as_labels(arrays["y_test"], f"{path}: y_test")
        if "class_names" in arrays:
            names = _as_names(arrays["class_names"], f"{path}: class_names")
        else:
            y_train, y_test, names = _classes_from_labels(y_train, y_test, str(path))
    scale = 255.0 if x_train.dtype.kind in "ui" else 1.0
    x_train, x_test = _normalize((x_train, x_test), request.normalize, request.dtype, scale)
    return Dataset(request.name, x_train, y_train, x_test, y_test, names, source=str(path))


def _load_synthetic(
    request: _Request,
    *,
    n_train: int = 1024,
    n_test: int = 256,
    shape: tuple[int, int, int] = (28, 28, 1),
    n_classes: int = 10,
    seed: int = 0,
) -> Dataset:
    """Generate seeded random images: uniform noise blended with a per-class template."""
    for option, value in (("n_train", n_train), ("n_test", n_test), ("n_classes", n_classes)):
        if not _is_positive_int(value):
            raise ValueError(f"`{option}` must be a positive integer, got {value!r}.")
    shape = tuple(shape)
    if len(shape) != 3 or not all(_is_positive_int(d) for d in shape):
        raise ValueError(f"`shape` must be (H, W, C) of positive integers, got {shape!r}.")
    rng = np.random.default_rng(seed)
    templates = rng.random((n_classes, *shape))
    splits = []
    for n in (n_train, n_test):
        labels = rng.integers(0, n_classes, n)
        noise = rng.random((n, *shape))
        images = (1 - _SYNTHETIC_SIGNAL) * noise + _SYNTHETIC_SIGNAL * templates[labels]
        splits.append((images, labels))
    (x_train, y_train), (x_test, y_test) = splits
    x_train, x_test = _normalize((x_train, x_test), request.normalize, request.dtype, 1.0)
    return Dataset(
        request.name, x_train, y_train, x_test, y_test, tuple(str(i) for i in range(n_classes)),
        source=f"SYNTHETIC random data (seed={seed}): uniform noise in [0, 1) blended with a "
        f"per-class template at weight {_SYNTHETIC_SIGNAL}; for timing experiments only",
        synthetic=True,
    )


def _npz_names(path: Path) -> set[str]:
    """The array names in an ``.npz`` file (empty if it cannot be read as one)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return {name[:-4] for name in archive.namelist() if name.endswith(".npy")}
    except (OSError, zipfile.BadZipFile):
        return set()


def _fill_missing_split(pairs: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(x_train, y_train), (x_test, y_test)] from {split: (x, y)}; a split not loaded gets
    0 images of the other's shape and dtype."""
    shape_of = next(iter(pairs.values()))
    empty = (np.empty((0, *shape_of[0].shape[1:]), shape_of[0].dtype), np.empty(0, np.int64))
    return [pairs.get(split, empty) for split in SPLITS]


def _classes_from_labels(
    y_train: np.ndarray, y_test: np.ndarray, where: str
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """The classes are the distinct label values: 0..K-1 as they are, anything else
    renumbered in sorted order (names keep the values), with a DataWarning saying so."""
    values = np.unique(np.concatenate([y_train, y_test]))
    names = tuple(str(v) for v in values)
    if values.size and values[0] < 0:  # not class ids at all: the Dataset check says so
        return y_train, y_test, tuple(str(i) for i in range(int(values[-1]) + 1))
    if np.array_equal(values, np.arange(len(values))):
        return y_train, y_test, names
    shown = ", ".join(names) if len(names) <= 12 else ", ".join(names[:10]) + ", ..."
    absent = int(values.max()) + 1 - len(values)
    gaps = f" ({absent} of 0..{values.max()} never occur)" if absent else ""
    warnings.warn(
        f"{where}: the labels take {len(values)} distinct values ({shown}), not 0..K-1{gaps}: "
        f"read as {len(values)} classes, renumbered 0..{len(values) - 1} in sorted order and "
        "named by their original values; store class_names in the file to set the classes.",
        DataWarning, stacklevel=4,
    )
    return (np.searchsorted(values, y_train), np.searchsorted(values, y_test), names)


_LOADERS: dict[str, Callable[..., Dataset]] = {
    "digits": _load_digits,
    "mnist": _load_idx_dataset,
    "fashion-mnist": _load_idx_dataset,
    "signs": _load_signs,
    "synthetic": _load_synthetic,
    "npz": _load_npz,
}


# ------------------------------------------------------------------------------ helpers


def _check_dtype(dtype: npt.DTypeLike) -> np.dtype:
    """Return ``dtype`` as a numpy dtype if it is float32 or float64."""
    try:
        result = np.dtype(dtype)
    except TypeError:
        result = None
    if result not in _OUTPUT_DTYPES:
        raise ValueError(f"`dtype` must be float32 or float64, got {dtype!r}.")
    return result


def _check_normalize(normalize: str) -> None:
    if normalize not in _NORMALIZE:
        raise ValueError(f"`normalize` must be one of {list(_NORMALIZE)}, got {normalize!r}.")


def _normalize(
    arrays: tuple[np.ndarray, ...], method: str, dtype: np.dtype, scale: float
) -> list[np.ndarray]:
    """Cast ``arrays`` to ``dtype`` and normalize them, with statistics from ``arrays[0]``.

    ``scale`` is the value that maps to 1 under ``method="scale"``. The inputs are never
    modified.
    """
    out = [a.astype(dtype) for a in arrays]
    if method == "scale":
        for a in out:
            a /= dtype.type(scale)
    elif method in _STANDARDIZE:
        _standardize(out, _statistics(out[0], method))
    return out


def _statistics(x: np.ndarray, method: str) -> dict:
    """The per-channel mean and std of images `x`, as ``Dataset.normalization``: truncated
    to integers for ``"standardize-int"``; a std below _STD_EPS becomes 1 (centre only)."""
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axis=axes, dtype=np.float64)
    std = x.std(axis=axes, dtype=np.float64)
    if method == "standardize-int":
        mean, std = np.trunc(mean), np.trunc(std)
    std[std < _STD_EPS] = 1.0
    return {"method": method, "mean": mean.tolist(), "std": std.tolist()}


def _check_statistics(statistics: Any, method: str, n_channels: int) -> dict:
    """`statistics` if it is a valid ``Dataset.normalization`` for `method` and images of
    `n_channels` channels, else ValueError."""
    try:
        mean = np.asarray(statistics["mean"], dtype=np.float64)
        std = np.asarray(statistics["std"], dtype=np.float64)
        ok = statistics.get("method", method) == method and mean.shape == std.shape == \
            (n_channels,) and np.isfinite(mean).all() and (std > 0).all()
    except (TypeError, KeyError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise ValueError(
            f"`statistics` must be the normalization of a {method!r} load: {{'method': "
            f"{method!r}, 'mean': [...], 'std': [...]}} with {n_channels} finite values each "
            f"(std > 0), got {statistics!r}."
        )
    return {"method": method, "mean": mean.tolist(), "std": std.tolist()}


def _standardize(arrays: tuple[np.ndarray, ...] | list[np.ndarray], stats: dict) -> None:
    """(x - mean) / std per channel, in place, in the arrays' dtype."""
    for a in arrays:
        a -= np.asarray(stats["mean"]).astype(a.dtype)
        a /= np.asarray(stats["std"]).astype(a.dtype)


def _require_file(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such file: {path}")
    return path


def _import_optional(module: str, extra: str, purpose: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{purpose} needs the optional package {module.split('.')[0]!r}: "
            f'pip install "partrain[{extra}]"'
        ) from exc


def _is_positive_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


def _idx_spellings(filename: str) -> tuple[str, ...]:
    """The names an IDX file is found under, in order: the official gzip name, the same
    uncompressed, then both with a dot before ``idx`` (``train-images.idx3-ubyte``)."""
    stem = filename.removesuffix(".gz")
    dotted = stem.replace("-idx", ".idx")
    return (f"{stem}.gz", stem, f"{dotted}.gz", dotted)


def _find_idx_file(folder: Path, filename: str) -> Path | None:
    """The first of `filename`'s spellings that is a file in `folder`, else None."""
    return next((folder / n for n in _idx_spellings(filename) if (folder / n).is_file()), None)


def _read_verified_idx(path: Path, filename: str, source: _IdxSource) -> np.ndarray:
    """Read the IDX file found for the official `filename` and check it is the official one.

    The official ``.gz`` bytes pass at once; any other wrapping (another gzip, none) passes
    when the SHA-256 of the decompressed bytes is the pinned one. Without a pinned content
    checksum (Fashion-MNIST), only the official ``.gz`` bytes pass.
    """
    blob = path.read_bytes()
    stem = filename.removesuffix(".gz")
    if path.name == filename and hashlib.sha256(blob).hexdigest() == source.sha256[filename]:
        return _parse_idx(_idx_content(path, blob), path)
    if stem not in source.content_sha256:
        raise DataError(
            f"{path}: SHA-256 is {hashlib.sha256(blob).hexdigest()}, expected "
            f"{source.sha256[filename]} of the official {source.title} {filename}; partrain "
            f"pins no checksum of the decompressed {source.title} files, so only the official "
            f".gz file is accepted (not a recompressed or uncompressed copy). Replace it with "
            f"the official {filename} (deleting it downloads it again), or load your own data "
            "with 'npz:PATH'."
        )
    content = _idx_content(path, blob)
    actual, expected = hashlib.sha256(content).hexdigest(), source.content_sha256[stem]
    if actual != expected:
        raise DataError(
            f"{path}: SHA-256 of the decompressed content is {actual}, expected {expected} "
            f"of the official {source.title} {stem}; the file is corrupt or a different file. "
            f"Replace it with a good copy of {stem} (gzipped by any gzip, or not), delete it "
            "to have it downloaded again, or load your own data with 'npz:PATH'."
        )
    return _parse_idx(content, path)


def _fetch_into(source: _IdxSource, folder: Path, filenames: list[str]) -> list[str]:
    """`_fetch`, and the folders it had to create are removed again if nothing was saved."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        return _fetch(source, folder, filenames)
    finally:
        for path in created:  # deepest first; a folder that holds anything stays
            with contextlib.suppress(OSError):
                path.rmdir()


def _fetch(source: _IdxSource, folder: Path, filenames: list[str]) -> list[str]:
    """Download each file from the first mirror that serves it intact.

    A mirror that cannot be reached (anything but an HTTP error status) is not tried again
    for the remaining files. Returns a description of each failure. Raises DataError if no
    mirror served a file and at least one served it with a wrong checksum.
    """
    failures = []
    unreachable: set[str] = set()
    for filename in filenames:
        errors: list[tuple[str, Exception]] = []
        for mirror in [m for m in source.mirrors if m not in unreachable]:
            url = mirror + filename
            logger.info("Downloading %s to %s", url, folder)
            try:
                download(url, folder / filename, source.sha256[filename])
                break
            except (OSError, DataError) as exc:
                errors.append((url, exc))
                if isinstance(exc, OSError) and not isinstance(exc, urllib.error.HTTPError):
                    unreachable.add(mirror)
        else:
            summary = "; ".join(f"{url}: {exc}" for url, exc in errors)
            if any(isinstance(exc, DataError) for _, exc in errors):
                raise DataError(f"No mirror served an intact {filename}: {summary}")
            if summary:
                failures.append(summary)
    return failures


def _read_idx_pair(
    images_path: str | os.PathLike[str], labels_path: str | os.PathLike[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate raw uint8 images ``(m, rows, cols, 1)`` and int64 labels."""
    return _check_idx_pair(read_idx(images_path), read_idx(labels_path), images_path,
                           labels_path)


def _check_idx_pair(
    images: np.ndarray, labels: np.ndarray, images_path: object, labels_path: object
) -> tuple[np.ndarray, np.ndarray]:
    """Validate raw IDX images and labels read from the named files; return images
    ``(m, rows, cols, 1)`` and int64 labels."""
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{images_path}: expected 3-D uint8 images (m, rows, cols), "
            f"got {images.dtype} {images.shape}."
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(
            f"{labels_path}: expected 1-D uint8 labels (m,), got {labels.dtype} {labels.shape}."
        )
    images = images[..., np.newaxis]
    labels = labels.astype(np.int64)
    _check_pair(images, labels, 10, f"{images_path} + {labels_path}")
    return images, labels


def _check_pair(images: np.ndarray, labels: np.ndarray, n_classes: int, where: str) -> None:
    """Check that images ``(m, H, W, C)`` and integer labels ``(m,)`` in range go together."""
    if images.ndim != 4 or labels.ndim != 1 or labels.dtype.kind not in "ui":
        raise DataError(
            f"{where}: expected images (m, H, W, C) and integer labels (m,), got images "
            f"{images.shape} and labels {labels.dtype} {labels.shape}."
        )
    if len(images) != len(labels):
        raise DataError(
            f"{where}: {len(labels)} labels for {len(images)} images; the counts must match."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise DataError(
            f"{where}: labels must be class ids in 0..{n_classes - 1}, "
            f"got values in {labels.min()}..{labels.max()}."
        )


def _read_npz(
    path: Path, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, np.ndarray]:
    """Read the ``required`` and present ``optional`` arrays of an ``.npz`` file, never pickles."""
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not an .npz archive; write it with numpy.savez.")
    try:
        with np.load(path, allow_pickle=False) as archive:
            present = set(archive.files)
            arrays = {k: archive[k] for k in (*required, *optional) if k in present}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(
            f"{path}: cannot read the .npz archive ({exc}). Store strings as a str array, "
            "not an object array."
        ) from exc
    missing = [k for k in required if k not in present]
    if missing:
        raise DataError(
            f"{path}: missing array(s) {missing}; expected {list(required)}"
            f"{f' (optional {list(optional)})' if optional else ''}, found {sorted(present)}."
        )
    return arrays


def _read_signs_h5(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read ``<split>_set_x``, ``<split>_set_y`` and ``list_classes`` from a SIGNS HDF5 file."""
    h5py = _import_optional("h5py", "h5", f"Reading {path}")
    try:
        with h5py.File(path, "r") as f:
            keys = sorted(f.keys())
            x_keys = [k for k in keys if k.endswith("_set_x")]
            if len(x_keys) == 1 and x_keys[0][:-1] + "y" in keys and "list_classes" in keys:
                return f[x_keys[0]][()], f[x_keys[0][:-1] + "y"][()], f["list_classes"][()]
    except OSError as exc:
        raise DataError(f"{path}: cannot read the HDF5 file ({exc}).") from exc
    raise DataError(
        f"{path}: expected datasets <split>_set_x, <split>_set_y and list_classes, found {keys}."
    )


def _as_images(x: np.ndarray, where: str) -> np.ndarray:
    """Validate a non-empty numeric NHWC image array; a 3-D (m, H, W) array gains C=1."""
    if x.ndim == 3:
        x = x[..., np.newaxis]
    if x.ndim != 4 or x.dtype.kind not in "uif" or len(x) == 0:
        raise DataError(
            f"{where} must be a non-empty numeric image array (m, H, W, C) or (m, H, W), "
            f"got {x.dtype} {x.shape}."
        )
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise DataError(
            f"{where} contains {np.count_nonzero(~np.isfinite(x))} NaN or infinite values."
        )
    return x


def _as_labels(y: np.ndarray, where: str) -> np.ndarray:
    """Return int64 class ids ``(m,)`` from ids ``(m,)``, ``(1, m)``, ``(m, 1)`` or one-hot."""
    if y.ndim == 2 and 1 in y.shape:
        y = y.ravel()
    elif y.ndim == 2:
        if not (np.isin(y, (0, 1)).all() and (y.sum(axis=1) == 1).all()):
            raise DataError(
                f"{where} has shape {y.shape} but is not one-hot (each row must hold a single "
                "1 and otherwise 0); store class ids of shape (m,) instead."
            )
        y = y.argmax(axis=1)
    if y.ndim != 1 or y.dtype.kind not in "ui":
        raise DataError(
            f"{where} must be integer class ids of shape (m,), got {y.dtype} {y.shape}; "
            "convert whole-number labels with .astype(numpy.int64)."
        )
    return y.astype(np.int64)


def _as_names(names: np.ndarray, where: str) -> tuple[str, ...]:
    """Return class names as str, decoding bytes."""
    if names.ndim != 1:
        raise DataError(f"{where} must be a 1-D array of class names, got shape {names.shape}.")
    return tuple(v.decode() if isinstance(v, bytes) else str(v) for v in names.tolist())
