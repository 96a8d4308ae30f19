"""The Dask engine: a minibatch's chunks computed on a Dask cluster, local or remote.

Every worker process of the cluster holds one `ChunkServer`, a Dask *actor*, for the whole
life of the engine's training set: the model rebuilt from its config, the training set, and
this worker's share of the step's gradients. A step is then one direct message per worker,
client to worker with no scheduler and no task graph in between: the parameter vector (with
the batch-norm buffers), the batch indices, the step key and the worker's chunks go out; the
gradient of its chunks comes back. The worker holding the first chunks returns their sum (the
beginning of the master's ordered sum, so exact); the others return one gradient per chunk.

Same arithmetic as the other engines (every chunk goes through `chunks.compute_chunk`, the
master adds up in chunk order), so the parameters after training are bit-for-bit those of the
serial and loky engines; an exception raised by a chunk reaches the caller as itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import itertools
import logging
import os
import pickle
import secrets
import socket
import time
import traceback
import warnings
from dataclasses import dataclass

import numpy as np

try:
    import dask
    import distributed
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
    reduce_in_order,
    split_evenly,
    worker_imports,
)
from .model import Sequential

WORKERS_REFRESH_S = 5.0  # how often the master asks the scheduler which workers it has
WAIT_SLICE_S = 0.1  # how often a waiting master checks for Ctrl-C / SIGTERM
# A cluster the engine starts does less in the background (measured on 2 idle workers: the
# scheduler, nannies and workers together took 115 ms of CPU per second, 16 ms with these):
# no statistical profiler (it samples every thread every 10 ms), event-loop watchdog ticks
# every second instead of every 20 ms, system and memory monitors every few seconds.
LOCAL_CLUSTER_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "5s",
    "distributed.worker.memory.monitor-interval": "1s",
}
LOST_WORKER_S = 30.0  # a worker that failed is not used again for this long (if still listed)
INLINE_MAX_S = 0.5  # steps computing less than this run on the workers' event loops

# ----------------------------------------------------------------------------- worker side


@dataclass(frozen=True)
class ServerSpec:
    """What a worker needs to rebuild the model of one engine."""

    model_config: dict
    imports: tuple[str, ...]  # modules defining custom layers (see layers.register_layer)
    blas_threads: int


_PROCESS = {"blas_threads": None}  # per worker process: the BLAS thread limit in force


class RemoteTraceback(Exception):
    """The traceback, as text, of an exception raised on a Dask worker (set as its cause)."""

    def __str__(self) -> str:
        return "\n" + self.args[0]


class ChunkServer:
    """A Dask actor: the model and the training set resident on one worker process.

    Created once per worker for a training set (`DaskEngine` does it). `step` computes a
    group of chunks of one step in the worker's actor thread; `step_inline` does the same on
    the worker's event loop, saving two thread hand-offs per step (the engine uses it while
    steps are short, see INLINE_MAX_S).
    """

    def __init__(self, spec: ServerSpec, X: np.ndarray, y: np.ndarray):
        for module in spec.imports:
            importlib.import_module(module)
        if _PROCESS["blas_threads"] != spec.blas_threads:
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=spec.blas_threads)  # process-wide, kept for later servers
            keep_freed_memory()
            _PROCESS["blas_threads"] = spec.blas_threads
        self.model = Sequential.from_config(spec.model_config)
        self.X, self.y = X, y

    def step(self, state: np.ndarray, plan: np.ndarray) -> tuple:
        """Compute the chunks `plan` names (see `pack_plan`) with the parameters and buffers
        in `state`.

        Returns (values, info, None): `values` holds the chunks' gradients then their batch
        statistics, flat, in the model's dtype; `info` the seconds spent, then (loss sum,
        n correct) per chunk, in float64. When the group starts with chunk 0 its gradients
        come back as ONE row, their sum in chunk order: the first terms of the master's
        ordered reduction, so the result is unchanged. A chunk's exception comes back as
        (None, info, (exception, traceback text)) instead of being raised: an exception
        from the call itself is then always about the cluster, never about a chunk.
        """
        t0 = time.perf_counter()
        try:
            step_key, chunk_ids, chunks, batch_idx = unpack_plan(plan)
            model = self.model
            n_params = state.size - model.buffers.size
            params, model.buffers = state[:n_params], state[n_params:]
            summed = chunk_ids[0] == 0 and len(chunk_ids) > 1
            n_rows = 1 if summed else len(chunk_ids)
            values = np.empty(n_rows * n_params + len(chunk_ids) * model.buffers.size,
                              state.dtype)
            grads = np.empty((len(chunk_ids), n_params), state.dtype) if summed else \
                values[:n_rows * n_params].reshape(n_rows, n_params)
            stats = values[n_rows * n_params:].reshape(len(chunk_ids), model.buffers.size)
            info = np.empty(1 + 2 * len(chunk_ids), np.float64)
            for i, (k, bounds) in enumerate(zip(chunk_ids, chunks)):
                info[1 + 2 * i:3 + 2 * i] = compute_chunk(
                    model, params, self.X, self.y, batch_idx, k, bounds, step_key, grads[i],
                    stats[i] if model.buffers.size else None)
            if summed:
                reduce_in_order(grads, len(chunk_ids), values[:n_params])
            info[0] = time.perf_counter() - t0
            return values, info, None
        except Exception as exc:
            return None, np.array([time.perf_counter() - t0]), _portable(exc)

    async def step_inline(self, state: np.ndarray, plan: np.ndarray) -> tuple:
        """`step`, run on the worker's event loop (which it blocks meanwhile)."""
        return self.step(state, plan)


