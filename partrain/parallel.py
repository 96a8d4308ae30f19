"""Gradient engines: the summed gradient of a minibatch, computed in fixed chunks.

Every engine cuts a minibatch into chunks whose size never depends on the number of workers,
computes each chunk's summed loss and gradient with `model.loss_and_grad`, and adds the chunk
gradients up *in chunk order* on the master. Random draws are keyed by (step key, chunk index).
So the result is bit-for-bit the same whichever engine, and however many workers, computed it.

- `SerialEngine` (n_jobs=1): the chunks run in the master process, no pool, no dispatch cost.
- `LokyEngine` (n_jobs>1): a persistent loky process pool. The training set, the parameter
  vector, the batch indices and one gradient slot per chunk live in shared memory; per step only
  a few integers go to the workers and a few numbers come back.
- `DaskEngine` (see `partrain.dask_engine`): the same chunks on a Dask cluster.
"""

from __future__ import annotations

import importlib
import logging
import os
import secrets
import signal
import threading
import time
import traceback
import warnings
import weakref
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import NamedTuple

import numpy as np

from .layers import Context
from .model import Sequential

logger = logging.getLogger("partrain")

BLAS_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                 "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS", "BLIS_NUM_THREADS")
SHM_PREFIX = "partrain_"
MIN_CHUNK_FLOPS = 30e6  # below this a chunk's matmuls get too small to run efficiently


class WorkerError(RuntimeError):
    """A chunk's computation raised inside a worker; the message names the original error."""

    def __init__(self, message: str, remote_traceback: str = ""):
        super().__init__(message)
        self.remote_traceback = remote_traceback


class WorkerCrashError(RuntimeError):
    """Workers died (killed, out of memory) more often in a row than `max_restarts` allows."""


class ChunkTotals(NamedTuple):
    """What one minibatch gave besides its gradient: sums over its examples."""

    loss: float
    n_correct: int
    n_examples: int
    stats: np.ndarray | None  # batch-norm statistics to fold in (chunk-size weighted mean)


class StepTiming(NamedTuple):
    """Where the last step's time went, in seconds (for `partrain bench`)."""

    run: float  # dispatch until every chunk result is back (master's view)
    compute_max: float  # busiest task's compute time: the critical path of the workers
    compute_sum: float  # all tasks' compute time together
    reduce: float  # ordered reduction of chunk gradients and batch statistics


# ----------------------------------------------------------------------------- configuration


def resolve_n_jobs(n_jobs: int) -> int:
    """joblib's meaning: a positive count, or -1 for all cores, -2 for all but one, ..."""
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or n_jobs == 0:
        raise ValueError(f"`n_jobs` must be a non-zero integer (-1 = all cores), got {n_jobs!r}.")
    if n_jobs > 0:
        return int(n_jobs)
    from joblib import cpu_count

    return max(1, cpu_count() + 1 + int(n_jobs))


def plan_chunks(n_examples: int, chunk_size: int) -> list[tuple[int, int]]:
    """Positions [start, stop) of the fixed-size chunks of a batch; the last may be shorter."""
    return [(start, min(start + chunk_size, n_examples))
            for start in range(0, n_examples, chunk_size)]


