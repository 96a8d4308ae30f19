"""The Dask engine: a minibatch's chunks computed on a Dask cluster, local or remote.

Every worker process of the cluster holds one `ChunkServer`, a Dask *actor*, for as long as
the training set is bound (a `fit`): the model rebuilt from its config and the training set.
A step is then one request and one reply per worker, client to worker with no scheduler and
no task graph in between: out go the parameter vector (with the batch-norm buffers) and one
int64 array naming the step key, the step's chunk count, the worker's chunks and the batch
indices; back come the partial sums of its chunks' gradients: the worker makes the additions
of the gradient tree that lie within its contiguous range of chunks and sends only the rows
still needed after them (`chunks.tree_roots`: one for the range [0, 4) of 8 chunks), with each
chunk's batch statistics and (loss, n correct).

Two transports carry the steps. "socket" (the default on tcp:// clusters): each server
listens on a port of its own and a thread of its own answers the engine over one TCP
connection, NumPy buffers straight to and from the socket (about 1 ms per step here).
"actor": Dask actor method calls, through Dask's messaging (a few ms more per step), for
clusters whose other ports the client cannot reach, or that use TLS.

Same arithmetic as the other engines (every chunk goes through `chunks.compute_chunk`, the
workers and then the master add the chunk gradients up along `chunks.reduce_tree`, as in the
loky engine), so the parameters after training are bit-for-bit those of the serial and loky
engines; an exception raised by a chunk reaches the caller as itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import importlib
import itertools
import logging
import multiprocessing.spawn
import os
import pickle
import queue
import secrets
import select
import socket
import struct
import threading
import time
import traceback
import warnings
from dataclasses import dataclass

import numpy as np

try:
    import dask
    import distributed
    from distributed.core import Status
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError(
        "backend='dask' needs dask.distributed: pip install 'partrain[dask]'."
    ) from None

from .chunks import (
    chunk_range,
    compute_chunk,
    reduce_tree,
    split_evenly,
    tree_roots,
    worker_imports,
)
from .engine import Engine, StepRun, WorkerCrashError
from .model import Sequential
from .processes import keep_freed_memory

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
IDLE_CHECK_S = 0.05  # how often an idle server checks whether its worker is closing
# A server whose worker is closing ends its connection once the engine has sent nothing for
# this long (training paused: validation, between fits); while steps keep coming it answers
# the next one, flagged LEAVING, instead (closing between two steps could cross a request).
LEAVE_IDLE_S = 0.5
LEAVE_WAIT_S = 30.0  # a closing worker waits this long at most for the engine to drop it
LOST_WORKER_S = 30.0  # a worker that failed is not used again for this long (if still listed)
# Steps whose last compute took less than this run on the workers' event loops (two thread
# hand-offs fewer per step); longer ones in the actor thread, the worker answering meanwhile.
INLINE_MAX_S = 0.5

# ----------------------------------------------------------------------------- worker side


@dataclass(frozen=True)
class ServerSpec:
    """What a worker needs to rebuild the model of one engine, and how to serve it."""

    model_config: dict
    imports: tuple[str, ...]  # modules defining custom layers (see layers.register_layer)
    blas_threads: int
    listen: bool = False  # serve steps on a TCP socket of its own (transport "socket")
    accept_timeout: float = 60.0  # seconds the socket waits for the engine to connect
    engine: str = ""  # the engine's token (whose servers DrainChunkServers waits for)


_PROCESS = {"blas_threads": None}  # per worker process: the BLAS thread limit in force
_SERVING: dict[str, set] = {}  # per worker process: engine token -> servers it is connected to
_LEAVING: set[str] = set()  # per worker process: tokens of the engines told it is closing


class ChunkServerPlugin(distributed.WorkerPlugin):
    """Worker plugin of one engine (transport "socket"), on every worker of the cluster,
    those that join later included.

    - A worker that joins tells the engine at once: an event on the engine's own topic
      (`setup`), so that a server is started there before the next step.
    - A worker that closes (retired, scaled down, adapted away) first waits, up to
      LEAVE_WAIT_S, until its ChunkServers there have ended (`teardown`): a server
      answers its next step as usual, flagged LEAVING, then ends; one that gets no step for
      LEAVE_IDLE_S ends anyway. The engine keeps the flagged result, and leaves out servers
      whose connection ended before it sends the next step. So no step fails (unless a step
      is sent just as a server idle for LEAVE_IDLE_S ends: then it is re-run, as for a lost
      worker).
    """

    def __init__(self, engine: str):
        self.engine = engine
        self.name = self.topic = f"partrain-{engine}"

    def setup(self, worker) -> None:
        worker.log_event(self.topic, {"action": "joined", "worker": worker.address})

    async def teardown(self, worker) -> None:
        if worker.status not in (Status.closing, Status.closing_gracefully):
            return  # unregistered by the engine's close(): nothing to wait for
        _LEAVING.add(self.engine)
        deadline = time.monotonic() + LEAVE_WAIT_S
        while _SERVING.get(self.engine) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)


class RemoteTraceback(Exception):
    """The traceback, as text, of an exception raised on a Dask worker (set as its cause)."""

    def __str__(self) -> str:
        return "\n" + self.args[0]


class ChunkServer:
    """A Dask actor: the model and the training set resident on one worker process.

    Created once per worker for a training set (`DaskEngine` does it). With `spec.listen`
    it also listens on a TCP port of the worker's host (`endpoint()`) and serves the engine's
    steps there from a thread of its own: per step one request and one reply over one
    connection, read and written straight into NumPy buffers, with no event loop, thread
    hand-off or serialisation layer in between (transport "socket"). Otherwise the engine
    calls `step` (in the worker's actor thread) or `step_inline` (on its event loop, two
    thread hand-offs fewer, while steps are short, see INLINE_MAX_S) through Dask.
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
        self._grads: np.ndarray | None = None  # chunk gradient rows, reused from step to step
        self._listener = None
        if spec.listen:
            host = distributed.comm.get_address_host(distributed.get_worker().address)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self._listener = socket.create_server((host, 0), family=family)
            self._endpoint = self._listener.getsockname()[:2]
            self._secret = secrets.token_bytes(SECRET_BYTES)
            self._engine = spec.engine
            threading.Thread(target=self._serve, args=(spec.accept_timeout,),
                             name="partrain-chunk-server", daemon=True).start()

    def endpoint(self) -> tuple[str, int, bytes]:
        """(host, port, secret) of this server's socket (see `authenticate_master`)."""
        return (*self._endpoint, self._secret)

    def _serve(self, accept_timeout: float) -> None:
        """The socket's thread: accept connections until one proves it is the engine (each
        other one is closed after at most HANDSHAKE_S), then answer that one's requests
        until it closes the connection (then drop the model and data). Nobody proven within
        `accept_timeout`: end (the engine uses another transport or went away)."""
        deadline = time.monotonic() + accept_timeout
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._listener.settimeout(remaining)
                try:
                    connection, _ = self._listener.accept()
                except OSError:  # the timeout, or close() closed the listener
                    return
                if authenticate_engine(connection, self._secret):
                    break
                connection.close()
        finally:
            self._listener.close()
        serving = _SERVING.setdefault(self._engine, set())
        serving.add(self)
        with connection:
            connection.settimeout(None)
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                n_state = (self.model.n_params + self.model.buffers.size) \
                    * self.model.dtype.itemsize
                while True:
                    # between steps: a closing worker ends a connection idle for LEAVE_IDLE_S
                    # (the engine sees it closed before its next step and leaves it out)
                    idle_since = time.monotonic()
                    while not select.select([connection], [], [], IDLE_CHECK_S)[0]:
                        if self._engine in _LEAVING \
                                and time.monotonic() - idle_since > LEAVE_IDLE_S:
                            return
                    kind, n_plan, n_state_sent = HEADER.unpack(receive(connection,
                                                                       HEADER.size))
                    if kind != STEP or n_state_sent != n_state or n_plan % 8:
                        return
                    plan = np.frombuffer(receive(connection, n_plan), np.int64)
                    state = np.frombuffer(receive(connection, n_state), self.model.dtype)
                    values, info, error = self.step(state, plan)
                    if error is not None:
                        send_message(connection, FAILED, pickle.dumps(error), info)
                    elif self._engine in _LEAVING:  # the worker is closing: the last reply
                        send_message(connection, LEAVING, values, info)
                        return
                    else:
                        send_message(connection, OK, values, info)
            except (OSError, EOFError):  # the engine closed the connection or went away
                return
            finally:
                serving.discard(self)
                self.model = self.X = self.y = None

    def step(self, state: np.ndarray, plan: np.ndarray) -> tuple:
        """Compute the chunks `plan` names (see `pack_plan`) with the parameters and buffers
        in `state`.

        The chunks' gradients are added up along the tree within the plan's range of chunks
        (`reduce_tree(..., inside=...)`). Returns (values, info, None): `values` holds the
        gradient rows still needed after that, those of the slots `tree_roots` names, then
        every chunk's batch statistics, flat, in the model's dtype; `info` the seconds spent,
        then (loss sum, n correct) per chunk, in float64. A chunk's exception comes back as
        (None, info, (exception, traceback text)) instead of being raised: an exception
        from the call itself is then always about the cluster, never about a chunk.
        """
        t0 = time.perf_counter()
        try:
            step_key, n_chunks, chunk_ids, chunks, batch_idx = unpack_plan(plan)
            model = self.model
            n_params = state.size - model.buffers.size
            params, model.buffers = state[:n_params], state[n_params:]
            first = chunk_ids[0]
            inside = (first, first + len(chunk_ids))  # chunk_ids are contiguous
            roots = [k - first for k in tree_roots(n_chunks, inside)]
            n_rows = len(roots)
            grads = self._grad_rows(len(chunk_ids), n_params, state.dtype)
            values = np.empty(n_rows * n_params + len(chunk_ids) * model.buffers.size,
                              state.dtype)
            stats = values[n_rows * n_params:].reshape(len(chunk_ids), model.buffers.size)
            info = np.empty(1 + 2 * len(chunk_ids), np.float64)
            for i, (k, bounds) in enumerate(zip(chunk_ids, chunks)):
                info[1 + 2 * i:3 + 2 * i] = compute_chunk(
                    model, params, self.X, self.y, batch_idx, k, bounds, step_key, grads[i],
                    stats[i] if model.buffers.size else None)
            reduce_tree(grads, n_chunks, inside=inside, offset=first)
            for row, k in zip(values[:n_rows * n_params].reshape(n_rows, n_params), roots):
                row[...] = grads[k]
            info[0] = time.perf_counter() - t0
            return values, info, None
        except Exception as exc:
            return None, np.array([time.perf_counter() - t0]), _portable(exc)

    def _grad_rows(self, n_rows: int, n_params: int, dtype) -> np.ndarray:
        """An (n_rows, n_params) buffer for a step's chunk gradients, allocated once and
        reused (only the partial sums are copied into the reply)."""
        grads = self._grads
        if grads is None or len(grads) < n_rows or grads.shape[1] != n_params \
                or grads.dtype != dtype:
            grads = self._grads = np.empty((n_rows, n_params), dtype)
        return grads[:n_rows]

    async def step_inline(self, state: np.ndarray, plan: np.ndarray) -> tuple:
        """`step`, run on the worker's event loop (which it blocks meanwhile)."""
        return self.step(state, plan)


