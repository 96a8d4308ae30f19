"""Named POSIX shared memory: arrays the master creates and unlinks, workers attach to."""

from __future__ import annotations

import errno
import math
import mmap
import os
import secrets
import weakref
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

SHM_PREFIX = "partrain_"
SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory (a tmpfs)
PAGE = mmap.PAGESIZE
HEADROOM = 1 << 20  # kept free for the pool's semaphores (one page each) and other users


class SharedMemoryFullError(OSError):
    """/dev/shm has too little free space for the shared arrays of a run."""


def segment_bytes(shape: tuple[int, ...], dtype) -> int:
    """The bytes a segment for an array of `shape` and `dtype` takes in /dev/shm (whole pages)."""
    nbytes = max(int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize, 1)
    return -(-nbytes // PAGE) * PAGE


def shm_free_bytes() -> int | None:
    """Free bytes in /dev/shm for this user, or None where there is no such folder (macOS)."""
    try:
        info = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return info.f_bavail * info.f_frsize


def check_shm_space(need: int) -> None:
    """Raise `SharedMemoryFullError` unless /dev/shm has `need` bytes free (plus HEADROOM).

    Segments are created sparse: a shortage would otherwise surface later as SIGBUS, in
    whichever process first touches a page that tmpfs cannot provide.
    """
    free = shm_free_bytes()
    if free is not None and free < need + HEADROOM:
        raise SharedMemoryFullError(shortage_message(free, need))


def shortage_message(free: int, need: int) -> str:
    """The one line that says /dev/shm is too small, by how much, and what to do."""
    return (f"{SHM_DIR} has {_megabytes(free, math.floor)} free, and partrain's processes "
            f"need {_megabytes(need + HEADROOM, math.ceil)} more there to share the training "
            f"set and gradients: give {SHM_DIR} more room (e.g. docker run --shm-size=1g), "
            "train on a smaller dataset, or use the Dask backend (--backend dask) or one "
            "process (--n-jobs 1)")


def _megabytes(nbytes: int, rounding) -> str:
    return f"{rounding(nbytes / 2**20 * 10) / 10:,.1f} MiB"


@dataclass(frozen=True)
class SharedSpec:
    """How a worker finds one shared array: segment name, shape, dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str


class SharedArray:
    """A NumPy array in a named shared-memory segment created (and unlinked) by the master.

    Only engines hold these arrays: nothing the user can reach points into a segment, so
    unlinking it never leaves a dangling view behind.
    """

    def __init__(self, shape: tuple[int, ...], dtype, tag: str):
        dtype = np.dtype(dtype)
        nbytes = max(int(np.prod(shape)) * dtype.itemsize, 1)
        name = f"{SHM_PREFIX}{os.getpid()}_{secrets.token_hex(4)}_{tag}"
        self._shm = shared_memory.SharedMemory(name=name, create=True, size=nbytes)
        _reserve_pages(self._shm, nbytes)
        self.nbytes = segment_bytes(shape, dtype)  # what it takes in /dev/shm
        self.spec = SharedSpec(self._shm.name, tuple(shape), dtype.str)
        self.array = np.ndarray(shape, dtype=dtype, buffer=self._shm.buf)
        # Unlink even if the owner is never closed explicitly (garbage collection, exit).
        self._finalizer = weakref.finalize(self, _unlink_segment, self._shm)

    def release(self) -> None:
        """Unlink the segment; the memory goes once the last mapping is gone."""
        self.array = None
        self._finalizer()


def _reserve_pages(shm: shared_memory.SharedMemory, nbytes: int) -> None:
    """Allocate every page of a new segment now (posix_fallocate), so that /dev/shm running
    out is an error here, not a SIGBUS at the first write; unlink the segment if it fails."""
    fd = getattr(shm, "_fd", -1)
    if fd < 0 or not hasattr(os, "posix_fallocate"):
        return  # (not POSIX shared memory, or no fallocate: only `check_shm_space` guards)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return  # a file system that cannot reserve: only `check_shm_space` guards
        _unlink_segment(shm)
        if exc.errno not in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            raise
        raise SharedMemoryFullError(shortage_message(shm_free_bytes() or 0, nbytes)) from None
    except BaseException:
        _unlink_segment(shm)
        raise


def _unlink_segment(shm: shared_memory.SharedMemory) -> None:
    try:
        shm.close()
    except BufferError:  # a view of it is still alive somewhere: unlinking is what matters
        pass
    try:
        shm.unlink()
    except FileNotFoundError:
        pass


def attach_shared(spec: SharedSpec) -> tuple[object, np.ndarray]:
    """Map a master-owned segment in a worker; returns (handle with .close(), array view).

    The worker must not register the segment with a resource tracker: before Python 3.13,
    `SharedMemory(name)` does, and a tracker would then unlink (or double-unregister) the
    master's memory when the worker exits. So on POSIX we map it directly.
    """
    dtype = np.dtype(spec.dtype)
    try:
        handle = shared_memory.SharedMemory(name=spec.name, track=False)
        buffer = handle.buf
    except TypeError:  # Python < 3.13 has no `track`
        try:
            import _posixshmem
        except ImportError:  # Windows: no resource tracker involved
            handle = shared_memory.SharedMemory(name=spec.name)
            buffer = handle.buf
        else:
            fd = _posixshmem.shm_open("/" + spec.name, os.O_RDWR, mode=0o600)
            try:
                handle = mmap.mmap(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
            buffer = memoryview(handle)
    return handle, np.ndarray(spec.shape, dtype=dtype, buffer=buffer)
