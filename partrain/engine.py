"""The engine contract: what every backend shares, and what a backend must do.

An engine computes the summed gradient of a minibatch. The base class `Engine` owns everything
that must be the same for every backend, so that all of them give the same bits: the chunk plan
(`chunks.plan_chunks`), the slots the chunks' results land in, the additions of the reduction
tree left after the backend's own, the scaling, the batch-norm statistics and the loss sum. A
backend only gets the chunks computed; `SerialEngine` below is the simplest one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from .chunks import chunks_per_step, compute_group, plan_chunks, reduce_tree
from .model import Sequential
from .processes import keep_freed_memory


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
    reduce: float  # the remaining tree additions, the scaled copy, statistics and losses
    processes: int = 1  # processes that computed chunks in the step


class Slots(NamedTuple):
    """Where a step's chunk results land, one row per chunk of the largest batch."""

    grad: np.ndarray  # (chunks, n_params): gradients and partial sums of the tree
    stats: np.ndarray  # (chunks, n_buffers): each chunk's batch-norm statistics
    results: np.ndarray  # (chunks, 2) float64: each chunk's loss sum and number correct


class StepRun(NamedTuple):
    """What a backend's `_run` returns about the step it computed."""

    busy: list[float]  # compute seconds of each process that computed chunks
    reduced: list[tuple[int, int]]  # chunk ranges [a, b) whose inside additions were made


def _no_interrupt() -> None:
    """The default interrupt check: nothing ever asks to stop."""


def slot_specs(n_slots: int, model: Sequential) -> tuple[tuple[str, tuple, type], ...]:
    """(name, shape, dtype) of each slot array, for backends that allocate them elsewhere."""
    return (("grad_slots", (n_slots, model.n_params), model.dtype),
            ("stats_slots", (n_slots, model.buffers.size), model.dtype),
            ("chunk_results", (n_slots, 2), np.float64))


class Engine:
    """Base of all engines: the chunk plan, the slots and the final reduction.

    A backend implements three methods:

    - ``_bind_data(X, y)``: make the training set (validated, in the model's dtype) available
      to the processes that compute.
    - ``_run(batch_idx, chunks, step_key) -> StepRun``: compute chunk ``k`` of the step for
      every ``k < len(chunks)`` (examples ``batch_idx[chunks[k][0]:chunks[k][1]]``, with
      ``chunks.compute_chunk`` and the random key ``(*step_key, k)``) from ``model.params``
      and ``model.buffers`` as they are now, and leave in ``self.slots``:

      * ``results[k]`` (loss sum, number correct) and ``stats[k]`` (batch-norm statistics)
        of every chunk;
      * for each range ``R`` in ``StepRun.reduced``: the additions of the tree that lie
        inside ``R`` made (``chunks.reduce_tree(..., inside=R)``, by whoever computed ``R``),
        so that ``grad[r]`` holds the partial sum for each ``r`` in
        ``chunks.tree_roots(len(chunks), R)``;
      * for every chunk outside those ranges, its own summed gradient in ``grad[k]``.

      Return the compute seconds of each process that took part and the reduced ranges. An
      exception from a chunk's computation propagates as itself (its remote traceback as
      ``__cause__``); call ``self.check_interrupt()`` while waiting for other processes.
    - ``close(kill=False)``: release processes and memory; idempotent.

    and may implement ``end_session()`` (the trainer's session ended: workers can stop
    waiting for steps, kept for the next session) and ``worker_pids()``.

    The base makes the remaining additions, so the tree, hence every bit of the sum, is the
    same whichever backend and however many processes computed it.
    """

    n_processes = 1  # processes that compute a full step's chunks

    def __init__(self, model: Sequential, chunk_size: int, batch_size: int,
                 check_interrupt: Callable[[], None] | None = None,
                 allocate: Callable[[str, tuple, type], np.ndarray] | None = None):
        """`allocate(name, shape, dtype)` makes the slot arrays (default: private memory;
        the loky engine's puts them in shared memory)."""
        self.model = model
        self.chunk_size = int(chunk_size)
        self.check_interrupt = check_interrupt or _no_interrupt
        self.last_timing: StepTiming | None = None
        allocate = allocate or (lambda name, shape, dtype: np.empty(shape, dtype))
        n_slots = chunks_per_step(batch_size, chunk_size)
        self.slots = Slots(*(allocate(*spec) for spec in slot_specs(n_slots, model)))

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
        slots = self.slots
        if not 0 < len(chunks) <= len(slots.grad):
            raise ValueError(f"A step takes 1 to {len(slots.grad) * self.chunk_size} "
                             f"examples (the batch size), got {len(batch_idx)}.")
        t0 = time.perf_counter()
        run = self._run(batch_idx, chunks, step_key)
        t1 = time.perf_counter()
        reduce_tree(slots.grad, len(chunks), done=run.reduced)
        np.multiply(slots.grad[0], out.dtype.type(scale), out=out)  # exact for 1.0
        stats = None
        if self.model.buffers.size:
            weights = np.array([stop - start for start, stop in chunks], dtype=out.dtype)
            stats = np.zeros_like(self.model.buffers)
            for k, w in enumerate(weights):
                stats += (w / weights.sum()) * slots.stats[k]
        results = slots.results[:len(chunks)]
        self.last_timing = StepTiming(t1 - t0, max(run.busy), time.perf_counter() - t1,
                                      len(run.busy))
        loss = 0.0
        for chunk_loss in results[:, 0]:
            loss += float(chunk_loss)  # in chunk order, in float64
        return ChunkTotals(loss, int(results[:, 1].sum()), len(batch_idx), stats)

    def worker_pids(self) -> list[int]:
        """Process ids of the engine's worker processes (none for this engine)."""
        return []

    def end_session(self) -> None:
        """The session of steps over this training set ended; the engine stays usable."""

    def _bind_data(self, X: np.ndarray, y: np.ndarray) -> None:
        raise NotImplementedError

    def _run(self, batch_idx: np.ndarray, chunks: list[tuple[int, int]],
             step_key: tuple[int, ...]) -> StepRun:
        raise NotImplementedError

    def close(self, kill: bool = False) -> None:
        """Release workers and shared memory (idempotent)."""


class SerialEngine(Engine):
    """All chunks in the master process: the n_jobs=1 path and the debugging mode."""

    def __init__(self, model: Sequential, chunk_size: int, batch_size: int,
                 check_interrupt: Callable[[], None] | None = None):
        super().__init__(model, chunk_size, batch_size, check_interrupt)
        keep_freed_memory()

    def _bind_data(self, X, y):
        self._X, self._y = X, y

    def _run(self, batch_idx, chunks, step_key):
        t0 = time.perf_counter()
        compute_group(self.model, self.model.params, self._X, self._y, batch_idx,
                      list(enumerate(chunks)), step_key, *self.slots)
        return StepRun([time.perf_counter() - t0], [])
