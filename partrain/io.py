"""Safe files: one `.npz` of arrays plus JSON metadata, written atomically, read without pickle."""

from __future__ import annotations

import io
import json
import math
import os
import secrets
import stat
import tempfile
import zipfile
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1


class FileFormatError(ValueError):
    """A file exists but is not a valid partrain file of the expected kind."""


class NotRegularFileError(OSError):
    """An output path names something other than a regular file (a device, a pipe, a socket,
    a folder): partrain never replaces it."""


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
          (stat.S_ISSOCK, "a socket"))


def special_file(path: str | os.PathLike) -> str | None:
    """What `path` names (symbolic links followed) when it exists and is neither a regular
    file nor the null device, e.g. "a character device"; else None.

    Outputs are written to a temporary file renamed over the target, and a rename replaces
    whatever the target was: as root, a device or the machine's /dev/null itself. So every
    writer refuses these targets, except the null device (`os.devnull`, or any node with its
    device number), which is written through, without a rename, to discard the output.
    """
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISREG(info.st_mode) or is_null_device(info):
        return None
    return next((kind for test, kind in _KINDS if test(info.st_mode)), "not a regular file")


def is_null_device(info: os.stat_result) -> bool:
    """Whether `info` (from os.stat) is the null device: a character device numbered as
    `os.devnull` (1:3 on Linux)."""
    if not stat.S_ISCHR(info.st_mode):
        return False
    try:
        return info.st_rdev == os.stat(os.devnull).st_rdev
    except OSError:
        return False


def _refuse_special(path: Path) -> None:
    kind = special_file(path)
    if kind is not None:
        raise NotRegularFileError(f"'{path}' is {kind}, not a regular file: partrain does not "
                                  "replace it")


_NOFOLLOW_CLOEXEC = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)  # (POSIX)


