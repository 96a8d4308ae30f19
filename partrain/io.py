"""Safe files: one `.npz` of arrays plus JSON metadata, written atomically, read without pickle."""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1


class FileFormatError(ValueError):
    """A file exists but is not a valid partrain file of the expected kind."""


def _write_atomically(path: Path, write) -> Path:
    """Call `write(binary_file)` on a temporary file in `path`'s folder, then rename it over
    `path`, so that a crash mid-write leaves the previous file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_npz(path: str | os.PathLike, kind: str, meta: dict, arrays: dict) -> Path:
    """Write `arrays` and the JSON-ready `meta` to `path`, atomically.

    The data go to a temporary file in the same folder which is then renamed over `path`, so
    a crash mid-write leaves the previous file intact.
    """
    header = {"kind": kind, "version": FORMAT_VERSION, **meta}
    payload = {"__meta__": np.array(json.dumps(header)), **arrays}
    return _write_atomically(Path(path), lambda f: np.savez(f, **payload))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically, like `write_npz`."""
    return _write_atomically(Path(path), lambda f: f.write(text.encode()))


def output_problem(path: str | os.PathLike, folder: bool = False) -> str | None:
    """Why `path` cannot be written as a file (or, with `folder`, used as a folder for files),
    or None when it can. Nothing is created: missing folders only have to be creatable.

    Checked: the target is not a directory (a file target) or not a file (a folder target);
    the nearest existing folder on its way is a folder; that folder is writable (a temporary
    file is created and removed in an existing target folder, which also catches read-only
    mounts; for a folder yet to be created, its existing ancestor is checked with access(2)).
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        return "it exists and is not a folder"
    if not folder and path.is_dir():
        return "it is a folder, not a file name"
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
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise FileFormatError(f"'{path}' is a single .npy array, not a partrain {kind}.")
        with data:
            arrays = {name: data[name] for name in data.files}
        meta = json.loads(str(arrays.pop("__meta__")))
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
