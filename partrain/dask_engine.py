"""The Dask engine: a minibatch's chunks computed on a Dask cluster, local or remote.

Same arithmetic as the loky engine (every chunk goes through `parallel.compute_chunk` with a
model rebuilt from its config), so the parameters after training are bit-for-bit those of
the serial and loky engines; an exception raised by a chunk reaches the caller as itself.
What travels: the training set once per `fit` (broadcast to
every worker), then per step the parameter vector once to each worker, a few indices per
task, and each chunk's gradient back.
"""

from __future__ import annotations

import importlib
import os
import secrets
import socket
import threading
import time
import warnings
from dataclasses import dataclass

import numpy as np

try:
    import distributed
    from distributed.scheduler import KilledWorker
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError(
        "backend='dask' needs dask.distributed: pip install 'partrain[dask]'."
    ) from None

from .chunks import (
    Engine,
    WorkerCrashError,
    chunks_per_step,
    compute_chunk,
    keep_freed_memory,
    split_evenly,
    worker_imports,
)
from .model import Sequential

WORKERS_REFRESH_S = 5.0  # how often the master asks which workers the cluster has
WAIT_SLICE_S = 0.1  # how often a waiting master checks for Ctrl-C / SIGTERM

# ----------------------------------------------------------------------------- worker side


@dataclass(frozen=True)
class TaskSpec:
    """What a worker needs to rebuild the model of one engine; small, sent with each task."""

    token: str
    model_config: dict
    imports: tuple[str, ...]  # modules defining custom layers (see layers.register_layer)
    blas_threads: int


_LOCAL = threading.local()  # per worker thread: (token, model) of the last engine served
_PROCESS = {"blas_threads": None}  # per worker process: the BLAS thread limit in force


def _worker_model(spec: TaskSpec) -> Sequential:
    """This worker thread's model for `spec`, rebuilt only when the engine changes."""
    cached = getattr(_LOCAL, "model", None)
    if cached is None or cached[0] != spec.token:
        for module in spec.imports:
            importlib.import_module(module)
        if _PROCESS["blas_threads"] != spec.blas_threads:
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=spec.blas_threads)  # process-wide, kept for later tasks
            keep_freed_memory()
            _PROCESS["blas_threads"] = spec.blas_threads
        cached = _LOCAL.model = (spec.token, Sequential.from_config(spec.model_config))
    return cached[1]


def _compute_group(spec: TaskSpec, X: np.ndarray, y: np.ndarray, state: np.ndarray,
                   batch_idx: np.ndarray, step_key: tuple[int, ...], chunk_ids: list[int],
                   chunks: list[tuple[int, int]]) -> tuple:
    """Worker task: (gradient sums, batch stats, losses, correct counts, seconds) of chunks."""
    t0 = time.perf_counter()
    model = _worker_model(spec)
    n_params = state.size - model.buffers.size
    params, model.buffers = state[:n_params], state[n_params:]
    grads = np.empty((len(chunk_ids), n_params), state.dtype)
    stats = np.empty((len(chunk_ids), model.buffers.size), state.dtype)
    losses, corrects = [], []
    for i, (k, bounds) in enumerate(zip(chunk_ids, chunks)):
        loss, correct = compute_chunk(model, params, X, y, batch_idx, k, bounds, step_key,
                                      grads[i], stats[i] if model.buffers.size else None)
        losses.append(loss)
        corrects.append(correct)
    return grads, stats, losses, corrects, time.perf_counter() - t0


def _pass(value: np.ndarray) -> np.ndarray:
    """Worker task whose result is its argument: a value computed once, fetched by others."""
    return value


def _host_and_pid() -> tuple[str, int]:
    """Where a worker process runs."""
    return socket.gethostname(), os.getpid()


# ----------------------------------------------------------------------------- master side


def _describe(exc: BaseException) -> str:
    """One line on a lost step: why Dask cancelled its futures, or the connection error."""
    if not isinstance(exc, distributed.CancelledError):
        return f"{type(exc).__name__}: {exc}"
    groups = getattr(exc, "error_groups", None)
    reasons = {group.reason for group in groups} if groups else {getattr(exc, "reason", exc)}
    return "futures cancelled: " + ", ".join(sorted(map(str, reasons)))


class _DataLost(Exception):
    """Internal: scattered data or a step's futures were lost with the workers holding them."""