def _exclusive_temp(path: Path) -> tuple[int, Path]:
    """A new temporary file next to `path`, created exclusively (O_EXCL: a planted file or
    link of that name is never opened), with the mode a new file gets (0666 minus umask)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW_CLOEXEC
                         | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        return fd, tmp
    raise FileExistsError(f"Could not create a temporary file next to '{path}'.")


def write_file(path: str | os.PathLike, write) -> Path:
    """Call `write(binary_file)` on a temporary file in `path`'s folder, then rename it over
    `path`, so that a crash mid-write leaves the previous file intact. (For writers that take
    a file object, such as `np.savez` or matplotlib's `savefig`.)

    Refused (`NotRegularFileError`), before anything is written, when `path` is a device, a
    pipe, a socket or a folder; the null device is written through (see `special_file`).
    """
    path = Path(path)
    try:
        null = is_null_device(os.stat(path))
    except OSError:
        null = False
    if null:  # (through a buffer: writers such as zipfile seek, which a device cannot)
        buffer = io.BytesIO()
        write(buffer)
        with open(path, "wb") as f:
            f.write(buffer.getbuffer())
        return path
    _refuse_special(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _exclusive_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _refuse_special(path)  # (again: it may have become one meanwhile)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)
    return path


def _sync_folder(folder: Path) -> None:
    """fsync a folder, so that a rename in it survives a power cut (as SQLite does); a
    file system that cannot sync folders is left as it is."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_npz(path: str | os.PathLike, kind: str, meta: dict, arrays: dict) -> Path:
    """Write `arrays` and the JSON-ready `meta` to `path`, atomically.

    The data go to a temporary file in the same folder which is then renamed over `path`, so
    a crash mid-write leaves the previous file intact.
    """
    header = {"kind": kind, "version": FORMAT_VERSION, **meta}
    payload = {"__meta__": np.array(json.dumps(header)), **arrays}
    return write_file(path, lambda f: np.savez(f, **payload))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically, like `write_npz`."""
    return write_file(path, lambda f: f.write(text.encode()))


def output_problem(path: str | os.PathLike, folder: bool = False) -> str | None:
    """Why `path` cannot be written as a file (or, with `folder`, used as a folder for files),
    or None when it can. Nothing is created: missing folders only have to be creatable.

    Checked: the target is not a directory (a file target) or not a file (a folder target);
    a file target is not a device, pipe or socket (the null device is fine: see
    `special_file`);
    the nearest existing folder on its way is a folder; that folder is writable (a temporary
    file is created and removed in an existing target folder, which also catches read-only
    mounts; for a folder yet to be created, its existing ancestor is checked with access(2)).
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        return "it exists and is not a folder"
    if not folder and path.is_dir():
        return "it is a folder, not a file name"
    if not folder and (kind := special_file(path)):
        return (f"it is {kind}, not a regular file, and partrain does not replace it; give "
                "the path of a file (or /dev/null to discard the output)")
    if not folder and path.exists() and is_null_device(os.stat(path)):
        return None if os.access(path, os.W_OK) else f"'{path}' is not writable"
    target = path if folder else path.parent
    existing = target
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():
            return f"'{existing}' is a broken symbolic link"
        existing = existing.parent
    if not existing.is_dir():
        return f"'{existing}' is a file, not a folder"
    if existing != target:
        if not os.access(existing, os.W_OK | os.X_OK):
            return f"cannot create '{target}': '{existing}' is not writable"
        return None
    try:
        fd, probe = tempfile.mkstemp(prefix=".partrain-probe.", dir=existing)
    except OSError as exc:
        return f"cannot write in '{existing}' ({exc.strerror or exc})"
    os.close(fd)
    os.unlink(probe)
    return None


def memory_bytes() -> int | None:
    """This machine's physical memory in bytes, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_fits_memory(what: str, shape, dtype) -> None:
    """Raise ValueError when an array of `shape` and `dtype` would not fit in this machine's
    memory (shapes from a file or a config are checked with this before any allocation)."""
    n_values, itemsize = math.prod(int(d) for d in shape), np.dtype(dtype).itemsize
    available = memory_bytes()
    if available is not None and n_values * itemsize > available:
        raise ValueError(
            f"{what} would take {binary_size(n_values * itemsize)} ({n_values:,} "
            f"{np.dtype(dtype).name} values), more than this machine's "
            f"{binary_size(available)} of memory."
        )


def binary_size(nbytes: int) -> str:
    """`nbytes` in binary units, e.g. "3.6 TiB"."""
    power = min(max(nbytes, 1).bit_length() - 1, 60) // 10  # 1024 ** power <= nbytes
    return f"{nbytes / 1024 ** power:,.1f} {('B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB')[power]}"


def _check_array_size(archive: zipfile.ZipFile, name: str, path: Path) -> None:
    """Refuse an array whose .npy header claims more bytes than the archive holds for it, or
    than this machine's memory (NumPy allocates what the header says before reading)."""
    info = archive.getinfo(f"{name}.npy")
    with archive.open(info) as f:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise FileFormatError(f"'{path}': array '{name}' has .npy format {version}, which "
                                  "partrain does not read.")
        shape, _, dtype = read_header(f)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > info.file_size:
        raise FileFormatError(
            f"'{path}' is truncated or corrupt: its array '{name}' claims shape {shape} "
            f"({binary_size(nbytes)}), but the file holds {binary_size(info.file_size)} of it."
        )
    try:
        check_fits_memory(f"'{path}': array '{name}' of shape {shape}", shape, dtype)
    except ValueError as exc:
        raise FileFormatError(str(exc)) from None


def read_npz(path: str | os.PathLike, kind: str | tuple[str, ...]
             ) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a file written by `write_npz`; return (meta, arrays). Never unpickles anything.

    `kind` is the kind expected, or a tuple of the kinds accepted (`meta["kind"]` tells which).
    """
    path = Path(path)
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    kind = " or ".join(kinds)
    if not path.is_file():
        raise FileNotFoundError(f"No such {kind} file: '{path}'.")
    try:
        with open(path, "rb") as f:  # (np.load would first allocate what its header says)
            single_array = f.read(6) == b"\x93NUMPY"
        data = None if single_array else np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise FileFormatError(f"'{path}' is a single .npy array, not a partrain {kind}.")
        with data:
            for name in data.files:
                _check_array_size(data.zip, name, path)
            arrays = {name: data[name] for name in data.files}
        meta = json.loads(str(arrays.pop("__meta__")))
    except FileFormatError:
        raise
    except KeyError:
        raise FileFormatError(
            f"'{path}' is an .npz file but not a partrain {kind} (no metadata)."
        ) from None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise FileFormatError(
            f"'{path}' is not a readable partrain {kind}: the file is truncated or corrupt "
            f"({type(exc).__name__}: {exc})."
        ) from None
    if not isinstance(meta, dict):
        raise FileFormatError(f"'{path}' has invalid partrain metadata (not a JSON object).")
    if meta.get("kind") not in kinds:
        raise FileFormatError(
            f"'{path}' holds a partrain {meta.get('kind', 'unknown')!s}, expected a {kind}."
        )
    if meta.get("version") != FORMAT_VERSION:
        raise FileFormatError(
            f"'{path}' has format version {meta.get('version')}, this partrain reads "
            f"version {FORMAT_VERSION}."
        )
    return meta, arrays
