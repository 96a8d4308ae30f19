"""Tests of ``partrain.dask_engine``: identical results on a Dask cluster, what a step sends,
worker deaths (between and during steps), a lost scheduler, chunk errors, interrupts, timeouts,
unreachable schedulers and the lifecycle of a cluster the engine starts."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import make_data
from faulty_layers import (
    BAD_MESSAGE,
    SENTINEL,
    DieOnSentinel,
    RaiseOnSentinel,
    blas_report,
    descendants,
    has_sentinel,
    wait_gone,
)

import partrain
from partrain import Callback, Sequential, Trainer, TrainingInterrupted, WorkerCrashError
from partrain.engine import SerialEngine
from partrain.io import read_npz
from partrain.layers import (
    BatchNorm,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    Layer,
    MaxPool2D,
    ReLU,
    register_layer,
)

distributed = pytest.importorskip(
    "distributed", reason="backend='dask' needs dask[distributed] (pip install 'partrain[dask]')")
import dask  # noqa: E402  (comes with distributed)

from partrain import dask_engine  # noqa: E402
from partrain.dask_engine import DaskEngine  # noqa: E402

N_WORKERS = 2
TRANSPORTS = ("socket", "actor")  # steps over the servers' own sockets, or through Dask
SLEEP_S = 0.4  # how long a SleepOnSentinel layer makes a poisoned chunk last


@register_layer
class SleepOnSentinel(Layer):
    """Identity that sleeps SLEEP_S on a poisoned chunk: a step long enough to act during it.
    (Dask workers import it from this module.)"""

    short_name = "sleeper"

    def forward(self, p, x, ctx, index):
        if has_sentinel(x):
            time.sleep(SLEEP_S)
        return x, None


def slow_mlp():
    """An MLP whose chunks holding a poisoned example take SLEEP_S longer."""
    return Sequential([SleepOnSentinel(), Dense(16), ReLU(), Dense(10)], (64,), seed=0)


# ----------------------------------------------------------------------------- fixtures, helpers


@pytest.fixture(scope="module")
def shared_client():
    """ONE local cluster of 2 single-threaded worker processes for the whole module.

    Its workers start without the BLAS variables Dask sets by default, so they would use
    every core: whatever limits them to `blas_threads` is the engine's doing.
    """
    with dask.config.set({"distributed.nanny.pre-spawn-environ": {}}):
        cluster = distributed.LocalCluster(
            n_workers=N_WORKERS, threads_per_worker=1, processes=True, host="127.0.0.1",
            dashboard_address=None, scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
    client = distributed.Client(cluster, set_as_default=False)
    yield client
    client.close()
    cluster.close()


@pytest.fixture
def client(shared_client):
    """The shared cluster's client, once the cluster has its 2 workers (again)."""
    shared_client.wait_for_workers(N_WORKERS, timeout=30)
    return shared_client


def cnn_dropout():
    """A small CNN with dropout on 8x8x1 inputs."""
    return Sequential([Conv2D(4, 3, pad=1), ReLU(), MaxPool2D(2), Flatten(), Dropout(0.3),
                       Dense(10)], (8, 8, 1), seed=0)


def mlp_batchnorm():
    """An MLP with batch norm (per-chunk statistics travel back) and dropout."""
    return Sequential([Flatten(), Dense(16), BatchNorm(), ReLU(), Dropout(0.2), Dense(10)],
                      (64,), seed=0)


def train(make_model, n=150, epochs=2, callbacks=(), poisoned=(), **options):
    """(params, buffers, history) after training a fresh model; batch 32, chunks of 8;
    examples `poisoned` (then no shuffling) hold the SENTINEL."""
    model = make_model()
    X, y = make_data(model, n)
    X[list(poisoned)] = 2 * SENTINEL
    with Trainer(model, batch_size=32, chunk_size=8, seed=3, progress=False,
                 **options) as trainer:
        trainer.fit(X, y, epochs=epochs, callbacks=callbacks, shuffle=not poisoned)
    return model.params.copy(), model.buffers.copy(), trainer.history.history


def assert_same(got, expected):
    """Bit-identical parameters, buffers and losses."""
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2]["loss"] == expected[2]["loss"]


