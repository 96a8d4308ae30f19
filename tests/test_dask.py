"""Tests of ``partrain.dask_engine``: identical results on a Dask cluster, worker deaths, task
errors, timeouts, unreachable schedulers and the lifecycle of a cluster the engine starts."""

import os
import signal
import time
import warnings

import numpy as np
import pytest
from faulty_layers import (
    BAD_MESSAGE,
    SENTINEL,
    RaiseOnSentinel,
    blas_report,
    descendants,
    wait_gone,
)

from partrain import Callback, Sequential, Trainer, WorkerCrashError
from partrain.io import read_npz
from partrain.layers import BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU

distributed = pytest.importorskip(
    "distributed", reason="backend='dask' needs dask[distributed] (pip install 'partrain[dask]')")
import dask  # noqa: E402  (comes with distributed)

from partrain import dask_engine  # noqa: E402
from partrain.dask_engine import DaskEngine  # noqa: E402

N_WORKERS = 2


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


def make_data(model, m, seed=1):
    """`m` random examples in [0, 1) of `model`'s input shape and dtype, random labels."""
    rng = np.random.default_rng(seed)
    X = rng.random((m, *model.input_shape)).astype(model.dtype)
    return X, rng.integers(0, model.n_classes, size=m)


def train(make_model, n=150, epochs=2, callbacks=(), **options):
    """(params, buffers, history) after training a fresh model; batch 32, chunks of 8."""
    model = make_model()
    X, y = make_data(model, n)
    with Trainer(model, batch_size=32, chunk_size=8, seed=3, progress=False,
                 **options) as trainer:
        trainer.fit(X, y, epochs=epochs, callbacks=callbacks)
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


def test_dask_gives_the_parameters_of_loky_and_of_one_process(client):
    """Dropout CNN, 2 epochs: dask (scheduler address) == loky n_jobs=2 == n_jobs=1."""
    serial = train(cnn_dropout, n_jobs=1)
    assert_same(train(cnn_dropout, n_jobs=2), serial)
    address = client.scheduler.address
    assert_same(train(cnn_dropout, backend="dask", scheduler=address),
                serial)


def test_batchnorm_statistics_and_ragged_batches_match_one_process(client):
    """Per-chunk batch statistics come back and fold in order; last batch shorter."""
    expected = train(mlp_batchnorm, n=150, n_jobs=1)
    got = train(mlp_batchnorm, n=150, backend="dask", scheduler=client)
    assert_same(got, expected)


def test_one_step_sends_the_parameters_once_and_one_gradient_per_chunk(client):
    """last_bytes: the parameter vector (+ buffers) per worker, 4 chunk gradients + stats."""
    model = mlp_batchnorm()
    X, y = make_data(model, 32)
    engine = DaskEngine(model, 8, 1, 32, scheduler=client)
    try:
        engine.bind(X, y)
        totals = engine.gradient(np.arange(32), (0, 1, 0, 0), np.empty_like(model.params))
        assert len(engine.worker_pids()) == N_WORKERS
    finally:
        engine.close()
    assert totals.n_examples == 32
    state_bytes = model.params.nbytes + model.buffers.nbytes
    assert engine.last_bytes == {"params": state_bytes, "workers": N_WORKERS,
                                 "grads": 4 * state_bytes}


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


def test_exception_in_a_task_keeps_its_type_and_training_can_go_on(client):
    """ValueError in a task -> the same ValueError as with n_jobs=1; a new fit works; the
    sequence equals n_jobs=1."""
    final = []
    for options in ({"n_jobs": 1}, {"backend": "dask", "scheduler": client}):
        model = Sequential([RaiseOnSentinel(), Dense(16), ReLU(), Dense(10)], (64,), seed=0)
        X, y = make_data(model, 120)
        poisoned = X.copy()
        poisoned[50] = 2 * SENTINEL
        trainer = Trainer(model, batch_size=20, chunk_size=5, progress=False, **options)
        with pytest.raises(ValueError) as info:
            trainer.fit(poisoned, y, epochs=1, shuffle=False)
        assert type(info.value) is ValueError and str(info.value) == BAD_MESSAGE
        if "backend" in options:
            assert trainer._engine is None
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
    assert trainer._engine is None
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
    assert trainer._engine is None


def test_bad_scheduler_argument_is_named():
    """Neither None, an address nor a Client: ValueError."""
    with pytest.raises(ValueError, match="`scheduler` must be.*got int"):
        DaskEngine(cnn_dropout(), 8, 1, 32, scheduler=8786)
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