def pack_plan(step_key: tuple[int, ...], group: list, batch_idx: np.ndarray) -> np.ndarray:
    """One int64 array for a step's (step key, [(chunk id, (start, stop)), ...], batch
    indices): one frame to serialise instead of one per Python object."""
    ids = [k for k, _ in group]
    bounds = [b for _, (start, stop) in group for b in (start, stop)]
    return np.concatenate([[len(step_key)], step_key, [len(ids)], ids, bounds,
                           batch_idx]).astype(np.int64)


def unpack_plan(plan: np.ndarray) -> tuple:
    """(step key, chunk ids, chunk bounds, batch indices) from `pack_plan`'s array."""
    n_key = int(plan[0])
    step_key = tuple(int(k) for k in plan[1:1 + n_key])
    n_ids = int(plan[1 + n_key])
    at = 2 + n_key
    ids = [int(k) for k in plan[at:at + n_ids]]
    bounds = plan[at + n_ids:at + 3 * n_ids].reshape(n_ids, 2)
    return step_key, ids, [(int(a), int(b)) for a, b in bounds], plan[at + 3 * n_ids:]


def _portable(exc: Exception) -> tuple[Exception, str]:
    """(exc, its traceback) if it pickles; else a RuntimeError naming it."""
    text = traceback.format_exc()
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        exc = RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc, text


def _host_and_pid() -> tuple[str, int]:
    """Where a worker process runs."""
    return socket.gethostname(), os.getpid()


# ----------------------------------------------------------------------------- master side


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Silence one logger for the duration of the block."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


class _WorkerLost(Exception):
    """Internal: a worker holding a ChunkServer could not be reached or went away."""


@dataclass
class _Server:
    address: str
    future: distributed.Future  # keeps the actor alive on its worker
    actor: distributed.Actor


