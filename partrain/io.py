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


def write_npz(path: str | os.PathLike, kind: str, meta: dict, arrays: dict) -> Path:
    """Write `arrays` and the JSON-ready `meta` to `path`, atomically.

    The data go to a temporary file in the same folder which is then renamed over `path`, so
    a crash mid-write leaves the previous file intact.
    """
    path = Path(path)
    header = {"kind": kind, "version": FORMAT_VERSION, **meta}
    payload = {"__meta__": np.array(json.dumps(header)), **arrays}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_npz(path: str | os.PathLike, kind: str) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a file written by `write_npz`; return (meta, arrays). Never unpickles anything."""
    path = Path(path)
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
    if meta.get("kind") != kind:
        raise FileFormatError(
            f"'{path}' holds a partrain {meta.get('kind', 'unknown')!s}, expected a {kind}."
        )
    if meta.get("version") != FORMAT_VERSION:
        raise FileFormatError(
            f"'{path}' has format version {meta.get('version')}, this partrain reads "
            f"version {FORMAT_VERSION}."
        )
    return meta, arrays
