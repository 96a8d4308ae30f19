"""The chunk logic every engine shares, and the serial engine.

Every engine cuts a minibatch into chunks whose size never depends on the number of workers,
computes each chunk's summed loss and gradient with `compute_chunk`, and adds the chunk
gradients up along a pairwise tree fixed by the chunk indices (`reduce_tree`): whoever makes
an addition, its operands are the same. Random draws are keyed by (step key, chunk index).
So the result is bit-for-bit the same whichever engine, and however many processes,
computed it.
"""

from __future__ import annotations

import functools
import importlib.util
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from .layers import Context
from .model import Sequential

MIN_CHUNK_FLOPS = 30e6  # below this a chunk's matmuls get too small to run efficiently
MIN_CHUNK_EXAMPLES = 16  # mnist_cnn: 8-example chunks ran 15-35% slower per example than 16
# The smallest chunk whose per-example cost stays within 5 % of the cheapest chunk size, per
# zoo network (float32, one BLAS thread, native kernels): `python scripts/chunk_efficiency.py`,
# output in scripts/bench/chunk_efficiency.txt (signs-cnn and mnist-cnn from a 25-round rerun).
# signs-cnn: 16, not the 8 that one process alone allows (8 and 16 within 1 % there): full steps
# of 2 processes ran 11-16 % slower with chunks of 8 than of 16 (`partrain bench --chunk-plan
# auto,max4`, interleaved, 2026-11-29), and so did the ceiling of 2 independent processes.
MEASURED_CHUNKS = {"mnist-cnn": 16, "signs-cnn": 16, "mlp": 128, "digits-cnn": 64}


class WorkerCrashError(RuntimeError):
    """Worker processes died (killed, out of memory) more often in a row than `max_restarts`
    allows, or the cluster holding them went away. Exceptions raised by a chunk's own
    computation are never turned into this: they reach the caller as themselves."""


class ChunkTotals(NamedTuple):
    """What one minibatch gave besides its gradient: sums over its examples."""

    loss: float
    n_correct: int
    n_examples: int
    stats: np.ndarray | None  # batch-norm statistics to fold in (chunk-size weighted mean)


class StepTiming(NamedTuple):
    """Where the last step's time went, in seconds (for `partrain bench`)."""

    run: float  # dispatch until every chunk result is back (master's view)
    compute_max: float  # busiest process's compute time: the critical path
    compute_sum: float  # all processes' compute time together
    reduce: float  # ordered reduction of chunk gradients and batch statistics
    processes: int = 1  # processes that computed chunks in the step (len of `_run`'s list)


# ----------------------------------------------------------------------------- the plan


def plan_chunks(n_examples: int, chunk_size: int) -> list[tuple[int, int]]:
    """Positions [start, stop) of the fixed-size chunks of a batch; the last may be shorter."""
    return [(start, min(start + chunk_size, n_examples))
            for start in range(0, n_examples, chunk_size)]