class DaskEngine(Engine):
    """Chunks computed on a Dask cluster: a local one it starts, or one it connects to.

    Parameters
    ----------
    model : Sequential
        The master's model; workers rebuild it from `model.config()`.
    chunk_size : int
        Examples per chunk (never depends on the number of workers).
    n_jobs : int
        Worker processes of the local cluster started when `scheduler` is None. A step is
        shared between all the cluster's worker processes (re-counted every few seconds).
    batch_size : int
        Largest batch; sizes the master's gradient slots.
    blas_threads : int
        BLAS threads of each worker process, set with threadpoolctl when the first
        `ChunkServer` of an engine starts there (1 keeps the arithmetic identical to the other
        engines).
    max_restarts : int
        Times in a row a step is re-run after workers were lost before `WorkerCrashError`.
    scheduler : None, str or distributed.Client
        None starts a `LocalCluster` of `n_jobs` single-threaded worker processes, closed by
        `close()`. An address "tcp://host:port" or a Client uses that cluster and leaves it
        running (only a client created here is closed).
    step_timeout : float
        Seconds a step may take before `WorkerCrashError`.
    connect_timeout : float
        Seconds to reach the scheduler, to wait for a worker when none is left, and to start
        a `ChunkServer` on a worker.

    Raises
    ------
    ConnectionError
        The scheduler cannot be reached, or it has no worker, within `connect_timeout`.

    Notes
    -----
    `bind` scatters the training set to every worker and starts one `ChunkServer` actor per
    worker process holding it. Per step the master sends each server, directly (the client
    talks to the workers, `direct_to_workers=True`), the state vector and its chunks, and
    waits; the scheduler is asked only every WORKERS_REFRESH_S seconds which workers exist, to
    adopt new ones. A worker that cannot be reached is dropped and the step re-run on the
    others (results unchanged). `last_bytes` records what the last step moved.
    """

    def __init__(self, model: Sequential, chunk_size: int, n_jobs: int, batch_size: int,
                 blas_threads: int = 1, max_restarts: int = 3,
                 scheduler: str | distributed.Client | None = None, step_timeout: float = 300.0,
                 connect_timeout: float = 10.0, check_interrupt=None):
        super().__init__(model, chunk_size, check_interrupt)
        self.max_restarts = int(max_restarts)
        self.step_timeout = float(step_timeout)
        self.connect_timeout = float(connect_timeout)
        self._spec = ServerSpec(model.config(), worker_imports(model), int(blas_threads))
        self._token = secrets.token_hex(6)
        self._serial = itertools.count()
        self._data: list[distributed.Future] = []
        self._training_set: tuple[np.ndarray, np.ndarray] | None = None
        self._servers: list[_Server] = []
        self._lost: dict[str, float] = {}  # failed workers' addresses: when they failed
        self._servers_time = -np.inf
        self._last_compute = np.inf  # slowest worker's compute seconds in the last step
        self.last_bytes = {"params": 0, "workers": 0, "grads": 0}
        n_slots = chunks_per_step(batch_size, chunk_size)
        self._grad_slots = np.empty((n_slots, model.n_params), model.dtype)
        self._stats_slots = np.empty((n_slots, model.buffers.size), model.dtype)
        self._chunk_results = np.empty((n_slots, 2), np.float64)  # loss sum, n correct
        self._cluster = self._client = None
        self._owns_client = True
        if scheduler is None:
            with dask.config.set(LOCAL_CLUSTER_CONFIG):
                self._cluster = distributed.LocalCluster(
                    n_workers=n_jobs, threads_per_worker=1, processes=True,
                    dashboard_address=None,
                    # no dashboard; its HTTP endpoints on a free port, not on a busy 8787
                    scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
            self.address = self._cluster.scheduler_address
            self._client = distributed.Client(self._cluster, set_as_default=False,
                                              direct_to_workers=True)
        elif isinstance(scheduler, str):
            self.address = scheduler
            self._client = self._connect(scheduler)
        elif isinstance(scheduler, distributed.Client):
            self.address = scheduler.scheduler.address
            if scheduler.direct_to_workers:
                self._client, self._owns_client = scheduler, False
            else:  # actor calls would be relayed by the scheduler: a client of our own
                self._client = self._connect(self.address, security=scheduler.security)
        else:
            raise ValueError(
                "`scheduler` must be None, an address 'tcp://host:port' or a distributed.Client, "
                f"got {type(scheduler).__name__}."
            )
        self._wait_for_a_worker()

    def _connect(self, address: str, **options) -> distributed.Client:
        try:
            return distributed.Client(address, timeout=self.connect_timeout,
                                      set_as_default=False, direct_to_workers=True, **options)
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

    # -- the servers

    def _bind_data(self, X, y):
        self._training_set = (X, y)  # kept to send it again if the workers holding it die
        self._drop_servers(self._servers)  # they hold the previous training set
        self._data = []

    def _drop_servers(self, servers: list[_Server], lost: bool = False) -> None:
        """Forget `servers`; `lost`: their workers failed, so start no server there again
        while the scheduler lists them, for up to LOST_WORKER_S seconds."""
        for server in list(servers):
            if server in self._servers:
                self._servers.remove(server)
                server.future.release()  # the scheduler forgets the actor; its worker drops it
            if lost:
                self._lost[server.address] = time.monotonic()

    def _check_scheduler(self, step_key: tuple) -> None:
        """WorkerCrashError, one line, once the client has lost its scheduler."""
        if self._client.status != "running":
            raise WorkerCrashError(
                f"Lost the connection to the Dask scheduler at {self.address} at step key "
                f"{step_key} (client status: {self._client.status})."
            )

    def _servers_for_step(self, step_key: tuple) -> list[_Server]:
        """The ChunkServers of the cluster's workers; the workers are re-listed every
        WORKERS_REFRESH_S seconds, or now when no server is left, and new ones adopted."""
        stale = time.monotonic() - self._servers_time > WORKERS_REFRESH_S
        if self._servers and not stale:
            return self._servers
        deadline = time.monotonic() + self.connect_timeout
        while True:
            self._check_scheduler(step_key)
            try:
                workers = set(self._client.nthreads())  # one round trip to the scheduler
            except OSError as exc:
                self._check_scheduler(step_key)
                raise WorkerCrashError(f"The Dask scheduler at {self.address} did not answer "
                                       f"at step key {step_key} ({exc}).") from None
            self._lost = {address: when for address, when in self._lost.items()
                          if address in workers and time.monotonic() - when < LOST_WORKER_S}
            self._drop_servers([s for s in self._servers if s.address not in workers])
            known = {s.address for s in self._servers} | set(self._lost)
            self._start_servers(sorted(workers - known), step_key)
            self._servers_time = time.monotonic()
            if self._servers:
                return self._servers
            if time.monotonic() > deadline:
                raise WorkerCrashError(
                    f"The Dask cluster at {self.address} has had no usable worker for "
                    f"{self.connect_timeout:g} s (step key {step_key})."
                )
            self.check_interrupt()
            time.sleep(WAIT_SLICE_S)

    def _start_servers(self, addresses: list[str], step_key: tuple) -> None:
        """A ChunkServer on each of `addresses`, holding the training set (scattered to every
        worker first when the cluster lost it). Workers that fail to start one are skipped;
        an exception raised by the server itself (e.g. a module it cannot import) is raised."""
        if not addresses:
            return
        client = self._client
        if not self._data or any(f.status != "finished" for f in self._data):
            try:
                self._data = client.scatter(list(self._training_set), broadcast=True,
                                            hash=False, timeout=self.connect_timeout)
            except (OSError, distributed.TimeoutError):
                return  # no worker to hold it right now: the caller retries
        X, y = self._data
        futures = {address: client.submit(
            ChunkServer, self._spec, X, y, actor=True, workers=[address],
            allow_other_workers=False, pure=False,
            key=f"partrain-server-{self._token}-{next(self._serial)}") for address in addresses}
        deadline = time.monotonic() + self.connect_timeout
        for address, future in futures.items():
            try:
                while True:
                    self.check_interrupt()
                    try:
                        with client.as_current():  # the actor handle binds to this client
                            actor = future.result(timeout=WAIT_SLICE_S)
                        break
                    except distributed.TimeoutError:
                        if time.monotonic() > deadline:
                            raise
            except Exception:
                if future.status == "error":
                    raise  # the server's own exception, e.g. ModuleNotFoundError
                future.release()  # the worker went away or is stuck: do without it
                continue
            self._servers.append(_Server(address, future, actor))
        self._servers.sort(key=lambda s: s.address)

    # -- one step

    def _run(self, batch_idx, chunks, step_key):
        self._check_scheduler(step_key)
        state = np.concatenate([self.model.params, self.model.buffers])
        batch_idx = np.ascontiguousarray(batch_idx)
        failures = 0
        while True:
            servers = self._servers_for_step(step_key)
            try:
                return self._dispatch(servers, state, batch_idx, chunks, step_key)
            except _WorkerLost as lost:
                failures += 1
                self._check_scheduler(step_key)
                self._servers_time = -np.inf  # list the workers again before the re-run
                if failures > self.max_restarts:
                    raise WorkerCrashError(
                        f"The Dask cluster at {self.address} lost workers {failures} times in a "
                        f"row at step key {step_key} ({lost}). Possible causes: out of memory "
                        "(try a smaller batch_size), a crash in a native library, or workers "
                        "being killed or shut down from outside."
                    ) from None
                warnings.warn(
                    f"A Dask worker was lost ({lost}); partrain re-ran the step on the others "
                    f"(attempt {failures + 1}). Results are unaffected.", RuntimeWarning,
                    stacklevel=2)

    def _dispatch(self, servers, state, batch_idx, chunks, step_key):
        """One attempt at a step: a `step` call per server, then wait for all of them."""
        groups = split_evenly(list(enumerate(chunks)), len(servers))
        requests = [(server, state, pack_plan(step_key, group, batch_idx))
                    for server, group in zip(servers, groups)]
        inline = self._last_compute < INLINE_MAX_S
        calls = [None] * len(requests)
        deadline = time.monotonic() + self.step_timeout
        while True:  # in slices, to honour an interrupt
            self.check_interrupt()
            remaining = deadline - time.monotonic()
            try:
                outcomes = self._client.sync(self._call_and_wait, requests, calls, inline,
                                             callback_timeout=max(min(WAIT_SLICE_S, remaining),
                                                                  1e-3))
                break
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise WorkerCrashError(
                        f"A step took longer than step_timeout={self.step_timeout:g} s on "
                        f"the Dask cluster at {self.address} (step key {step_key}). Are "
                        "its workers alive and not overloaded?"
                    ) from None
        for outcome in outcomes:  # a chunk's own exception first: a re-run would raise it too
            if isinstance(outcome, tuple) and outcome[2] is not None:
                exc, text = outcome[2]
                raise exc from RemoteTraceback(text)
        lost = [(server, outcome) for (server, _, _), outcome in zip(requests, outcomes)
                if not isinstance(outcome, tuple)]
        if lost:
            self._drop_servers([server for server, _ in lost], lost=True)
            raise _WorkerLost("; ".join(f"{server.address}: {type(exc).__name__}: {exc}"
                                        for server, exc in lost))
        n_params, n_buffers = self.model.n_params, self.model.buffers.size
        n_bytes, busy = 0, []
        for group, (values, info, _) in zip(groups, outcomes):
            first, n = group[0][0], len(group)
            n_rows = (values.size - n * n_buffers) // n_params
            if n_rows < n:  # the summed first chunks (see ChunkServer.step)
                self._grad_slots[first:first + n - 1] = -0.0  # -0.0 + x == x for every x
            self._grad_slots[first + n - n_rows:first + n] = \
                values[:n_rows * n_params].reshape(n_rows, n_params)
            self._stats_slots[first:first + n] = values[n_rows * n_params:].reshape(n, n_buffers)
            self._chunk_results[first:first + n] = info[1:].reshape(n, 2)
            n_bytes += values.nbytes
            busy.append(float(info[0]))
        self._last_compute = max(busy)
        self.last_bytes = {"params": state.nbytes, "workers": len(requests), "grads": n_bytes}
        return busy

    @staticmethod
    async def _call_and_wait(requests: list, calls: list, inline: bool) -> list:
        """On the client's event loop: start the `step` calls not started yet (`calls[i]` is
        None), then wait for all; each outcome is the call's result, or the exception that
        says its worker could not be reached."""
        for i, (server, state, plan) in enumerate(requests):
            if calls[i] is None:
                try:
                    method = server.actor.step_inline if inline else server.actor.step
                    calls[i] = method(state, plan)
                except Exception as exc:  # the actor's worker is known to be gone
                    calls[i] = exc

        async def outcome(call):
            if isinstance(call, Exception):
                return call
            try:
                return await call
            except Exception as exc:
                return exc

        return await asyncio.gather(*map(outcome, calls))

    # -- lifecycle

    def worker_pids(self) -> list[int]:
        """Process ids of the cluster's workers running on this machine."""
        here = socket.gethostname()
        found = self._client.run(_host_and_pid, on_error="ignore").values()
        return [pid for host, pid in found if host == here]

    def close(self, kill: bool = False) -> None:
        """Release the servers and data; close the client and cluster created here
        (idempotent). `kill` changes nothing: a step in progress on a worker finishes there."""
        client, cluster, self._client, self._cluster = self._client, self._cluster, None, None
        if client is not None and client.status == "running":
            # cancelled, not just dropped: the scheduler forgets them before any worker closes
            client.cancel([s.future for s in self._servers] + self._data)
        self._servers, self._data, self._training_set = [], [], None
        if client is not None and self._owns_client:
            if client.status == "running":
                client.close()
            else:  # the scheduler is gone (already reported): no traceback of the reconnection
                with _quiet("distributed.client"):
                    client.close()
        if cluster is not None:
            cluster.close()