class DaskEngine(Engine):
    """Chunks computed on a Dask cluster: a local one it starts, or one it connects to.

    Parameters
    ----------
    model : Sequential
        The master's model; workers rebuild it from `model.config()`.
    chunk_size : int
        Examples per chunk (never depends on the number of workers).
    n_jobs : int
        Worker processes of the local cluster started when `scheduler` is None. A step has
        as many tasks as the cluster has worker threads (re-counted every few seconds).
    batch_size : int
        Largest batch; sizes the master's gradient slots.
    blas_threads : int
        BLAS threads of each worker process, set with threadpoolctl by the first task of an
        engine in that process (1 keeps the arithmetic identical to the other engines).
    max_restarts : int
        Times in a row a step is re-run after the cluster lost its data or tasks (workers
        died) before `WorkerCrashError`. Dask itself retries a task whose worker died.
    scheduler : None, str or distributed.Client
        None starts a `LocalCluster` of `n_jobs` single-threaded worker processes, closed by
        `close()`. An address "tcp://host:port" or a Client uses that cluster and leaves it
        running (only a client created here is closed).
    step_timeout : float
        Seconds a step may take before `WorkerCrashError`.
    connect_timeout : float
        Seconds to reach the scheduler, and to wait for a worker when the training set must
        be sent (`WorkerCrashError` if none comes during training).

    Raises
    ------
    ConnectionError
        The scheduler cannot be reached, or it has no worker, within `connect_timeout`.

    Notes
    -----
    The training set is scattered once per `bind` to every worker. Per step, the parameter
    vector (with the batch-norm buffers) becomes ONE future that every task depends on: it
    reaches one worker through the scheduler and the others fetch it from there, and Dask can
    recompute it if its holder dies. One task per worker thread (pinned, loosely, to spread
    them) carries the batch indices and its chunk bounds and returns its chunks' gradient
    sums, which the master adds in chunk order. `last_bytes` records what the last step moved.
    """

    def __init__(self, model: Sequential, chunk_size: int, n_jobs: int, batch_size: int,
                 blas_threads: int = 1, max_restarts: int = 3,
                 scheduler: str | distributed.Client | None = None, step_timeout: float = 300.0,
                 connect_timeout: float = 10.0, check_interrupt=None):
        super().__init__(model, chunk_size, check_interrupt)
        self.max_restarts = int(max_restarts)
        self.step_timeout = float(step_timeout)
        self.connect_timeout = float(connect_timeout)
        self._spec = TaskSpec(secrets.token_hex(8), model.config(), worker_imports(model),
                              int(blas_threads))
        self._data: list[distributed.Future] = []
        self._training_set: tuple[np.ndarray, np.ndarray] | None = None
        self._slots: list[str | None] = []  # one worker address per worker thread
        self._slots_time = -np.inf
        self.last_bytes = {"params": 0, "workers": 0, "grads": 0}
        n_slots = chunks_per_step(batch_size, chunk_size)
        self._grad_slots = np.empty((n_slots, model.n_params), model.dtype)
        self._stats_slots = np.empty((n_slots, model.buffers.size), model.dtype)
        self._chunk_results = np.empty((n_slots, 2), np.float64)  # loss sum, n correct
        self._cluster = self._client = None
        self._owns_client = scheduler is None or isinstance(scheduler, str)
        if scheduler is None:
            self._cluster = distributed.LocalCluster(
                n_workers=n_jobs, threads_per_worker=1, processes=True, dashboard_address=None,
                # no dashboard; its HTTP endpoints on a free port, not on a busy 8787
                scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
            self._client = distributed.Client(self._cluster, set_as_default=False)
            self.address = self._cluster.scheduler_address
        elif isinstance(scheduler, str):
            self.address = scheduler
            self._client = self._connect(scheduler)
        elif isinstance(scheduler, distributed.Client):
            self._client, self.address = scheduler, scheduler.scheduler.address
        else:
            raise ValueError(
                "`scheduler` must be None, an address 'tcp://host:port' or a distributed.Client, "
                f"got {type(scheduler).__name__}."
            )
        self._wait_for_a_worker()

    def _connect(self, address: str) -> distributed.Client:
        try:
            return distributed.Client(address, timeout=self.connect_timeout,
                                      set_as_default=False)
        except (OSError, distributed.TimeoutError) as exc:
            raise ConnectionError(
                f"Cannot reach the Dask scheduler at {address!r} within "
                f"{self.connect_timeout:g} s ({exc}). Start one with `dask scheduler` and its "
                f"workers with `dask worker {address}`."
            ) from None

    def _wait_for_a_worker(self) -> None:
        try:
            self._client.wait_for_workers(1, timeout=self.connect_timeout)
        except distributed.TimeoutError:
            self.close()
            raise ConnectionError(
                f"The Dask scheduler at {self.address!r} has no worker after "
                f"{self.connect_timeout:g} s. Start some with `dask worker {self.address}`."
            ) from None

    # -- data and steps

    def _scatter(self, values: list[np.ndarray]) -> list[distributed.Future]:
        """Send `values` to every worker; WorkerCrashError if the cluster has no worker."""
        try:
            return self._client.scatter(values, broadcast=True, hash=False,
                                        timeout=self.connect_timeout)
        except distributed.TimeoutError:
            raise WorkerCrashError(
                f"The Dask cluster at {self.address} has had no worker for "
                f"{self.connect_timeout:g} s."
            ) from None

    def _bind_data(self, X, y):
        self._training_set = (X, y)  # kept to send it again if the workers holding it die
        self._data = self._scatter([X, y])
        self._slots_time = -np.inf

    def _worker_slots(self) -> list[str | None]:
        """Worker addresses, one per thread, interleaved ([None]: no worker known right now);
        refreshed every WORKERS_REFRESH_S seconds."""
        if time.monotonic() - self._slots_time > WORKERS_REFRESH_S:
            nthreads = sorted(self._client.nthreads().items())
            self._slots = [address for i in range(max((n for _, n in nthreads), default=0))
                           for address, n in nthreads if i < n] or [None]
            self._slots_time = time.monotonic()
        return self._slots

    def _run(self, batch_idx, chunks, step_key):
        state = np.concatenate([self.model.params, self.model.buffers])  # a copy: may travel
        failures = 0
        while True:
            try:
                return self._dispatch(state, batch_idx, chunks, step_key)
            except _DataLost as lost:
                failures += 1
                if failures > self.max_restarts:
                    raise WorkerCrashError(
                        f"The Dask cluster at {self.address} lost workers {failures} times in a "
                        f"row at step key {step_key} ({lost}). Possible causes: out of memory "
                        "(try a smaller batch_size), a crash in a native library, or workers "
                        "being killed or shut down from outside."
                    ) from None
                warnings.warn(
                    f"The Dask cluster lost a step's data or tasks ({lost}), e.g. with dead "
                    f"workers; partrain re-ran the step (attempt {failures + 1}). Results are "
                    "unaffected.", RuntimeWarning, stacklevel=2)

    def _dispatch(self, state, batch_idx, chunks, step_key):
        """One attempt at a step: the state as one future, a task per worker thread."""
        client = self._client
        futures = []
        try:
            if any(future.status != "finished" for future in self._data):  # lost: send again
                self._bind_data(*self._training_set)
            slots = self._worker_slots()
            groups = split_evenly(list(enumerate(chunks)), len(slots))
            state_future = client.submit(_pass, state, pure=False)
            X, y = self._data
            for group, address in zip(groups, slots):
                ids, bounds = [k for k, _ in group], [b for _, b in group]
                where = {"workers": [address], "allow_other_workers": True} if address else {}
                futures.append(client.submit(_compute_group, self._spec, X, y, state_future,
                                             batch_idx, step_key, ids, bounds, pure=False,
                                             **where))
            self._wait(futures, step_key)
            results = client.gather(futures)
        except Exception as exc:
            if client.status != "running":
                raise WorkerCrashError(
                    f"Lost the connection to the Dask scheduler at {self.address} at step key "
                    f"{step_key} ({type(exc).__name__}: {exc})."
                ) from None
            client.cancel(futures)
            if isinstance(exc, (distributed.CancelledError, OSError)):
                raise _DataLost(_describe(exc)) from None
            raise
        except BaseException:  # KeyboardInterrupt: stop the tasks, let the trainer clean up
            if client.status == "running":
                client.cancel(futures)
            raise
        n_grad_bytes, busy = 0, []
        for group, (grads, stats, losses, corrects, seconds) in zip(groups, results):
            for i, (k, _) in enumerate(group):
                self._grad_slots[k] = grads[i]
                self._stats_slots[k] = stats[i]
                self._chunk_results[k] = losses[i], corrects[i]
            n_grad_bytes += grads.nbytes + stats.nbytes
            busy.append(seconds)
        self.last_bytes = {"params": state.nbytes, "workers": len(set(slots) - {None}),
                           "grads": n_grad_bytes}
        return busy

    def _wait(self, futures: list[distributed.Future], step_key: tuple) -> None:
        """Wait for all tasks, checking for an interrupt every WAIT_SLICE_S; a timeout or a
        task Dask gave up on is a WorkerCrashError, a task's own exception is raised as is."""
        deadline = time.monotonic() + self.step_timeout
        with self._client.as_current():
            while True:
                self.check_interrupt()
                try:
                    remaining = max(deadline - time.monotonic(), 1e-3)
                    distributed.wait(futures, timeout=min(WAIT_SLICE_S, remaining))
                    break
                except distributed.TimeoutError:
                    if time.monotonic() >= deadline:
                        raise WorkerCrashError(
                            f"A step took longer than step_timeout={self.step_timeout:g} s on "
                            f"the Dask cluster at {self.address} (step key {step_key}). Are "
                            "its workers alive and not overloaded?"
                        ) from None
        for future in futures:
            if future.status == "error":
                exc = future.exception()
                if isinstance(exc, KilledWorker):
                    raise WorkerCrashError(
                        f"Dask gave up on a task at step key {step_key}: {exc}. The workers "
                        "died each time they ran it (out of memory? a crash in a native "
                        "library?)."
                    ) from None
                future.result()  # the task's own exception, with its remote traceback

    # -- lifecycle

    def worker_pids(self) -> list[int]:
        """Process ids of the cluster's workers running on this machine."""
        here = socket.gethostname()
        found = self._client.run(_host_and_pid, on_error="ignore").values()
        return [pid for host, pid in found if host == here]

    def close(self, kill: bool = False) -> None:
        """Release the data; close the client and cluster created here (idempotent).

        `kill` changes nothing: the nannies of a local cluster stop busy workers after ~4 s.
        """
        client, cluster, self._client, self._cluster = self._client, self._cluster, None, None
        self._data, self._training_set = [], None  # dropping the futures releases them
        if client is not None and self._owns_client:
            client.close()
        if cluster is not None:
            cluster.close()