def pack_plan(step_key: tuple[int, ...], n_chunks: int, group: list,
              batch_idx: np.ndarray) -> np.ndarray:
    """One int64 array for a step's (step key, total chunk count of the step, [(chunk id,
    (start, stop)), ...] of one worker's contiguous group, batch indices): one frame to
    serialise instead of one per Python object."""
    ids = [k for k, _ in group]
    bounds = [b for _, (start, stop) in group for b in (start, stop)]
    return np.concatenate([[len(step_key)], step_key, [n_chunks, len(ids)], ids, bounds,
                           batch_idx]).astype(np.int64)


def unpack_plan(plan: np.ndarray) -> tuple:
    """(step key, chunk count, chunk ids, chunk bounds, batch indices) from `pack_plan`'s
    array."""
    n_key = int(plan[0])
    step_key = tuple(int(k) for k in plan[1:1 + n_key])
    n_chunks, n_ids = int(plan[1 + n_key]), int(plan[2 + n_key])
    at = 3 + n_key
    ids = [int(k) for k in plan[at:at + n_ids]]
    bounds = plan[at + n_ids:at + 3 * n_ids].reshape(n_ids, 2)
    return (step_key, n_chunks, ids, [(int(a), int(b)) for a, b in bounds],
            plan[at + 3 * n_ids:])