class KillWorkerAt(Callback):
    """SIGKILL one Dask worker process after step `step` of the first epoch."""

    def __init__(self, client, step):
        self.client, self.step, self.killed = client, step, []

    def on_batch_end(self, trainer, step, logs):
        if trainer.epoch == 0 and step == self.step:
            pid = next(iter(self.client.run(os.getpid).values()))
            os.kill(pid, signal.SIGKILL)
            assert wait_gone([pid]) == []
            self.killed.append(pid)


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_dask_gives_the_parameters_of_loky_and_of_one_process(client, transport):
    """Dropout CNN, 2 epochs: dask (scheduler address) == loky n_jobs=2 == n_jobs=1."""
    serial = train(cnn_dropout, n_jobs=1)
    assert_same(train(cnn_dropout, n_jobs=2), serial)
    address = client.scheduler.address
    assert_same(train(cnn_dropout, backend="dask", scheduler=address,
                      backend_options={"transport": transport}), serial)


def test_batchnorm_statistics_and_ragged_batches_match_one_process(client):
    """Per-chunk batch statistics come back and fold in order; last batch shorter."""
    expected = train(mlp_batchnorm, n=150, n_jobs=1)
    got = train(mlp_batchnorm, n=150, backend="dask", scheduler=client)
    assert_same(got, expected)


def server_threads(client) -> list[str]:
    """Names of the ChunkServer socket threads alive on the workers."""
    names = client.run(lambda: [t.name for t in threading.enumerate()])
    return [name for found in names.values() for name in found
            if name == "partrain-chunk-server"]