def chunks_per_step(batch_size: int, chunk_size: int) -> int:
    """How many chunks a full batch is cut into: the most processes a step can keep busy."""
    return -(-batch_size // chunk_size)


def _architecture(model: Sequential) -> tuple:
    """What decides a model's speed per example: input shape and layers (not seed, dtype)."""
    config = model.config()
    return tuple(config["input_shape"]), repr(config["layers"])


@functools.cache
def _measured_chunks() -> dict[tuple, int]:
    """MEASURED_CHUNKS keyed by the architecture of each zoo network."""
    from . import zoo

    return {_architecture(zoo.get(name)): size for name, size in MEASURED_CHUNKS.items()}


def efficient_chunk(model: Sequential) -> int:
    """The smallest chunk that runs (nearly) as fast per example as any larger one.

    Measured for the zoo networks (MEASURED_CHUNKS); for other models, modelled from the
    FLOPs: at least MIN_CHUNK_FLOPS of work and MIN_CHUNK_EXAMPLES examples per chunk.
    """
    size = _measured_chunks().get(_architecture(model))
    if size is not None:
        return size
    return max(MIN_CHUNK_EXAMPLES, -(-int(MIN_CHUNK_FLOPS) // max(model.flops_per_example(), 1)))


def default_chunk_size(model: Sequential, batch_size: int) -> int:
    """Examples per chunk: a function of the model and batch size, NEVER of n_jobs.

    The batch is cut into as many equal chunks as it holds efficient ones, so a larger batch
    gives more chunks, hence work for more processes (mnist_cnn: 2 chunks at batch 32, 16 at
    256), while no chunk gets so small that its matmuls slow down.
    """
    n_chunks = max(1, batch_size // efficient_chunk(model))
    return -(-batch_size // n_chunks)


def split_evenly(items: list, n_groups: int) -> list[list]:
    """Contiguous, balanced groups (sizes differ by at most one)."""
    n_groups = max(1, min(n_groups, len(items)))
    q, r = divmod(len(items), n_groups)
    bounds = np.cumsum([0] + [q + (g < r) for g in range(n_groups)])
    return [items[bounds[g]:bounds[g + 1]] for g in range(n_groups)]


@functools.lru_cache(maxsize=256)
def step_groups(n_examples: int, chunk_size: int, n_groups: int) -> tuple[tuple, ...]:
    """The (chunk id, bounds) groups of one step, one per computing process, in chunk order.

    Cached (read-only tuples): the master and every worker ask for it at every step, and
    building it took ~50 us of Python per process per step."""
    return tuple(tuple(group) for group in
                 split_evenly(list(enumerate(plan_chunks(n_examples, chunk_size))), n_groups))


def chunk_range(group: list) -> tuple[int, int]:
    """The chunk indices [first, last + 1) of a group from `step_groups`."""
    return group[0][0], group[-1][0] + 1


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


def worker_imports(model: Sequential) -> tuple[str, ...]:
    """Modules a worker process imports to rebuild `model`: those of its custom layers.

    Raises ValueError, before any worker starts, for a layer class that another process
    cannot import by name (defined in a script's `__main__`, inside a function, or in a
    module that cannot be found).
    """
    modules = set()
    for layer in model.layers:
        cls = type(layer)
        if cls.__module__ == "partrain.layers":
            continue
        if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__ \
                or importlib.util.find_spec(cls.__module__) is None:
            where = ("the script being run (__main__)" if cls.__module__ == "__main__"
                     else f"{cls.__module__}.{cls.__qualname__}")
            raise ValueError(
                f"Layer class {cls.__name__} is defined in {where}, which worker processes "
                "cannot import. Move the class into a module of its own (e.g. my_layers.py "
                "beside your script), decorate it with @partrain.layers.register_layer and "
                "import it from there; or train with n_jobs=1."
            )
        modules.add(cls.__module__)
    return tuple(sorted(modules))


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


def compute_group(model: Sequential, params: np.ndarray, X: np.ndarray, y: np.ndarray,
                  batch_idx: np.ndarray, group: list, step_key: tuple[int, ...],
                  grad_slots: np.ndarray, stats_slots: np.ndarray,
                  results: np.ndarray) -> None:
    """Compute a group of (chunk id, bounds) into their gradient and stats slots and their
    (loss, n_correct) rows of `results`."""
    has_stats = model.buffers.size > 0
    for k, bounds in group:
        results[k] = compute_chunk(model, params, X, y, batch_idx, k, bounds, step_key,
                                   grad_slots[k], stats_slots[k] if has_stats else None)


@functools.cache
def tree_pairs(n_chunks: int) -> tuple[tuple[int, int, int], ...]:
    """The additions of the fixed pairwise tree over chunk indices, bottom-up.

    Node (width w, first chunk a) covers chunks [a, min(a + w, n)); it is its left child plus
    its right child (first chunk a + w/2), and its value is kept in slot a. Each entry
    (left, right, stop) means slot[left] += slot[right], covering chunks [left, stop). The
    tree depends on n_chunks only, so the rounding of the sum is fixed whoever adds what.
    """
    pairs, width = [], 1
    while width < n_chunks:
        for left in range(0, n_chunks, 2 * width):
            if left + width < n_chunks:
                pairs.append((left, left + width, min(left + 2 * width, n_chunks)))
        width *= 2
    return tuple(pairs)  # cached: computed once per chunk count, not at every step


def reduce_tree(slots: np.ndarray, n_chunks: int, inside: tuple[int, int] | None = None,
                done: list[tuple[int, int]] = (), offset: int = 0) -> None:
    """Add up slots[:n_chunks] along `tree_pairs` in place; the total ends in slots[0].

    `inside=(a, b)`: only the additions whose chunks all lie in [a, b) (what the process that
    computed those chunks can do on its own); their partial sums end in the slots
    `tree_roots(n_chunks, (a, b))` names. `done`: ranges whose inside additions were made
    already (by their processes); the rest are made here. `offset`: slots[i] holds chunk
    offset + i, so a process can reduce an array of its own chunks only (`offset=a`, with
    `inside=(a, b)`).
    """
    for left, right, stop in tree_pairs(n_chunks):
        if inside is not None:
            if inside[0] <= left and stop <= inside[1]:
                slots[left - offset] += slots[right - offset]
        elif not any(a <= left and stop <= b for a, b in done):
            slots[left - offset] += slots[right - offset]


@functools.cache
def tree_roots(n_chunks: int, inside: tuple[int, int]) -> tuple[int, ...]:
    """The chunk slots in [a, b) = `inside` that still hold partial sums the rest of the tree
    needs once `reduce_tree(..., inside=inside)` has made the additions within [a, b).

    They are the slots of [a, b) that no inside addition consumed (as its right operand), in
    increasing order; `a` is always one. A process that reduced its range sends only these
    to whoever finishes the sum (with `done` naming its range). A range that is one node of
    the tree (a power-of-two width w, `a` a multiple of w, b = min(a + w, n_chunks)) has the
    single root `a`: e.g. [0, 4) or [4, 7) of 7 chunks.
    """
    a, b = inside
    if not 0 <= a < b <= n_chunks:
        raise ValueError(f"A range of chunks within [0, {n_chunks}) is needed, got [{a}, {b}).")
    consumed = {right for left, right, stop in tree_pairs(n_chunks) if a <= left and stop <= b}
    return tuple(k for k in range(a, b) if k not in consumed)


# ----------------------------------------------------------------------------- engines


def _no_interrupt() -> None:
    """The default interrupt check: nothing ever asks to stop."""


class Engine:
    """Base of all engines: the chunk plan, the slots, and the ordered reduction.

    Subclasses implement `_bind_data(X, y)`, `_run(batch_idx, chunks, step_key)` (fill the
    first len(chunks) gradient/stats slots and result rows; return each process's compute
    seconds) and `close`. `check_interrupt` is called while an engine waits for other
    processes: it raises to abandon the step (the trainer passes its signal check).
    """

    n_processes = 1  # processes that compute a full step's chunks

    def __init__(self, model: Sequential, chunk_size: int,
                 check_interrupt: Callable[[], None] | None = None):
        self.model = model
        self.chunk_size = int(chunk_size)
        self.check_interrupt = check_interrupt or _no_interrupt
        self.last_timing: StepTiming | None = None
        self._reduced_ranges: list[tuple[int, int]] = []  # groups whose additions _run made

    def bind(self, X: np.ndarray, y: np.ndarray) -> None:
        """Make (X, y), already validated and cast to the model's dtype, the training set.

        Called at every `fit`: the data may have changed in place since the last one.
        """
        self._bind_data(X, y)

    def gradient(self, batch_idx: np.ndarray, step_key: tuple[int, ...],
                 out: np.ndarray, scale: float = 1.0) -> ChunkTotals:
        """Write the SUMMED gradient of the examples `batch_idx`, times `scale`, into `out`.

        `scale` (e.g. 1 / batch size for a mean) is applied while copying the sum out, the
        one multiplication a caller would make afterwards, saving it a pass over the vector.

        Batch-norm statistics come back in the result for the caller to fold in once it has
        decided to apply the step (never after a non-finite loss). An exception raised while
        computing a chunk propagates as itself, whichever process raised it.
        """
        chunks = plan_chunks(len(batch_idx), self.chunk_size)
        if not 0 < len(chunks) <= len(self._grad_slots):
            raise ValueError(f"A step takes 1 to {len(self._grad_slots) * self.chunk_size} "
                             f"examples (the batch size), got {len(batch_idx)}.")
        t0 = time.perf_counter()
        busy = self._run(batch_idx, chunks, step_key)
        t1 = time.perf_counter()
        reduce_tree(self._grad_slots, len(chunks), done=self._reduced_ranges)
        np.multiply(self._grad_slots[0], out.dtype.type(scale), out=out)  # exact for 1.0
        stats = None
        if self.model.buffers.size:
            weights = np.array([stop - start for start, stop in chunks], dtype=out.dtype)
            stats = np.zeros_like(self.model.buffers)
            for k, w in enumerate(weights):
                stats += (w / weights.sum()) * self._stats_slots[k]
        results = self._chunk_results[:len(chunks)]
        self.last_timing = StepTiming(t1 - t0, max(busy), sum(busy), time.perf_counter() - t1,
                                      len(busy))
        loss = 0.0
        for chunk_loss in results[:, 0]:
            loss += float(chunk_loss)  # in chunk order, in float64
        return ChunkTotals(loss, int(results[:, 1].sum()), len(batch_idx), stats)

    def worker_pids(self) -> list[int]:
        """Process ids of the worker processes computing chunks now (none for this engine)."""
        return []

    def close(self, kill: bool = False) -> None:
        """Release workers and shared memory (idempotent)."""


class SerialEngine(Engine):
    """All chunks in the master process: the n_jobs=1 path and the debugging mode."""

    def __init__(self, model: Sequential, chunk_size: int, batch_size: int,
                 check_interrupt: Callable[[], None] | None = None):
        super().__init__(model, chunk_size, check_interrupt)
        keep_freed_memory()
        n_slots = chunks_per_step(batch_size, chunk_size)
        self._grad_slots = np.empty((n_slots, model.n_params), model.dtype)
        self._stats_slots = np.empty((n_slots, model.buffers.size), model.dtype)
        self._chunk_results = np.empty((n_slots, 2), np.float64)  # loss sum, n correct

    def _bind_data(self, X, y):
        self._X, self._y = X, y

    def _run(self, batch_idx, chunks, step_key):
        t0 = time.perf_counter()
        compute_group(self.model, self.model.params, self._X, self._y, batch_idx,
                      list(enumerate(chunks)), step_key, self._grad_slots, self._stats_slots,
                      self._chunk_results)
        return [time.perf_counter() - t0]