# The socket transport: a request is HEADER (STEP, plan bytes, state bytes), the plan (int64)
# and the state (the model's dtype); a reply is HEADER (OK, values bytes, info bytes), the
# values and the info (float64), or (FAILED, pickled (exception, traceback) bytes, info bytes);
# LEAVING is OK from a server whose worker is closing, its last reply. Before any of it, both
# ends prove they know the server's secret (see authenticate_master).
HEADER = struct.Struct("<QQQ")
STEP, OK, FAILED, LEAVING = 1, 2, 3, 4
SECRET_BYTES = 16
NONCE_BYTES = 16
MAC_BYTES = 32  # HMAC-SHA256
HELLO = b"partrain-chunks-1"  # the engine's first bytes: protocol name and version
HANDSHAKE_S = 2.0  # a server closes a connection that has not proven itself by then


def receive(sock: socket.socket, n_bytes: int, into: np.ndarray | None = None,
            on_timeout=None) -> memoryview:
    """Exactly `n_bytes` from `sock` (into `into`'s buffer when given); EOFError if the peer
    closed the connection. A socket timeout calls `on_timeout()` (which may raise), then
    reading goes on."""
    buffer = memoryview(bytearray(n_bytes) if into is None else into).cast("B")
    view = buffer
    while view.nbytes:
        try:
            n = sock.recv_into(view)
        except TimeoutError:
            if on_timeout is None:
                raise
            on_timeout()
            continue
        if n == 0:
            raise EOFError("connection closed by the peer")
        view = view[n:]
    return buffer


def send_message(sock: socket.socket, kind: int, first, second, on_timeout=None) -> None:
    """HEADER then the two buffers (NumPy arrays or bytes), without copying them. A socket
    timeout calls `on_timeout()` (which may raise), then sending goes on."""
    first, second = memoryview(first).cast("B"), memoryview(second).cast("B")
    for view in (HEADER.pack(kind, first.nbytes, second.nbytes), first, second):
        send_all(sock, view, on_timeout)


def send_all(sock: socket.socket, data, on_timeout=None) -> None:
    """All of `data` (bytes or a byte memoryview); a socket timeout calls `on_timeout()`
    (which may raise), then sending goes on."""
    view = memoryview(data)
    while view.nbytes:
        try:
            view = view[sock.send(view):]
        except TimeoutError:
            if on_timeout is None:
                raise
            on_timeout()


def _mac(secret: bytes, role: bytes, *nonces: bytes) -> bytes:
    """HMAC-SHA256 of `role` and the nonces under `secret`."""
    return hmac.new(secret, b"".join((role, *nonces)), hashlib.sha256).digest()


def _deadline_waiter(seconds: float, check_interrupt=None):
    """An `on_timeout` for `receive`: calls `check_interrupt`, raises TimeoutError once
    `seconds` have passed."""
    deadline = time.monotonic() + seconds

    def waiting():
        if check_interrupt is not None:
            check_interrupt()
        if time.monotonic() > deadline:
            raise TimeoutError("no answer in time")

    return waiting


def authenticate_master(sock: socket.socket, secret: bytes, timeout: float,
                        check_interrupt=None) -> None:
    """The engine's side of the mutual handshake on a new connection to a ChunkServer.

    engine -> server: HELLO, nonce_e; server -> engine: nonce_s, HMAC(secret, "server" +
    nonce_e + nonce_s); engine -> server: HMAC(secret, "engine" + nonce_s + nonce_e);
    server -> engine: one byte OK. Each side sends its proof only for a fresh nonce of the
    other, so neither a replayed reply nor a server that does not know the secret passes;
    every message has a fixed size. ConnectionError if the server does not prove itself
    within `timeout` seconds (`check_interrupt` is called every WAIT_SLICE_S meanwhile).
    """
    sock.settimeout(WAIT_SLICE_S)
    waiting = _deadline_waiter(timeout, check_interrupt)
    nonce_e = secrets.token_bytes(NONCE_BYTES)
    try:
        send_all(sock, HELLO + nonce_e, waiting)
        answer = bytes(receive(sock, NONCE_BYTES + MAC_BYTES, on_timeout=waiting))
        nonce_s, proof = answer[:NONCE_BYTES], answer[NONCE_BYTES:]
        if not hmac.compare_digest(proof, _mac(secret, b"server", nonce_e, nonce_s)):
            raise ConnectionError("the server did not prove it knows the secret")
        send_all(sock, _mac(secret, b"engine", nonce_s, nonce_e), waiting)
        if bytes(receive(sock, 1, on_timeout=waiting)) != bytes([OK]):
            raise ConnectionError("the server refused the engine's proof")
    except (TimeoutError, EOFError) as exc:
        raise ConnectionError(f"the handshake with the server failed ({exc})") from None