def server_threads_after_they_end(client, timeout: float = 10.0) -> list[str]:
    """server_threads once those of closed engines have ended (they stop asynchronously),
    or what is still alive after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while server_threads(client) and time.monotonic() < deadline:
        time.sleep(0.05)
    return server_threads(client)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_step_sends_the_state_once_per_worker_and_no_task(client, transport):
    """last_bytes: the parameter vector (+ buffers) to each worker; back, one gradient per
    worker (each adds up its 2 chunks, [0, 2) and [2, 4)) and the 4 chunks' batch stats.
    Steps after the first run no Dask task: only the workers' resident servers are called.
    After close(), no server thread is left on the workers."""
    model = mlp_batchnorm()
    X, y = make_data(model, 32)
    assert server_threads_after_they_end(client) == []  # earlier tests' servers have ended
    engine = DaskEngine(model, 8, 1, 32, scheduler=client, transport=transport)
    grad = np.empty_like(model.params)
    try:
        engine.bind(X, y)
        engine.gradient(np.arange(32), (0, 1, 0, 0), grad)  # starts the servers
        assert len(server_threads(client)) == (N_WORKERS if transport == "socket" else 0)
        with distributed.get_task_stream(client=client) as tasks:
            for step in range(1, 4):
                totals = engine.gradient(np.arange(32), (0, 1, 0, step), grad)
        assert len(engine.worker_pids()) == N_WORKERS
    finally:
        engine.close()
    assert [t.get("key") for t in tasks.data] == []
    assert totals.n_examples == 32
    assert engine.last_bytes == {
        "params": model.params.nbytes + model.buffers.nbytes, "workers": N_WORKERS,
        "grads": 2 * model.params.nbytes + 4 * model.buffers.nbytes}
    assert server_threads_after_they_end(client) == []


def test_close_ends_the_server_threads_even_while_their_sockets_are_referenced(client):
    """close() closes each server's socket itself: a reference that outlives the engine (a
    traceback's frame, a debugger) must not keep the workers' threads, models and training
    set alive until the socket object is garbage-collected."""
    model = mlp_batchnorm()
    X, y = make_data(model, 32)
    assert server_threads_after_they_end(client) == []
    engine = DaskEngine(model, 8, 1, 32, scheduler=client, transport="socket")
    try:
        engine.bind(X, y)
        engine.gradient(np.arange(32), (0, 1, 0, 0), np.empty_like(model.params))
        held = [server.sock for server in engine._servers]  # outlives close()
        assert len(held) == N_WORKERS and len(server_threads(client)) == N_WORKERS
    finally:
        engine.close()
    assert server_threads_after_they_end(client, timeout=5.0) == []
    assert all(sock.fileno() == -1 for sock in held)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_workers_send_the_partial_sums_of_their_ranges(client, transport):
    """6 chunks on 2 workers, ranges [0, 3) and [3, 6): each sends the 2 partial sums its
    range leaves (slots 0, 2 and 3, 4), and gradient, loss, accuracy and batch statistics
    are those of one process, bit for bit (full and ragged steps)."""
    model = mlp_batchnorm()
    X, y = make_data(model, 60)
    serial = SerialEngine(model.copy(), 8, 48)
    serial.bind(X, y)
    engine = DaskEngine(model, 8, 1, 48, scheduler=client, transport=transport)
    expected, got = np.empty_like(model.params), np.empty_like(model.params)
    try:
        engine.bind(X, y)
        for step, n in enumerate((48, 44, 48)):
            batch_idx = np.random.default_rng(step).permutation(60)[:n]
            want = serial.gradient(batch_idx, (0, 1, 0, step), expected)
            totals = engine.gradient(batch_idx, (0, 1, 0, step), got)
            np.testing.assert_array_equal(got, expected)
            assert totals[:3] == want[:3]
            np.testing.assert_array_equal(totals.stats, want.stats)
            assert engine.last_bytes["grads"] == \
                4 * model.params.nbytes + 6 * model.buffers.nbytes
    finally:
        engine.close()


def test_workers_use_blas_threads(client):
    """Each worker that ran a task uses `blas_threads` BLAS threads (2, then 1 again)."""
    for blas_threads in (2, 1):
        train(mlp_batchnorm, n=64, epochs=1, backend="dask", blas_threads=blas_threads,
              scheduler=client)
        served = client.run(lambda: dask_engine._PROCESS["blas_threads"])
        reports = client.run(blas_report)
        assert blas_threads in served.values()
        for address, limit in served.items():
            if limit is not None:
                assert set(reports[address]["threads"].values()) == {limit}


# ----------------------------------------------------------------------------- faults


def test_killed_worker_does_not_change_the_results(client):
    """SIGKILL a worker mid-training: Dask recomputes elsewhere, same params as n_jobs=1."""
    killer = KillWorkerAt(client, step=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a re-run step is allowed, not needed
        got = train(cnn_dropout, backend="dask", callbacks=[killer],
                    scheduler=client)
    assert len(killer.killed) == 1
    assert_same(got, train(cnn_dropout, n_jobs=1))
    client.wait_for_workers(N_WORKERS, timeout=30)  # the nanny restarts it for later tests


class KillDuringNextStep(Callback):
    """SIGKILL the first Dask worker SLEEP_S / 2 into the step after step `step` (a slow one);
    after that step, wait for the nanny's replacement; after the next, record how many workers
    that step used."""

    def __init__(self, client, step):
        self.client, self.step, self.killed, self.workers_after = client, step, [], None

    def on_batch_end(self, trainer, step, logs):
        if step == self.step:
            pids = self.client.run(os.getpid)
            pid = pids[min(pids)]
            self.timer = threading.Timer(SLEEP_S / 2, os.kill, (pid, signal.SIGKILL))
            self.timer.start()
            self.killed.append(pid)
        elif step == self.step + 1:
            self.timer.join()
            self.client.wait_for_workers(N_WORKERS, timeout=30)
            # new workers join the steps once their server is ready, in the background
            assert trainer.engine.wait_for_servers(N_WORKERS) == N_WORKERS
        elif step == self.step + 2:
            self.workers_after = trainer.engine.last_bytes["workers"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_worker_killed_during_a_step_is_replaced_and_the_step_recomputed(client, monkeypatch,
                                                                          transport):
    """A worker SIGKILLed while it computes: the step is re-run on the others (warning), the
    parameters equal n_jobs=1, and the nanny's replacement is used by the following steps."""
    monkeypatch.setattr(dask_engine, "WORKERS_REFRESH_S", 0.0)  # re-list workers every step
    poisoned = [64, 72, 80, 88]  # every chunk of step 2 sleeps
    killer = KillDuringNextStep(client, step=1)
    with pytest.warns(RuntimeWarning, match="Dask worker was lost"):
        got = train(slow_mlp, n=128, epochs=1, callbacks=[killer], poisoned=poisoned,
                    backend="dask", scheduler=client, backend_options={"transport": transport})
    assert len(killer.killed) == 1 and wait_gone(killer.killed) == []
    assert killer.workers_after == N_WORKERS
    assert_same(got, train(slow_mlp, n=128, epochs=1, poisoned=poisoned, n_jobs=1))