def default_chunk_size(model: Sequential, batch_size: int) -> int:
    """Examples per task: a function of the model and batch size, NEVER of n_jobs.

    A batch is cut into up to 4 equal chunks (so 1, 2 and 4 workers share it evenly), but
    into fewer when a chunk would carry less than MIN_CHUNK_FLOPS of work: dispatching a task
    costs ~0.5 ms, and small matmuls run slowly (measured for the MLP: 8.9 us per example in
    chunks of 64, 16.9 in chunks of 16).
    """
    work = batch_size * max(model.flops_per_example(), 1)
    n_chunks = int(max(1, min(4, work // MIN_CHUNK_FLOPS, batch_size)))
    return -(-batch_size // n_chunks)


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


# ----------------------------------------------------------------------------- one chunk


def chunk_key(step_key: tuple[int, ...], chunk: int) -> Context:
    """The training context of one chunk: its random draws depend on (step key, chunk) only."""
    return Context(training=True, key=(*step_key, chunk))


def compute_chunk(model: Sequential, params: np.ndarray, X: np.ndarray, y: np.ndarray,
                  batch_idx: np.ndarray, chunk: int, bounds: tuple[int, int],
                  step_key: tuple[int, ...], grad_out: np.ndarray,
                  stats_out: np.ndarray | None) -> tuple[float, int]:
    """Loss and gradient sums of one chunk into `grad_out` (and its batch stats into `stats_out`).

    The single definition of a chunk's work, shared by every engine so that all of them do
    exactly the same arithmetic.
    """
    idx = batch_idx[bounds[0]:bounds[1]]
    result = model.loss_and_grad_unchecked(params, X[idx], y[idx], chunk_key(step_key, chunk),
                                           grad_out)
    if stats_out is not None and result.stats is not None:
        stats_out[...] = result.stats
    return result.loss, result.n_correct


def reduce_in_order(slots: np.ndarray, n: int, out: np.ndarray) -> np.ndarray:
    """out = ((slot0 + slot1) + slot2) + ...: a fixed order, so a fixed rounding."""
    out[...] = slots[0]
    for k in range(1, n):
        out += slots[k]
    return out


# ----------------------------------------------------------------------------- engines


class Engine:
    """Base of all engines: holds the chunk plan and reduces chunk results in order.

    Subclasses implement `_bind_data`, `_run(batch_idx, chunks, step_key)` (fill the gradient
    and stats slots; return one (loss, n_correct) pair per chunk and each task's compute
    seconds) and `close`.
    """

    def __init__(self, model: Sequential, chunk_size: int):
        self.model = model
        self.chunk_size = int(chunk_size)

    def bind(self, X: np.ndarray, y: np.ndarray) -> None:
        """Make (X, y), already validated and cast to the model's dtype, the training set.

        Called at every `fit`: the data may have changed in place since the last one.
        """
        self._bind_data(X, y)

    def gradient(self, batch_idx: np.ndarray, step_key: tuple[int, ...],
                 out: np.ndarray) -> ChunkTotals:
        """Write the SUMMED gradient of the examples `batch_idx` into `out`.

        Batch-norm statistics come back in the result for the caller to fold in once it has
        decided to apply the step (never after a non-finite loss).
        """
        chunks = plan_chunks(len(batch_idx), self.chunk_size)
        t0 = time.perf_counter()
        results, busy = self._run(batch_idx, chunks, step_key)
        t1 = time.perf_counter()
        reduce_in_order(self._grad_slots, len(chunks), out)
        stats = None
        if self.model.buffers.size:
            weights = np.array([stop - start for start, stop in chunks], dtype=out.dtype)
            stats = np.zeros_like(self.model.buffers)
            for k, w in enumerate(weights):
                stats += (w / weights.sum()) * self._stats_slots[k]
        self.last_timing = StepTiming(t1 - t0, max(busy), sum(busy), time.perf_counter() - t1)
        loss = 0.0
        for chunk_loss, _ in results:
            loss += chunk_loss
        return ChunkTotals(loss, sum(c for _, c in results), len(batch_idx), stats)

    def slots_needed(self, batch_size: int) -> int:
        return -(-batch_size // self.chunk_size)

    def close(self, kill: bool = False) -> None:
        """Release workers and shared memory (idempotent)."""


class SerialEngine(Engine):
    """All chunks in the master process: the n_jobs=1 path and the debugging mode."""

    def __init__(self, model: Sequential, chunk_size: int):
        super().__init__(model, chunk_size)
        keep_freed_memory()

    def _bind_data(self, X, y):
        self._X, self._y = X, y

    def _ensure_slots(self, n_chunks: int) -> None:
        slots = getattr(self, "_grad_slots", None)
        if slots is None or len(slots) < n_chunks or slots.shape[1] != self.model.n_params:
            dtype = self.model.dtype
            self._grad_slots = np.empty((n_chunks, self.model.n_params), dtype)
            self._stats_slots = np.empty((n_chunks, self.model.buffers.size), dtype)

    def _run(self, batch_idx, chunks, step_key):
        self._ensure_slots(len(chunks))
        has_stats = self.model.buffers.size > 0
        t0 = time.perf_counter()
        results = [compute_chunk(self.model, self.model.params, self._X, self._y, batch_idx, k,
                                 bounds, step_key, self._grad_slots[k],
                                 self._stats_slots[k] if has_stats else None)
                   for k, bounds in enumerate(chunks)]
        return results, [time.perf_counter() - t0]


# ----------------------------------------------------------------------------- shared memory


@dataclass(frozen=True)
class SharedSpec:
    """How a worker finds one shared array: segment name, shape, dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str


class SharedArray:
    """A NumPy array in a named POSIX shared-memory segment created (and unlinked) by the master."""

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


# ----------------------------------------------------------------------------- worker side


@dataclass(frozen=True)
class SessionSpec:
    """Everything a worker needs to serve one training session; sent (small) with each task."""

    token: str
    model_config: dict
    arrays: dict  # name -> SharedSpec: X, y, params, buffers, batch_idx, grad_slots, stats_slots
    imports: tuple[str, ...] = ()  # modules defining custom layers (see layers.register_layer)


def custom_layer_modules(model: Sequential) -> tuple[str, ...]:
    """Modules a worker must import to rebuild `model`: those of non-builtin layer classes."""
    return tuple(sorted({type(layer).__module__ for layer in model.layers} - {"partrain.layers"}))


class _WorkerSession:
    """A worker's attachment to one session: the rebuilt model and views of shared arrays."""

    def __init__(self, spec: SessionSpec):
        for module in spec.imports:
            importlib.import_module(module)
        self.token = spec.token
        self.model = Sequential.from_config(spec.model_config)
        self._segments, self.views = [], {}
        for name, array_spec in spec.arrays.items():
            shm, view = attach_shared(array_spec)
            self._segments.append(shm)
            self.views[name] = view
        self.model.buffers = self.views["buffers"]

    def close(self) -> None:
        self.views.clear()
        self.model = None
        for shm in self._segments:
            try:
                shm.close()
            except BufferError:
                pass


_SESSION: _WorkerSession | None = None


def _worker_init() -> None:
    """Workers leave Ctrl-C to the master, which stops them cleanly, reuse freed memory, and
    exit by themselves if the master dies without stopping them (e.g. SIGKILL)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keep_freed_memory()
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int, period: float = 1.0) -> None:
    """Poll the parent pid: once the master is gone this worker has been re-parented."""
    while os.getppid() == parent:
        time.sleep(period)
    os._exit(1)


def _run_chunks(spec: SessionSpec, step_key: tuple, chunk_ids: list[int],
                chunks: list[tuple[int, int]]) -> tuple[list[tuple[int, float, int]], float]:
    """Worker task: compute the given chunks into their gradient slots.

    Returns small things only: (chunk id, loss sum, n correct) per chunk and the busy seconds.
    """
    global _SESSION
    t0 = time.perf_counter()
    if _SESSION is None or _SESSION.token != spec.token:
        if _SESSION is not None:
            _SESSION.close()
        _SESSION = _WorkerSession(spec)
    v, model = _SESSION.views, _SESSION.model
    has_stats = model.buffers.size > 0
    out = []
    for k, bounds in zip(chunk_ids, chunks):
        loss, correct = compute_chunk(model, v["params"], v["X"], v["y"], v["batch_idx"], k,
                                      bounds, step_key, v["grad_slots"][k],
                                      v["stats_slots"][k] if has_stats else None)
        out.append((k, loss, correct))
    return out, time.perf_counter() - t0


# ----------------------------------------------------------------------------- the loky pool


def split_evenly(items: list, n_groups: int) -> list[list]:
    """Contiguous, balanced groups (sizes differ by at most one)."""
    n_groups = max(1, min(n_groups, len(items)))
    q, r = divmod(len(items), n_groups)
    bounds = np.cumsum([0] + [q + (g < r) for g in range(n_groups)])
    return [items[bounds[g]:bounds[g + 1]] for g in range(n_groups)]


class LokyEngine(Engine):
    """Chunks fanned out to a persistent loky process pool over shared memory.

    The pool starts lazily on the first step and is reused for every later step and epoch;
    it is rebuilt (and the step recomputed) when a worker dies, up to `max_restarts` times in
    a row. Workers run with `blas_threads` BLAS/OpenMP threads each (1 by default), set
    through the environment before NumPy loads in them.
    """

    def __init__(self, model: Sequential, chunk_size: int, n_jobs: int, batch_size: int,
                 blas_threads: int = 1, max_restarts: int = 3):
        super().__init__(model, chunk_size)
        self.n_jobs = n_jobs
        self.blas_threads = blas_threads
        self.max_restarts = max_restarts
        self._pool = None
        self._token = secrets.token_hex(8)
        self._session: SessionSpec | None = None
        self._shared: dict[str, SharedArray] = {}
        n_slots = self.slots_needed(batch_size)
        self._share_params()
        self._new_shared("batch_idx", (batch_size,), np.int64)
        self._grad_slots = self._new_shared("grad_slots", (n_slots, model.n_params), model.dtype)
        self._stats_slots = self._new_shared("stats_slots", (n_slots, model.buffers.size),
                                             model.dtype)

    # -- shared memory

    def _new_shared(self, name: str, shape, dtype) -> np.ndarray:
        if name in self._shared:
            self._shared.pop(name).release()
        self._shared[name] = SharedArray(shape, dtype, name)
        return self._shared[name].array

    def _share_params(self) -> None:
        """Move the model's params and buffers into shared memory; the model keeps using them."""
        for name in ("params", "buffers"):
            values = getattr(self.model, name)
            shared = self._new_shared(name, values.shape, values.dtype)
            shared[...] = values
            setattr(self.model, name, shared)

    def _bind_data(self, X, y):
        """Copy the data into shared memory, reusing the segments when the shapes still fit."""
        for name, values in (("X", X), ("y", y)):
            old = self._shared.get(name)
            if old is None or old.array.shape != values.shape or old.array.dtype != values.dtype:
                self._new_shared(name, values.shape, values.dtype)
                self._token = secrets.token_hex(8)  # workers re-attach on their next task
            self._shared[name].array[...] = values

    def _spec(self) -> SessionSpec:
        """The session description sent with each task; rebuilt only when the data change."""
        for name in ("params", "buffers"):  # the user may have replaced model.params
            if getattr(self.model, name) is not self._shared[name].array:
                self._shared[name].array[...] = getattr(self.model, name)
                setattr(self.model, name, self._shared[name].array)
        if self._session is None or self._session.token != self._token:
            self._session = SessionSpec(self._token, self.model.config(),
                                        {name: s.spec for name, s in self._shared.items()},
                                        custom_layer_modules(self.model))
        return self._session

    # -- the pool

    def _ensure_pool(self, reason: str = "first use") -> None:
        if self._pool is not None:
            return
        from joblib.externals.loky import ProcessPoolExecutor

        env = {var: str(self.blas_threads) for var in BLAS_ENV_VARS}
        self._pool = ProcessPoolExecutor(max_workers=self.n_jobs, env=env,
                                         initializer=_worker_init)
        logger.debug("started a pool of %d workers (%s)", self.n_jobs, reason)

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (empty before the first step)."""
        return list(getattr(self._pool, "_processes", {}) or {})

    def _run(self, batch_idx, chunks, step_key):
        spec = self._spec()
        self._shared["batch_idx"].array[:len(batch_idx)] = batch_idx
        groups = split_evenly(list(enumerate(chunks)), self.n_jobs)
        failures = 0
        while True:
            self._ensure_pool("rebuilt after a worker died" if failures else "first use")
            try:
                return self._dispatch(spec, step_key, groups)
            except _WorkerDied as died:
                failures += 1
                self._shutdown_pool(kill=True)
                if failures > self.max_restarts:
                    raise WorkerCrashError(
                        f"Workers died {failures} times in a row at step key {step_key} "
                        f"({died}). Possible causes: out of memory (try a smaller batch_size "
                        "or fewer n_jobs), a crash in a native library, or processes being "
                        "killed from outside."
                    ) from None
                warnings.warn(
                    f"A worker died ({died}); partrain restarted the pool and re-ran the step "
                    f"(attempt {failures + 1}). Results are unaffected.", RuntimeWarning,
                    stacklevel=2)

    def _dispatch(self, spec, step_key, groups) -> tuple[list[tuple[float, int]], list[float]]:
        from joblib.externals.loky.process_executor import BrokenProcessPool

        futures = []
        try:
            for group in groups:
                ids, bounds = [k for k, _ in group], [b for _, b in group]
                futures.append(self._pool.submit(_run_chunks, spec, step_key, ids, bounds))
            per_chunk, busy = {}, []
            for future in futures:
                results, seconds = future.result()
                busy.append(seconds)
                for k, loss, correct in results:
                    per_chunk[k] = (loss, correct)
        except BrokenProcessPool as exc:
            raise _WorkerDied(str(exc).split("\n")[0]) from None
        except Exception as exc:
            # No future.cancel() here: loky's kill-shutdown fails the pending futures itself,
            # and cancelling first makes that shutdown crash and leave workers behind.
            self._shutdown_pool(kill=True)
            raise _as_worker_error(exc, step_key) from None
        # KeyboardInterrupt / SystemExit propagate: the trainer shuts the pool down.
        return [per_chunk[k] for k in range(len(per_chunk))], busy

    def _shutdown_pool(self, kill: bool) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, kill_workers=kill)

    def close(self, kill: bool = False) -> None:
        """Stop the workers, copy params/buffers back to private memory, unlink all segments."""
        self._shutdown_pool(kill)
        for name in ("params", "buffers"):
            if name in self._shared and getattr(self.model, name) is self._shared[name].array:
                setattr(self.model, name, getattr(self.model, name).copy())
        for shared in self._shared.values():
            shared.release()
        self._shared.clear()


class _WorkerDied(Exception):
    """Internal: the pool broke because a worker process died."""


def _as_worker_error(exc: BaseException, step_key: tuple) -> WorkerError:
    cause = exc.__cause__
    remote = str(cause) if cause is not None else "".join(traceback.format_exception(exc))
    where = ""
    frames = [line.strip() for line in remote.splitlines() if line.strip().startswith("File ")]
    if frames:
        where = f" (at {frames[-1]})"
    return WorkerError(
        f"A worker failed at step key {step_key}: {type(exc).__name__}: {exc}{where}", remote)


# ----------------------------------------------------------------------------- backends


def _dask_engine(*args, **kwargs) -> Engine:
    from .dask_engine import DaskEngine  # imported only when asked for: dask is optional

    return DaskEngine(*args, **kwargs)


BACKENDS = {"loky": LokyEngine, "dask": _dask_engine}


def make_engine(backend: str, model: Sequential, chunk_size: int, n_jobs: int, batch_size: int,
                **options) -> Engine:
    """The engine for `backend`; loky with n_jobs=1 runs serially in the master (no pool)."""
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r}, expected one of {sorted(BACKENDS)}.")
    if backend == "loky" and n_jobs == 1:
        return SerialEngine(model, chunk_size)
    return BACKENDS[backend](model, chunk_size, n_jobs, batch_size, **options)