def authenticate_engine(sock: socket.socket, secret: bytes) -> bool:
    """The ChunkServer's side of `authenticate_master`, within HANDSHAKE_S seconds: True if
    the peer proved it knows `secret`. Reads fixed sizes only; unpickles nothing."""
    sock.settimeout(WAIT_SLICE_S)
    waiting = _deadline_waiter(HANDSHAKE_S)
    try:
        hello = bytes(receive(sock, len(HELLO) + NONCE_BYTES, on_timeout=waiting))
        if not hmac.compare_digest(hello[:len(HELLO)], HELLO):
            return False
        nonce_e, nonce_s = hello[len(HELLO):], secrets.token_bytes(NONCE_BYTES)
        send_all(sock, nonce_s + _mac(secret, b"server", nonce_e, nonce_s), waiting)
        proof = bytes(receive(sock, MAC_BYTES, on_timeout=waiting))
        if not hmac.compare_digest(proof, _mac(secret, b"engine", nonce_s, nonce_e)):
            return False
        send_all(sock, bytes([OK]), waiting)
        return True
    except (OSError, EOFError):  # (TimeoutError is an OSError)
        return False


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

# The worker processes of a LocalCluster are started by its nannies with multiprocessing's
# "spawn", which runs the parent's main script again in each child (as `__mp_main__`) before
# anything else. A script that creates its Trainer at top level, without
# `if __name__ == "__main__":`, would so start a cluster inside every worker's start-up, and
# the workers fail ("Nanny failed to start"). Our workers need nothing from the user's script
# (custom layers come from importable modules, see `worker_imports`), so, as loky does for its
# workers, the processes a nanny starts while a cluster of ours is open are spawned without
# the main module: `multiprocessing.spawn.get_preparation_data` is wrapped (once) to leave out
# its "init_main_from_path/name" entries for them. Other processes are untouched.
NANNY_PROCESS_NAME = "Dask Worker process (from Nanny)"  # distributed.nanny names them so
_OWN_CLUSTERS = {"open": 0}  # LocalClusters started by a DaskEngine and not closed yet


def _preparation_without_main(get_preparation_data):
    """`get_preparation_data` minus the main module for our clusters' worker processes."""
    def wrapped(name):
        data = get_preparation_data(name)
        if _OWN_CLUSTERS["open"] and name == NANNY_PROCESS_NAME:
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
        return data

    wrapped.partrain_wrapped = True
    return wrapped


def _spawn_workers_without_main() -> None:
    """Install the wrapper above (idempotent)."""
    spawn = multiprocessing.spawn
    if not getattr(spawn.get_preparation_data, "partrain_wrapped", False):
        spawn.get_preparation_data = _preparation_without_main(spawn.get_preparation_data)



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


# A Dask comm opens with a handshake: 8 bytes giving the length of what follows, then a few
# msgpack'd frames (about 100 bytes) naming "compression", "python" and "pickle-protocol".
HANDSHAKE_MAX_BYTES = 1 << 16


def check_scheduler_address(address: str) -> None:
    """ValueError (one line) for a scheduler address the engine does not connect to by
    itself: only tcp:// (or no scheme, which Dask reads as tcp://)."""
    scheme = address.split("://", 1)[0] if "://" in address else "tcp"
    if scheme != "tcp":
        raise ValueError(
            f"A Dask scheduler given by address must be tcp://HOST:PORT, got {address!r}: "
            f"{scheme}:// needs security or transport settings; pass a distributed.Client "
            "made with them instead (scheduler=Client(address, security=...)).")


def probe_scheduler(address: str, timeout: float, check_interrupt) -> None:
    """Check that a Dask comm answers at the tcp `address` before Dask itself connects.

    Dask's own connect waits for the peer's handshake without a time limit (a port answered
    by an HTTP server hung for good) and sizes a buffer from its first 8 bytes (an
    "HTTP/1.1" reply asked for exabytes). Here the handshake is read with a deadline of
    `timeout` seconds and a bounded length, `check_interrupt()` called every WAIT_SLICE_S;
    ConnectionError, one line, when it does not come or is not a Dask handshake.
    """
    host, port = distributed.comm.get_address_host_port(address)
    deadline = time.monotonic() + timeout

    def waiting():
        check_interrupt()
        if time.monotonic() > deadline:
            raise TimeoutError

    def fail(what: str):
        return ConnectionError(
            f"Cannot reach the Dask scheduler at {address!r}: {what}. Start one with "
            f"`dask scheduler` and its workers with `dask worker {address}`.")

    while True:  # a scheduler just being started refuses connections for a moment
        try:
            sock = socket.create_connection((host, port), timeout=WAIT_SLICE_S)
            break
        except OSError as exc:
            try:
                waiting()
            except TimeoutError:
                raise fail(f"no connection within {timeout:g} s ({exc})") from None
            time.sleep(WAIT_SLICE_S)
    with sock:
        try:
            sock.settimeout(WAIT_SLICE_S)
            head = bytes(receive(sock, 8, on_timeout=waiting))
            (n_bytes,) = struct.unpack("<Q", head)
            if not 0 < n_bytes <= HANDSHAKE_MAX_BYTES:
                raise fail(f"what answers there is not a Dask scheduler (it sent {head!r})")
            body = bytes(receive(sock, n_bytes, on_timeout=waiting))
        except TimeoutError:
            raise fail(f"something accepted the connection but sent no Dask handshake "
                       f"within {timeout:g} s (is it a Dask scheduler's port?)") from None
        except (OSError, EOFError) as exc:
            raise fail(f"the connection failed during the handshake ({exc})") from None
        if b"pickle-protocol" not in body:
            raise fail("what answers there is not a Dask scheduler (no Dask handshake)")


def _resolve(transport: str, address: str) -> str:
    """The transport "auto" stands for with a scheduler at `address`."""
    if transport != "auto":
        return transport
    return "socket" if address.startswith("tcp://") else "actor"


def _hung_up(sock: socket.socket) -> bool:
    """Whether the peer has closed `sock` (a server whose worker is closing ends its idle
    connection); never waits."""
    try:
        if not select.select([sock], [], [], 0)[0]:
            return False  # nothing to read: open (a server sends nothing unasked)
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class _WorkerLost(Exception):
    """Internal: a worker holding a ChunkServer could not be reached or went away."""