def test_workers_dying_at_every_attempt_end_with_worker_crash_error_and_checkpoint(
        client, tmp_path):
    """A chunk that kills whichever worker computes it: after max_restarts re-runs,
    WorkerCrashError saying so; the checkpoint holds the last completed step."""
    model = Sequential([DieOnSentinel(os.getpid()), Dense(16), ReLU(), Dense(10)], (64,),
                       seed=0)
    X, y = make_data(model, 96)
    X[40] = 2 * SENTINEL  # step 1
    checkpoint = tmp_path / "crash.npz"
    trainer = Trainer(model, batch_size=32, chunk_size=8, progress=False, backend="dask",
                      scheduler=client, max_restarts=1, checkpoint=checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(WorkerCrashError, match="lost workers 2 times in a row"):
            trainer.fit(X, y, epochs=1, shuffle=False)
    meta, _ = read_npz(checkpoint, "checkpoint")
    assert (meta["epoch"], meta["step_in_epoch"]) == (0, 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class KillProcessAt(Callback):
    """SIGKILL `proc` after step `step` of the first epoch."""

    def __init__(self, proc, step):
        self.proc, self.step = proc, step

    def on_batch_end(self, trainer, step, logs):
        if step == self.step:
            self.proc.kill()
            self.proc.wait()
            time.sleep(0.3)  # let the client notice


def test_lost_scheduler_ends_fit_with_one_line_and_the_last_checkpoint(tmp_path):
    """`dask scheduler` and one `dask worker` as processes; the scheduler SIGKILLed after step
    1: fit raises a one-line WorkerCrashError naming it, the checkpoint holds the last
    completed step, and no worker of this process is left."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    root = str(Path(partrain.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
         "--port", str(port), "--no-dashboard"], env=env, stderr=subprocess.DEVNULL)
    worker = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
         "--no-nanny", "--no-dashboard"], env=env, stderr=subprocess.DEVNULL)
    try:
        model = cnn_dropout()
        X, y = make_data(model, 128)
        checkpoint = tmp_path / "lost.npz"
        trainer = Trainer(model, batch_size=32, chunk_size=8, progress=False, backend="dask",
                          scheduler=address, checkpoint=checkpoint,
                          backend_options={"connect_timeout": 60})
        with pytest.raises(WorkerCrashError) as info:
            trainer.fit(X, y, epochs=1, callbacks=[KillProcessAt(scheduler, step=1)])
        message = str(info.value)
        assert "\n" not in message and f"Dask scheduler at {address}" in message, message
        assert not trainer.engine_started
        meta, arrays = read_npz(checkpoint, "checkpoint")
        assert (meta["epoch"], meta["step_in_epoch"]) == (0, trainer.step_in_epoch)
        assert 2 <= trainer.step_in_epoch < 4
        np.testing.assert_array_equal(arrays["params"], model.params)
    finally:
        for proc in (worker, scheduler):
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_interrupt_during_a_step_stops_within_the_step(client, tmp_path, transport):
    """SIGINT while the workers compute a slow step: TrainingInterrupted well before the
    step would end, the checkpoint at the last completed step."""
    model = slow_mlp()
    X, y = make_data(model, 128)
    X[64:128:8] = 2 * SENTINEL  # step 1 (batch 64): 8 slow chunks, 4 per worker
    checkpoint = tmp_path / "interrupted.npz"
    sent = []

    class InterruptDuringNextStep(Callback):
        def on_batch_end(self, trainer, step, logs):
            if step == 0:
                def interrupt():
                    sent.append(time.monotonic())
                    os.kill(os.getpid(), signal.SIGINT)
                threading.Timer(SLEEP_S / 2, interrupt).start()

    trainer = Trainer(model, batch_size=64, chunk_size=8, progress=False, backend="dask",
                      scheduler=client, checkpoint=checkpoint,
                      backend_options={"transport": transport})
    with pytest.raises(TrainingInterrupted):
        trainer.fit(X, y, epochs=1, shuffle=False, callbacks=[InterruptDuringNextStep()])
    stopped_after = time.monotonic() - sent[0]
    assert stopped_after < 4 * SLEEP_S - SLEEP_S / 2, stopped_after  # the step's remainder
    meta, _ = read_npz(checkpoint, "checkpoint")
    assert (meta["epoch"], meta["step_in_epoch"]) == (0, 1)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_exception_in_a_task_keeps_its_type_and_training_can_go_on(client, transport):
    """ValueError in a task -> the same ValueError as with n_jobs=1, its remote traceback as
    the cause; a new fit works; the sequence equals n_jobs=1."""
    final = []
    for options in ({"n_jobs": 1}, {"backend": "dask", "scheduler": client,
                                    "backend_options": {"transport": transport}}):
        model = Sequential([RaiseOnSentinel(), Dense(16), ReLU(), Dense(10)], (64,), seed=0)
        X, y = make_data(model, 120)
        poisoned = X.copy()
        poisoned[50] = 2 * SENTINEL
        trainer = Trainer(model, batch_size=20, chunk_size=5, progress=False, **options)
        with pytest.raises(ValueError) as info:
            trainer.fit(poisoned, y, epochs=1, shuffle=False)
        assert type(info.value) is ValueError and str(info.value) == BAD_MESSAGE
        if "backend" in options:
            assert not trainer.engine_started
            cause = info.value.__cause__
            assert isinstance(cause, dask_engine.RemoteTraceback)
            assert "RaiseOnSentinel" in str(cause) or "forward" in str(cause)
        stopped_at = trainer.step_in_epoch
        trainer.fit(X, y, epochs=1, shuffle=False)
        trainer.close()
        final.append((stopped_at, model.params))
    assert final[1][0] == final[0][0] == 2  # example 50 is in step 2
    np.testing.assert_array_equal(final[1][1], final[0][1])


def test_step_timeout_raises_worker_crash_error_with_a_checkpoint(client, tmp_path):
    """A step slower than step_timeout -> WorkerCrashError naming it; checkpoint written."""
    model = cnn_dropout()
    X, y = make_data(model, 64)
    checkpoint = tmp_path / "timeout.npz"
    trainer = Trainer(model, batch_size=32, progress=False, checkpoint=checkpoint,
                      backend="dask", scheduler=client,
                      backend_options={"step_timeout": 1e-9})
    with pytest.raises(WorkerCrashError, match="step_timeout"):
        trainer.fit(X, y, epochs=1)
    assert not trainer.engine_started
    meta, _ = read_npz(checkpoint, "checkpoint")
    assert (meta["epoch"], meta["step_in_epoch"]) == (0, 0)


def test_unreachable_scheduler_fails_fast_naming_the_address():
    """No scheduler listening: ConnectionError naming the address within connect_timeout."""
    model = cnn_dropout()
    X, y = make_data(model, 32)
    trainer = Trainer(model, batch_size=32, progress=False, backend="dask",
                      scheduler="tcp://127.0.0.1:1",
                      backend_options={"connect_timeout": 1.0})
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match=r"scheduler at 'tcp://127\.0\.0\.1:1'"):
        trainer.fit(X, y)
    assert time.monotonic() - t0 < 1.0 + 4.0
    assert not trainer.engine_started


def test_bad_scheduler_argument_is_named():
    """Neither None, an address nor a Client: ValueError."""
    with pytest.raises(ValueError, match="`scheduler` must be.*got int"):
        DaskEngine(cnn_dropout(), 8, 1, 32, scheduler=8786)
    with pytest.raises(ValueError, match="`transport` must be.*got 'udp'"):
        DaskEngine(cnn_dropout(), 8, 1, 32, scheduler="tcp://127.0.0.1:1", transport="udp")
    with pytest.raises(ValueError, match="`scheduler` needs backend='dask'"):
        Trainer(cnn_dropout(), scheduler="tcp://127.0.0.1:8786")


# ----------------------------------------------------------------------------- lifecycle


def test_own_local_cluster_is_reused_and_shut_down_on_close():
    """scheduler=None: a LocalCluster of n_jobs workers, reused by a second fit, same results
    as n_jobs=1; close() (twice) leaves no worker process behind."""
    model = cnn_dropout()
    X, y = make_data(model, 150)
    before = descendants(os.getpid())
    trainer = Trainer(model, n_jobs=2, batch_size=32, chunk_size=8, seed=3, progress=False,
                      backend="dask")
    trainer.fit(X, y, epochs=1)
    engine, pids = trainer.engine, set(trainer.engine.worker_pids())
    trainer.fit(X, y, epochs=1)
    assert trainer.engine is engine and set(engine.worker_pids()) == pids
    assert len(pids) == 2 and pids <= descendants(os.getpid()) - before
    trainer.close()
    engine.close()
    assert wait_gone(pids) == []
    assert_same((model.params, model.buffers, trainer.history.history),
                train(cnn_dropout, n_jobs=1))
