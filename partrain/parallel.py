"""Gradient engines: the summed gradient of a minibatch, computed in fixed chunks.

Every engine cuts a minibatch into chunks whose size never depends on the number of workers,
computes each chunk's summed loss and gradient with `model.loss_and_grad`, and adds the chunk
gradients up *in chunk order* on the master. Random draws are keyed by (step key, chunk index).
So the result is bit-for-bit the same whichever engine, and however many workers, computed it.

- `SerialEngine` (n_jobs=1): the chunks run in the master process, no pool, no dispatch cost.
- `LokyEngine` (n_jobs>1): the master plus a persistent loky pool of n_jobs - 1 workers. The
  training set, the parameter vector, the batch indices, one gradient slot per chunk and a
  control block live in shared memory; a step is published by writing a few integers there.
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
MIN_CHUNK_EXAMPLES = 16  # mnist_cnn: 8-example chunks ran 15-35% slower per example than 16


class WorkerError(RuntimeError):
    """A chunk's computation raised (in a worker, or in the master's share of a parallel step);
    the message names the original error."""

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
    into fewer when a chunk would carry less than MIN_CHUNK_FLOPS of work or fewer than
    MIN_CHUNK_EXAMPLES examples: small matmuls run slowly (measured for the MLP: 8 us per
    example in chunks of 64, 19 in chunks of 16, 56 in chunks of 8).
    """
    work = batch_size * max(model.flops_per_example(), 1)
    n_chunks = int(max(1, min(4, work // MIN_CHUNK_FLOPS, batch_size // MIN_CHUNK_EXAMPLES)))
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
            loss += float(chunk_loss)  # in float64 whatever the engine returned
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
    """Everything a worker needs to serve one training session; sent once per worker."""

    token: str
    model_config: dict
    arrays: dict  # name -> SharedSpec: X, y, params, buffers, batch_idx, slots, control, ...
    chunk_size: int
    n_jobs: int
    spin_seconds: float  # how long a worker polls without sleeping after its last step
    imports: tuple[str, ...] = ()  # modules defining custom layers (see layers.register_layer)


def custom_layer_modules(model: Sequential) -> tuple[str, ...]:
    """Modules a worker must import to rebuild `model`: those of non-builtin layer classes."""
    return tuple(sorted({type(layer).__module__ for layer in model.layers} - {"partrain.layers"}))


# The control block: one int64 shared array through which the master publishes steps.
SEQ, COMMAND, BATCH_LEN, KEY_LEN = 0, 1, 2, 3  # SEQ: number of the last published step
KEY, MAX_KEY_LEN = 4, 12  # control[KEY:KEY + KEY_LEN]: the step key
DONE = KEY + MAX_KEY_LEN  # control[DONE + rank]: the last step worker `rank` finished
RUN, STOP = 0, 1  # commands
SPIN_SECONDS = 0.01  # a worker polls without sleeping this long after a step (see _spin_seconds)
MAX_NAP_SECONDS = 0.005  # then naps up to this long between polls
_FENCE = threading.Lock()


def _fence() -> None:
    """A memory barrier (lock operations imply one): data written before it is visible to
    other processes before anything written after it, on every CPU architecture."""
    with _FENCE:
        pass


def _wait_for_step(control: np.ndarray, done: int, spin_seconds: float) -> int:
    """Poll the control block until a step after `done` is published; return its number.

    Polling instead of blocking keeps the core awake between steps: measured here, a worker
    that slept ~1-3 ms between steps computed its next chunks 12-20% slower.
    """
    t_idle = time.perf_counter()
    while control[SEQ] == done:
        idle = time.perf_counter() - t_idle
        if idle > spin_seconds:
            time.sleep(min(MAX_NAP_SECONDS, idle / 100))
    _fence()
    return int(control[SEQ])


def step_groups(n_examples: int, chunk_size: int, n_jobs: int) -> list[list]:
    """The (chunk id, bounds) groups of one step: group r is computed by rank r (0: master)."""
    return split_evenly(list(enumerate(plan_chunks(n_examples, chunk_size))), n_jobs)


def compute_group(model: Sequential, views: dict, group: list, step_key: tuple) -> None:
    """Compute a group of chunks into their gradient/stats slots and chunk_results rows."""
    has_stats = model.buffers.size > 0
    for k, bounds in group:
        views["chunk_results"][k] = compute_chunk(
            model, views["params"], views["X"], views["y"], views["batch_idx"], k, bounds,
            step_key, views["grad_slots"][k], views["stats_slots"][k] if has_stats else None)


def _serve(spec: SessionSpec, rank: int) -> None:
    """Worker task for a whole session: compute this rank's chunks of every published step.

    Runs until the master publishes the STOP command; an exception ends it, and the master
    sees it through this task's future.
    """
    for module in spec.imports:
        importlib.import_module(module)
    model = Sequential.from_config(spec.model_config)
    segments, views = [], {}
    for name, array_spec in spec.arrays.items():
        segment, views[name] = attach_shared(array_spec)
        segments.append(segment)
    model.buffers = views["buffers"]
    control = views["control"]
    done = int(control[DONE + rank])
    try:
        while True:
            done = _wait_for_step(control, done, spec.spin_seconds)
            if control[COMMAND] == STOP:
                return
            t0 = time.perf_counter()
            step_key = tuple(int(k) for k in control[KEY:KEY + control[KEY_LEN]])
            groups = step_groups(int(control[BATCH_LEN]), spec.chunk_size, spec.n_jobs)
            if rank < len(groups):
                compute_group(model, views, groups[rank], step_key)
            views["busy"][rank] = time.perf_counter() - t0
            _fence()
            control[DONE + rank] = done
    finally:
        views.clear()
        model = control = None  # drop every view before unmapping
        for segment in segments:
            try:
                segment.close()
            except BufferError:
                pass


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


# ----------------------------------------------------------------------------- the loky pool


def split_evenly(items: list, n_groups: int) -> list[list]:
    """Contiguous, balanced groups (sizes differ by at most one)."""
    n_groups = max(1, min(n_groups, len(items)))
    q, r = divmod(len(items), n_groups)
    bounds = np.cumsum([0] + [q + (g < r) for g in range(n_groups)])
    return [items[bounds[g]:bounds[g + 1]] for g in range(n_groups)]


_SERVING_ENGINES: weakref.WeakSet = weakref.WeakSet()  # engines whose workers serve a session


def _stop_serving_at_exit() -> None:
    """At interpreter exit, end the workers' `_serve` tasks: loky's own exit handler, which
    runs after this one, waits for running tasks, and a `_serve` task only ends when told."""
    for engine in list(_SERVING_ENGINES):
        if engine._serving:
            engine._publish(COMMAND, STOP)


class LokyEngine(Engine):
    """Chunks fanned out to a persistent loky process pool over shared memory.

    `n_jobs` processes compute: the master and n_jobs - 1 loky workers. Each step's chunks
    are split into n_jobs contiguous groups; worker r computes group r while the master
    computes group 0. Every worker runs ONE long task per session (`_serve`) that polls a
    shared control block for the next step, so a step costs no pickling, no pipe and no
    thread hand-off: the master writes the batch indices and step key into shared memory,
    bumps a counter, computes its own group and waits for the workers' "done" counters.
    Measured on mnist_cnn (batch 32, 2 cores): 4,600-5,500 examples/s against 3,400-3,700 when
    each step was submitted as loky tasks.

    The pool starts lazily on the first step and is reused for every later step and epoch;
    it is rebuilt (and the step recomputed) when a worker dies, up to `max_restarts` times in
    a row. Workers run with `blas_threads` BLAS/OpenMP threads each (1 by default), set
    through the environment before NumPy loads in them; the trainer limits the master alike.
    """

    def __init__(self, model: Sequential, chunk_size: int, n_jobs: int, batch_size: int,
                 blas_threads: int = 1, max_restarts: int = 3):
        super().__init__(model, chunk_size)
        if n_jobs < 2:
            raise ValueError(f"LokyEngine needs n_jobs >= 2 (1 is SerialEngine), got {n_jobs}.")
        self.n_jobs = n_jobs
        self.blas_threads = blas_threads
        self.max_restarts = max_restarts
        keep_freed_memory()  # the master computes chunks too
        self._pool = None
        self._serving: list = []  # the futures of the workers' `_serve` tasks
        self._token = secrets.token_hex(8)
        self._session: SessionSpec | None = None
        self._shared: dict[str, SharedArray] = {}
        n_slots = self.slots_needed(batch_size)
        self._share_params()
        self._new_shared("batch_idx", (batch_size,), np.int64)
        self._grad_slots = self._new_shared("grad_slots", (n_slots, model.n_params), model.dtype)
        self._stats_slots = self._new_shared("stats_slots", (n_slots, model.buffers.size),
                                             model.dtype)
        self._new_shared("chunk_results", (n_slots, 2), np.float64)  # loss sum, n correct
        self._new_shared("busy", (n_jobs,), np.float64)  # compute seconds per rank, last step
        self._control = self._new_shared("control", (DONE + n_jobs,), np.int64)
        self._control[...] = 0

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
                self._stop_serving()  # the workers' views of the old segments must go
                self._new_shared(name, values.shape, values.dtype)
                self._token = secrets.token_hex(8)
            self._shared[name].array[...] = values

    def _spec(self) -> SessionSpec:
        """The session description given to each worker; rebuilt only when the data change."""
        for name in ("params", "buffers"):  # the user may have replaced model.params
            if getattr(self.model, name) is not self._shared[name].array:
                self._shared[name].array[...] = getattr(self.model, name)
                setattr(self.model, name, self._shared[name].array)
        if self._session is None or self._session.token != self._token:
            self._session = SessionSpec(self._token, self.model.config(),
                                        {name: s.spec for name, s in self._shared.items()},
                                        self.chunk_size, self.n_jobs, self._spin_seconds(),
                                        custom_layer_modules(self.model))
        return self._session

    def _spin_seconds(self) -> float:
        """SPIN_SECONDS, unless there are more processes than cores: a polling worker would
        then take the CPU from one that computes."""
        return SPIN_SECONDS if self.n_jobs <= (os.cpu_count() or 1) else 0.0

    # -- the pool

    def _ensure_serving(self, reason: str) -> None:
        """Start the pool and one `_serve` task per worker, if not running."""
        if self._pool is None:
            from joblib.externals.loky import ProcessPoolExecutor

            env = {var: str(self.blas_threads) for var in BLAS_ENV_VARS}
            self._pool = ProcessPoolExecutor(max_workers=self.n_jobs - 1, env=env,
                                             initializer=_worker_init)
            logger.debug("started a pool of %d workers (%s)", self.n_jobs - 1, reason)
        if not self._serving:
            spec = self._spec()
            self._control[COMMAND] = RUN
            self._control[DONE:] = self._control[SEQ]
            _fence()
            self._serving = [self._pool.submit(_serve, spec, rank)
                             for rank in range(1, self.n_jobs)]
            # loky registers its exit handler at a pool's first submit; ours comes after it,
            # so it runs before it (threading's exit handlers run last-in, first-out).
            if not _SERVING_ENGINES:
                threading._register_atexit(_stop_serving_at_exit)
            _SERVING_ENGINES.add(self)

    def _stop_serving(self) -> None:
        """End the workers' `_serve` tasks (the processes stay) and wait for them."""
        if self._serving:
            self._publish(COMMAND, STOP)
            for future in self._serving:
                try:
                    future.result()
                except Exception:  # a task that failed has ended too, which is all we want
                    pass
            self._serving = []

    def _publish(self, *settings) -> int:
        """Write (index, value) pairs of the control block, then make them a new step."""
        control = self._control
        for index, value in zip(settings[::2], settings[1::2]):
            control[index] = value
        _fence()
        control[SEQ] += 1
        return int(control[SEQ])

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (empty before the first step)."""
        return list(getattr(self._pool, "_processes", {}) or {})

    def _run(self, batch_idx, chunks, step_key):
        if len(step_key) > MAX_KEY_LEN:
            raise ValueError(f"A step key has at most {MAX_KEY_LEN} integers, got {step_key}.")
        self._spec()
        self._shared["batch_idx"].array[:len(batch_idx)] = batch_idx
        failures = 0
        while True:
            self._ensure_serving("rebuilt after a worker died" if failures else "first use")
            try:
                return self._step(len(batch_idx), step_key)
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

    def _step(self, n_examples: int, step_key: tuple) -> tuple[list, list[float]]:
        """Publish one step, compute the master's group, wait for the workers' groups.

        A step of one chunk is not published: the master computes it alone.
        """
        control, views = self._control, {n: s.array for n, s in self._shared.items()}
        groups = step_groups(n_examples, self.chunk_size, self.n_jobs)
        seq = None
        if len(groups) > 1:
            seq = self._publish(BATCH_LEN, n_examples, KEY_LEN, len(step_key),
                                *[x for i, k in enumerate(step_key) for x in (KEY + i, k)])
        t0 = time.perf_counter()
        try:
            compute_group(self.model, views, groups[0], step_key)
            views["busy"][0] = time.perf_counter() - t0
            while seq and not (control[DONE + 1:] == seq).all():  # results are due within a chunk
                for future in self._serving:
                    if future.done():
                        future.result()  # raises the worker's exception
                        raise RuntimeError("a worker stopped serving during a step")
            _fence()
        except Exception as exc:
            from joblib.externals.loky.process_executor import BrokenProcessPool

            if isinstance(exc, BrokenProcessPool):
                raise _WorkerDied(str(exc).split("\n")[0]) from None
            self._shutdown_pool(kill=True)
            raise _as_worker_error(exc, step_key) from None
        # KeyboardInterrupt / SystemExit propagate: the trainer shuts the pool down.
        n_chunks = -(-n_examples // self.chunk_size)
        results = [(loss, int(correct)) for loss, correct in views["chunk_results"][:n_chunks]]
        return results, list(views["busy"][:min(self.n_jobs, n_chunks)])

    def _shutdown_pool(self, kill: bool) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            if not kill:
                self._stop_serving()
            pool.shutdown(wait=True, kill_workers=kill)
        self._serving = []
        _SERVING_ENGINES.discard(self)

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
        f"Computing a chunk failed at step key {step_key}: {type(exc).__name__}: {exc}{where}",
        remote)


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