@dataclass(eq=False)
class _Server:
    address: str
    future: distributed.Future  # keeps the actor alive on its worker
    actor: distributed.Actor | None  # None once a socket holds the server (transport "socket")
    sock: socket.socket | None = None  # transport "socket": the connection to its thread


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
        shared between all the cluster's worker processes, those that join or leave during
        a fit included.
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
        (and connect to) a `ChunkServer` on a worker.
    transport : "auto", "socket" or "actor"
        How steps travel: over each server's own TCP connection, or as Dask actor calls.
        "auto" is "socket" when the scheduler's address is tcp://, else "actor".

    Raises
    ------
    ConnectionError
        The scheduler cannot be reached, or it has no worker, within `connect_timeout`.

    Notes
    -----
    The first step after `bind` scatters the training set to every worker and starts one
    `ChunkServer` actor per worker process, which keeps it. Per step the master sends each
    server the state vector and its chunks, directly (the "actor" transport needs a client
    with `direct_to_workers=True`: for a Client passed without it, the engine opens a second
    one of its own), and waits, checking for an interrupt every WAIT_SLICE_S. The scheduler is
    asked which workers exist when a worker announces that it joined (`ChunkServerPlugin`,
    transport "socket") and every WORKERS_REFRESH_S seconds: a new worker's server starts in
    the background and computes from the first step after it is ready; a worker retired or
    scaled away answers its last step and is left out, no step failing. A worker that cannot
    be reached is dropped and the step re-run on the others, results unchanged. `last_bytes`
    records what the last step moved.
    """

    def __init__(self, model: Sequential, chunk_size: int, n_jobs: int, batch_size: int,
                 blas_threads: int = 1, max_restarts: int = 3,
                 scheduler: str | distributed.Client | None = None, step_timeout: float = 300.0,
                 connect_timeout: float = 10.0, transport: str = "auto",
                 check_interrupt=None):
        super().__init__(model, chunk_size, batch_size, check_interrupt)
        if transport not in ("auto", "socket", "actor"):
            raise ValueError(f"`transport` must be 'auto', 'socket' or 'actor', got "
                             f"{transport!r}.")
        self.max_restarts = int(max_restarts)
        self.step_timeout = float(step_timeout)
        self.connect_timeout = float(connect_timeout)
        self._token = secrets.token_hex(6)
        self._serial = itertools.count()
        self._data: list[distributed.Future] = []
        self._training_set: tuple[np.ndarray, np.ndarray] | None = None
        self._servers: list[_Server] = []
        self._pending: dict[str, distributed.Future] = {}  # servers starting, by worker
        self._ready: queue.Queue = queue.Queue()  # started servers, from their threads
        self._membership_changed = False  # set by _on_event, on the client's event loop
        self._listed: set[str] | None = None  # the workers the scheduler listed last
        self._relister: threading.Thread | None = None  # a re-listing in the background
        self._relist_now = True  # list the workers before the next step (none yet, or lost)
        # _servers, _pending, _lost, _data: changed by the steps' thread and the re-listing
        self._pool_lock = threading.RLock()
        self._lost: dict[str, float] = {}  # failed workers' addresses: when they failed
        self._servers_time = -np.inf
        self._last_compute = np.inf  # slowest worker's compute seconds in the last step
        self.last_bytes = {"params": 0, "workers": 0, "grads": 0}
        self._cluster = self._client = None
        self._owns_client = True
        self._counted = False  # counted in _OWN_CLUSTERS until close()
        self._plugin = None  # our ChunkServerPlugin, once registered
        if scheduler is None:
            _spawn_workers_without_main()
            _OWN_CLUSTERS["open"] += 1  # (undone by close(), also when the start fails)
            self._counted = True
            with dask.config.set(LOCAL_CLUSTER_CONFIG):
                try:
                    self._cluster = distributed.LocalCluster(
                        n_workers=n_jobs, threads_per_worker=1, processes=True,
                        dashboard_address=None,
                        # no dashboard; its HTTP endpoints on a free port, not on a busy 8787
                        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
                except BaseException:
                    self.close()
                    raise
            self.address = self._cluster.scheduler_address
            self._client = distributed.Client(self._cluster, set_as_default=False,
                                              direct_to_workers=True)
        elif isinstance(scheduler, str):
            self.address = scheduler
            self._client = self._connect(scheduler)
        elif isinstance(scheduler, distributed.Client):
            self.address = scheduler.scheduler.address
            if scheduler.direct_to_workers or _resolve(transport, self.address) == "socket":
                self._client, self._owns_client = scheduler, False
            else:  # actor calls would be relayed by the scheduler: a client of our own
                self._client = self._connect(self.address, security=scheduler.security)
        else:
            raise ValueError(
                "`scheduler` must be None, an address 'tcp://host:port' or a distributed.Client, "
                f"got {type(scheduler).__name__}."
            )
        self.transport = _resolve(transport, self.address)
        self._spec = ServerSpec(model.config(), worker_imports(model), int(blas_threads),
                                listen=self.transport == "socket",
                                accept_timeout=max(60.0, 2 * self.connect_timeout),
                                engine=self._token)
        self._wait_for_a_worker()
        if self.transport == "socket":  # (an actor's worker cannot be retired anyway)
            self._plugin = ChunkServerPlugin(self._token)
            self._client.subscribe_topic(self._plugin.topic, self._on_event)
            self._client.register_plugin(self._plugin)

    def _connect(self, address: str, **options) -> distributed.Client:
        """A client of the scheduler at `address`; ConnectionError (one line) when nothing
        that speaks Dask answers there within `connect_timeout`."""
        if "security" not in options:  # (a Client given by the caller brings its own)
            check_scheduler_address(address)
            probe_scheduler(address, self.connect_timeout, self.check_interrupt)
        try:
            return distributed.Client(address, timeout=self.connect_timeout,
                                      set_as_default=False, direct_to_workers=True, **options)
        except (OSError, distributed.TimeoutError, MemoryError) as exc:
            raise ConnectionError(
                f"Cannot reach the Dask scheduler at {address!r} within "
                f"{self.connect_timeout:g} s ({type(exc).__name__}: {exc}). Start one with "
                f"`dask scheduler` and its workers with `dask worker {address}`."
            ) from None

    def _wait_for_a_worker(self) -> None:
        """Wait up to `connect_timeout` for the cluster's first worker, checking for an
        interrupt every WAIT_SLICE_S; ConnectionError (one line) if none comes."""
        deadline = time.monotonic() + self.connect_timeout
        while True:
            try:
                self.check_interrupt()
                self._client.wait_for_workers(1, timeout=WAIT_SLICE_S)
                return
            except distributed.TimeoutError:
                if time.monotonic() < deadline:
                    continue
                self.close()
                raise ConnectionError(
                    f"The Dask scheduler at {self.address!r} has no worker after "
                    f"{self.connect_timeout:g} s. Start some with `dask worker {self.address}`."
                ) from None
            except BaseException:
                self.close()
                raise

    # -- the servers

    def _bind_data(self, X, y):
        self._join_relister()
        with self._pool_lock:
            self._training_set = (X, y)  # kept to send it again if the workers holding it die
            self._drop_servers(self._servers)  # they hold the previous training set
            for future in self._pending.values():  # (discarded by _adopt_ready when ready)
                future.release()
            self._pending, self._data = {}, []

    def _drop_servers(self, servers: list[_Server], lost: bool = False) -> None:
        """Forget `servers`; `lost`: their workers failed, so start no server there again
        while the scheduler lists them, for up to LOST_WORKER_S seconds."""
        with self._pool_lock:
            for server in list(servers):
                if server in self._servers:
                    self._servers.remove(server)
                    self._discard(server)  # its socket thread ends, dropping model and data
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
        """The ChunkServers that compute this step.

        Servers that became ready since the last step join now; those whose worker is gone
        (connection ended, or no longer listed by the scheduler) are dropped. The cluster's
        workers are re-listed (one round trip to the scheduler, and the submission of a
        ChunkServer to each new worker, `_start_server`) when the scheduler announced a
        change (a worker joined: `_on_event`) and every WORKERS_REFRESH_S anyway: in a
        thread of its own while servers are left (the step does not wait for it: it took
        2-4 ms here, a third of an mnist_cnn step), in the step itself when none is left or a
        worker was just lost. A new server joins the first step after it is ready. Only with
        no server at all does the step wait (for the first ready one, up to
        `connect_timeout`)."""
        self._adopt_ready()
        self._drop_servers([s for s in self._servers if s.sock is not None and _hung_up(s.sock)
                            or self._listed is not None and s.address not in self._listed])
        stale = time.monotonic() - self._servers_time > WORKERS_REFRESH_S
        if self._servers and not self._relist_now:
            if stale or self._membership_changed:
                self._relist_in_background(step_key)
            return self._servers
        self._join_relister()
        stale = True
        starting = not self._servers  # then wait for all the servers being started
        deadline = time.monotonic() + self.connect_timeout
        while True:
            self._check_scheduler(step_key)
            if self._membership_changed or stale or not (self._servers or self._pending):
                self._relist_workers(step_key)
                self._drop_servers([s for s in self._servers if s.address not in self._listed])
                stale = self._relist_now = False
            if self._servers and (not starting or not self._pending
                                  or time.monotonic() > deadline):
                return self._servers
            if time.monotonic() > deadline and not self._servers:
                raise WorkerCrashError(
                    f"The Dask cluster at {self.address} has had no usable worker for "
                    f"{self.connect_timeout:g} s (step key {step_key})."
                )
            self.check_interrupt()
            time.sleep(WAIT_SLICE_S / 10 if self._pending else WAIT_SLICE_S)
            self._adopt_ready()

    def wait_for_servers(self, n_workers: int, timeout: float = 30.0) -> int:
        """Wait until `n_workers` workers hold a ready ChunkServer (e.g. after scaling the
        cluster up: steps never wait for new workers, they use them once ready), or for
        `timeout` seconds; returns how many do. Needs a bound training set (a `fit` or
        `session` has started)."""
        deadline = time.monotonic() + timeout
        while True:
            self._adopt_ready()
            if len(self._servers) >= n_workers or time.monotonic() > deadline:
                return len(self._servers)
            if not self._pending:
                self._join_relister()
                self._relist_workers(("wait_for_servers",))
                self._drop_servers([s for s in self._servers if s.address not in self._listed])
            self.check_interrupt()
            time.sleep(WAIT_SLICE_S / 10)

    def _relist_workers(self, step_key: tuple) -> None:
        """Ask the scheduler for its workers (`self._listed`: the steps' thread drops the
        servers of those gone); start servers on the new ones (in the background)."""
        self._membership_changed = False
        try:
            workers = set(self._client.nthreads())  # one round trip to the scheduler
        except OSError as exc:
            self._check_scheduler(step_key)
            raise WorkerCrashError(f"The Dask scheduler at {self.address} did not answer "
                                   f"at step key {step_key} ({exc}).") from None
        with self._pool_lock:
            self._listed = workers
            self._lost = {address: when for address, when in self._lost.items()
                          if address in workers and time.monotonic() - when < LOST_WORKER_S}
            known = {s.address for s in self._servers} | set(self._lost) | set(self._pending)
            for address in sorted(workers - known):
                self._start_server(address)
        self._servers_time = time.monotonic()

    def _relist_in_background(self, step_key: tuple) -> None:
        """`_relist_workers` in a thread of its own (one at a time). A failure is left for
        the next steps: the workers stay due for a re-listing, and a lost scheduler is
        reported by the next step's `_check_scheduler`."""
        if self._relister is not None and self._relister.is_alive():
            return

        def relist():
            try:
                self._relist_workers(step_key)
            except Exception:
                self._membership_changed = True  # (retried at the next step)

        self._relister = threading.Thread(target=relist, name="partrain-relist", daemon=True)
        self._relister.start()

    def _join_relister(self) -> None:
        """Wait for a re-listing in the background to end (bounded by `connect_timeout`)."""
        if self._relister is not None:
            self._relister.join(self.connect_timeout)
            self._relister = None

    def _on_event(self, event) -> None:
        """Called by the client, on its event loop, when a worker joined (an event of our
        ChunkServerPlugin): the next step re-lists the workers."""
        self._membership_changed = True

    def _start_server(self, address: str) -> None:
        """Start a ChunkServer on the worker at `address` without waiting for it: a thread
        waits for it (the worker may first fetch the training set from another worker),
        connects to it and hands it to `_adopt_ready` through `self._ready`."""
        client = self._client
        if not self._data or any(f.status != "finished" for f in self._data):
            try:  # (every worker holding the training set is gone: send it again)
                self._data = client.scatter(list(self._training_set), broadcast=True,
                                            hash=False, timeout=self.connect_timeout)
            except (OSError, distributed.TimeoutError):
                return  # no worker to hold it right now: the next re-listing retries
        X, y = self._data
        future = client.submit(ChunkServer, self._spec, X, y, actor=True, workers=[address],
                               allow_other_workers=False, pure=False,
                               key=f"partrain-server-{self._token}-{next(self._serial)}")
        self._pending[address] = future
        threading.Thread(target=self._connect_when_ready, args=(address, future),
                         name="partrain-server-start", daemon=True).start()

    def _connect_when_ready(self, address: str, future: distributed.Future) -> None:
        """(Background thread.) Wait for the server `future`, connect to it (transport
        "socket"), and put the ready `_Server`, or (address, exception), into `self._ready`."""
        sock = None
        try:
            with self._client.as_current():  # the actor handle binds to this client
                actor = future.result(timeout=self.connect_timeout)
            if self.transport == "socket":
                sock = self._open_socket(actor)
                # The socket holds the server from now on: the actor is cancelled (the
                # scheduler forgets it; its worker drops its reference, not the server), so
                # that the scheduler can retire that worker: Dask never retires a worker
                # holding an actor. The worker then waits for the step in flight
                # (`ChunkServerPlugin`), whose reply says it is leaving.
                future.cancel()
                actor = None
            self._ready.put(_Server(address, future, actor, sock))
            if self._client is None:  # closed meanwhile: nobody will adopt it
                self._adopt_ready()
        except Exception as exc:
            if sock is not None:
                sock.close()
            self._ready.put((address, exc))

    def _adopt_ready(self) -> None:
        """Move the servers that became ready into the pool (never waits for them). A server that
        failed to start is skipped (its worker is not used for LOST_WORKER_S), with a warning
        once a pool exists; the exception of a server that raised itself (e.g. a module it
        cannot import) is raised when no server runs."""
        with self._pool_lock:  # (held by a re-listing while it submits servers)
            while True:
                try:
                    ready = self._ready.get_nowait()
                except queue.Empty:
                    break
                if isinstance(ready, _Server):
                    if self._pending.pop(ready.address, None) is not ready.future \
                            or self._client is None:
                        self._discard(ready)  # (started for a training set bound since)
                        continue
                    self._servers.append(ready)
                    self._servers.sort(key=lambda s: s.address)
                    continue
                address, exc = ready
                future = self._pending.pop(address, None)
                if future is None:
                    continue
                future.release()
                self._lost[address] = time.monotonic()
                if self._client is None:  # (closing)
                    continue
                if future.status == "error" and not self._servers and not self._pending:
                    raise exc  # the server's own exception, e.g. ModuleNotFoundError
                if future.status == "error" or self.transport == "socket":
                    warnings.warn(
                        f"Cannot start or reach the partrain ChunkServer on the Dask worker at "
                        f"{address} ({type(exc).__name__}: {exc}); that worker is not used."
                        + (" With backend_options={'transport': 'actor'} steps travel through "
                           "Dask instead." if self.transport == "socket" else ""),
                        RuntimeWarning, stacklevel=3)

    @staticmethod
    def _discard(server: _Server) -> None:
        """Close a server that will not be used."""
        if server.sock is not None:
            server.sock.close()
        server.future.release()

    def _open_socket(self, actor) -> socket.socket:
        """A connection to the socket of `actor` (a ChunkServer), both ends authenticated
        (`authenticate_master`); ConnectionError for a server that does not prove itself."""
        host, port, secret = actor.endpoint().result(timeout=self.connect_timeout)
        sock = socket.create_connection((host, port), timeout=self.connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            authenticate_master(sock, secret, self.connect_timeout)
        except BaseException:
            sock.close()
            raise
        return sock

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
                self._relist_now = True  # list the workers again before the re-run
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
        """One attempt at a step: each server's chunks out, then wait for all replies."""
        groups = split_evenly(list(enumerate(chunks)), len(servers))
        servers = servers[:len(groups)]
        plans = [pack_plan(step_key, len(chunks), group, batch_idx) for group in groups]
        deadline = time.monotonic() + self.step_timeout

        def waiting():  # called every WAIT_SLICE_S while a reply is awaited
            self.check_interrupt()
            if time.monotonic() >= deadline:
                raise WorkerCrashError(
                    f"A step took longer than step_timeout={self.step_timeout:g} s on the "
                    f"Dask cluster at {self.address} (step key {step_key}). Are its workers "
                    "alive and not overloaded?")

        exchange = self._exchange_sockets if self.transport == "socket" else \
            self._exchange_actors
        wait_slice = max(1e-4, min(WAIT_SLICE_S, self.step_timeout))
        outcomes = exchange(servers, state, plans, waiting, wait_slice)
        # servers whose worker is closing answered for the last time: not used from now on
        self._drop_servers([server for server, outcome in zip(servers, outcomes)
                            if isinstance(outcome, tuple) and len(outcome) == 4])
        waiting()  # the step may have ended between two checks, yet too late
        for outcome in outcomes:  # a chunk's own exception first: a re-run would raise it too
            if isinstance(outcome, tuple) and outcome[2] is not None:
                exc, text = outcome[2]
                raise exc from RemoteTraceback(text)
        lost = [(server, outcome) for server, outcome in zip(servers, outcomes)
                if not isinstance(outcome, tuple)]
        if lost:
            self._drop_servers([server for server, _ in lost], lost=True)
            raise _WorkerLost("; ".join(f"{server.address}: {type(exc).__name__}: {exc}"
                                        for server, exc in lost))
        n_params, n_buffers = self.model.n_params, self.model.buffers.size
        n_bytes, busy = 0, []
        for group, (values, info, *_) in zip(groups, outcomes):
            (first, stop), n = chunk_range(group), len(group)
            roots = tree_roots(len(chunks), (first, stop))  # the partial sums it sent
            n_rows = len(roots)
            self.slots.grad[list(roots)] = values[:n_rows * n_params].reshape(n_rows, n_params)
            self.slots.stats[first:stop] = values[n_rows * n_params:].reshape(n, n_buffers)
            self.slots.results[first:stop] = info[1:].reshape(n, 2)
            n_bytes += values.nbytes
            busy.append(float(info[0]))
        self._last_compute = max(busy)
        self.last_bytes = {"params": state.nbytes, "workers": len(servers), "grads": n_bytes}
        return StepRun(busy, [chunk_range(group) for group in groups])

    def _exchange_sockets(self, servers, state, plans, waiting, wait_slice) -> list:
        """Transport "socket": send every request, then read every reply, in server order,
        calling `waiting` every `wait_slice` seconds of waiting. Each outcome is (values,
        info, error), (values, info, None, LEAVING) from a server whose worker is closing, or
        the exception that lost its worker."""
        outcomes: list = [None] * len(servers)
        try:
            for i, (server, plan) in enumerate(zip(servers, plans)):
                server.sock.settimeout(wait_slice)
                try:
                    send_message(server.sock, STEP, plan, state, waiting)
                except OSError as exc:
                    outcomes[i] = exc
            for i, server in enumerate(servers):
                if outcomes[i] is None:
                    try:
                        outcomes[i] = self._reply(server.sock, waiting)
                    except (OSError, EOFError) as exc:
                        outcomes[i] = exc
        except BaseException:  # interrupted or timed out mid-message: the streams are lost
            self._drop_servers(servers)
            raise
        return outcomes

    def _reply(self, sock: socket.socket, waiting) -> tuple:
        """One server's reply: (values, info, None), (values, info, None, LEAVING) or
        (None, info, (exception, text))."""
        kind, n_first, n_info = HEADER.unpack(receive(sock, HEADER.size, on_timeout=waiting))
        if kind in (OK, LEAVING):
            values = np.empty(n_first // np.dtype(self.model.dtype).itemsize, self.model.dtype)
            receive(sock, n_first, values, waiting)
        else:
            error = pickle.loads(receive(sock, n_first, on_timeout=waiting))
        info = np.empty(n_info // 8, np.float64)
        receive(sock, n_info, info, waiting)
        if kind == FAILED:
            return None, info, error
        return (values, info, None) + ((LEAVING,) if kind == LEAVING else ())

    def _exchange_actors(self, servers, state, plans, waiting, wait_slice) -> list:
        """Transport "actor": a `step` call per server through Dask, waited for in slices
        of `wait_slice` seconds, calling `waiting` between them."""
        inline = self._last_compute < INLINE_MAX_S
        requests = list(zip(servers, plans))
        calls: list = [None] * len(requests)
        while True:
            waiting()
            try:
                return self._client.sync(self._call_and_wait, requests, state, calls, inline,
                                         callback_timeout=wait_slice)
            except TimeoutError:
                continue

    @staticmethod
    async def _call_and_wait(requests: list, state, calls: list, inline: bool) -> list:
        """On the client's event loop: start the `step` calls not started yet (`calls[i]` is
        None), then wait for all; each outcome is the call's result, or the exception that
        says its worker could not be reached."""
        for i, (server, plan) in enumerate(requests):
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

    @property
    def n_workers(self) -> int:
        """The cluster's worker processes now (one round trip to the scheduler)."""
        return len(self._client.nthreads())

    def worker_pids(self) -> list[int]:
        """Process ids of the cluster's workers running on this machine."""
        here = socket.gethostname()
        found = self._client.run(_host_and_pid, on_error="ignore").values()
        return [pid for host, pid in found if host == here]

    def close(self, kill: bool = False) -> None:
        """Release the servers and data; close the client and cluster created here
        (idempotent). `kill` changes nothing: a step in progress on a worker finishes there."""
        self._join_relister()
        client, cluster, self._client, self._cluster = self._client, self._cluster, None, None
        for server in self._servers:  # each server's socket thread ends now, dropping its
            if server.sock is not None:  # model and data (not whenever the socket is collected)
                server.sock.close()
        self._adopt_ready()  # servers that became ready meanwhile: discarded (no client)
        if client is not None and client.status == "running":
            # cancelled, not just dropped: the scheduler forgets them before any worker closes
            client.cancel([s.future for s in self._servers] + list(self._pending.values())
                          + self._data)
            if self._plugin is not None:
                client.unsubscribe_topic(self._plugin.topic)
                if cluster is None:  # (our own cluster is closed below)
                    with contextlib.suppress(Exception):
                        client.unregister_worker_plugin(self._plugin.name)
        self._servers, self._pending, self._data, self._training_set = [], {}, [], None
        if client is not None and self._owns_client:
            if client.status == "running":
                client.close()
            else:  # the scheduler is gone (already reported): no traceback of the reconnection
                with _quiet("distributed.client"):
                    client.close()
        if cluster is not None:
            cluster.close()
        if self._counted:
            self._counted = False
            _OWN_CLUSTERS["open"] -= 1
