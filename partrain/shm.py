"""Named POSIX shared memory: arrays the master creates and unlinks, workers attach to."""

from __future__ import annotations

import os
import secrets
import weakref
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

SHM_PREFIX = "partrain_"


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
        self.spec = SharedSpec(self._shm.name, tuple(shape), dtype.str)
        self.array = np.ndarray(shape, dtype=dtype, buffer=self._shm.buf)
        # Unlink even if the owner is never closed explicitly (garbage collection, exit).
        self._finalizer = weakref.finalize(self, _unlink_segment, self._shm)

    def release(self) -> None:
        """Unlink the segment; the memory goes once the last mapping is gone."""
        self.array = None
        self._finalizer()


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
        import mmap

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
