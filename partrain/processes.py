"""What every process that computes chunks needs, whichever engine started it: how many
cores it may use, one BLAS thread per process, and freed memory kept for the next step."""

from __future__ import annotations

import contextlib
import os

BLAS_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                 "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS", "BLIS_NUM_THREADS")


def usable_cores() -> int:
    """The cores this process may use: the machine's, limited by its CPU affinity and by a
    container's CPU quota (cgroups), as joblib counts them. The one count partrain uses for
    n_jobs=-1, the process plan, the spin/nap choice and reports."""
    from joblib import cpu_count

    return max(1, cpu_count())


@contextlib.contextmanager
def children_blas_threads(threads: int = 1):
    """Within the block, processes started from this one (spawned: they read the environment
    before NumPy loads) get `threads` BLAS/OpenMP threads; the environment is restored after."""
    saved = {var: os.environ.get(var) for var in BLAS_ENV_VARS}
    os.environ.update({var: str(threads) for var in BLAS_ENV_VARS})
    try:
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks of up to 32 MiB instead of unmapping them.

    A training step allocates and frees the same large temporaries (im2col matrices,
    activations) every time; with glibc's default thresholds each of them is a fresh mmap whose
    pages fault in again, which cost 40-50% of a step here (~1,200 page faults per signs_cnn
    chunk). Called in every process that computes chunks. Returns False where it does not
    apply (not glibc).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 256 << 20))
