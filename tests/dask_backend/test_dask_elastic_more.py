"""Workers that come and go, the remaining cases: a worker joining while a step is
in flight, a worker killed (SIGKILL) in the middle of a step and not replaced, and
`cluster.adapt` on a scheduler given by address. Parameters bit-identical to `n_jobs=1` in
each case; nothing of partrain left on the surviving workers after `close()`.

A step is held in flight deterministically by `HoldWhileFileExists`, an identity layer that
waits, on a worker, while a file exists: the test acts (grows the cluster, kills a worker)
while every worker computing the step is known to be inside it, then removes the file.
The workers import this module to rebuild the model (it is on their path: spawned from
pytest's process, or given it through PYTHONPATH).
"""

import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

distributed = pytest.importorskip(
    "distributed", reason="backend='dask' needs dask[distributed] (pip install 'partrain[dask]')")

from conftest import TESTS, make_data, subprocess_env  # noqa: E402

from partrain import Callback, Trainer  # noqa: E402
from partrain.layers import Dense, Flatten, Layer, ReLU, register_layer  # noqa: E402
from partrain.model import Sequential  # noqa: E402

EPOCHS = 3
DASK = {"batch_size": 64, "chunk_size": 16, "backend": "dask", "n_jobs": -1, "progress": False}


@register_layer
class HoldWhileFileExists(Layer):
    """Identity that, while the file `hold` exists, marks that its process is inside a step
    (creates `hold.<pid>`) and waits for the file to be removed."""

    short_name = "hold"

    def __init__(self, hold: str):
        self.hold = hold

    def forward(self, p, x, ctx, index):
        if os.path.exists(self.hold):
            Path(f"{self.hold}.{os.getpid()}").touch()
            while os.path.exists(self.hold):
                time.sleep(0.005)
        return x, None

    def config(self):
        return {"hold": self.hold}


def held_model(hold: Path) -> Sequential:
    """A small network that a step can be held in (8x8 inputs, 4 chunks per step of 64)."""
    return Sequential([HoldWhileFileExists(str(hold)), Flatten(), Dense(32), ReLU(), Dense(10)],
                      (8, 8, 1), seed=3)


class HoldStep(Callback):
    """Hold step `step` of epoch `epoch` on the workers; once `n_inside` worker processes are
    inside it, call `action()` from another thread, then let the step go on."""

    def __init__(self, hold: Path, epoch: int, step: int, action, n_inside: int = 1):
        self.hold, self.at, self.action, self.n_inside = hold, (epoch, step), action, n_inside
        self.thread, self.inside, self.processes = None, [], None

    def _act(self):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self.inside = sorted(p.name for p in self.hold.parent.glob(f"{self.hold.name}.*"))
            if len(self.inside) >= self.n_inside:
                break
            time.sleep(0.005)
        try:
            if len(self.inside) >= self.n_inside:
                self.action()
        finally:
            self.hold.unlink()

    def on_batch_end(self, trainer, step, logs):
        if (trainer.epoch, step + 1) == self.at:  # the held step is the next one
            self.hold.touch()
            self.thread = threading.Thread(target=self._act)
            self.thread.start()
        elif (trainer.epoch, step) == self.at:
            self.thread.join()
            self.processes = trainer.engine.last_timing.processes

    def on_epoch_end(self, trainer, epoch, logs):
        if epoch == self.at[0]:  # (steps are short: the joining servers may not be ready)
            trainer.engine.wait_for_servers(trainer.engine.n_workers, timeout=60)


def reference_params(hold: Path, X, y):
    """Parameters and history after the same fit with n_jobs=1 (no file: nothing held)."""
    with Trainer(held_model(hold), batch_size=64, chunk_size=16, n_jobs=1,
                 progress=False) as reference:
        reference.fit(X, y, epochs=EPOCHS)
    return reference.model.params, reference.history.history


def on_workers(client, workers=None) -> dict:
    """What partrain left in each worker process: chunk-server threads, actors, plugins;
    chunk-server threads end asynchronously after close(): waited for up to 10 s."""
    def probe(dask_worker):
        deadline = time.monotonic() + 10
        while True:
            threads = [t.name for t in threading.enumerate() if t.name.startswith("partrain")]
            if not threads or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return {"threads": threads, "actors": len(dask_worker.state.actors),
                "plugins": [name for name in dask_worker.plugins if name.startswith("partrain")]}

    return client.run(probe, workers=workers)


def partrain_keys(client) -> list:
    return [key for keys in client.has_what().values() for key in keys
            if str(key).startswith("partrain-")]


def master_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("partrain")]


@pytest.fixture
def cluster():
    """A function starting a LocalCluster of n single-threaded worker processes (closed at
    the end), returning it and a client."""
    started = []

    def start(n_workers: int):
        local = distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1,
                                         processes=True, host="127.0.0.1",
                                         dashboard_address=None,  # (any free port, not 8787)
                                         scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
        client = distributed.Client(local, set_as_default=False)
        started.append((local, client))
        return local, client

    yield start
    for local, client in started:
        client.close()
        local.close()


def test_a_worker_joining_while_a_step_is_in_flight(cluster, tmp_path):
    """1 worker; step 3 of epoch 0 is held on it while the cluster grows to 3 (the scheduler
    lists them before the step ends). That step completes on its one worker, no step fails or
    repeats, the new workers compute later steps, parameters as n_jobs=1."""
    local, client = cluster(1)
    hold = tmp_path / "hold"
    X, y = make_data(held_model(hold), 640)  # 10 steps per epoch

    def grow():
        local.scale(3)
        client.wait_for_workers(3, timeout=60)
        listed.append(len(client.nthreads()))

    listed = []
    callback = HoldStep(hold, epoch=0, step=3, action=grow)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed, re-run step warns
        with Trainer(held_model(hold), scheduler=client, **DASK) as trainer:
            trainer.fit(X, y, epochs=EPOCHS, callbacks=[callback])
    assert len(callback.inside) == 1 and listed == [3]  # 3 listed while the step was held
    assert callback.processes == 1  # the held step: computed by the worker it was sent to
    assert trainer.history.history["workers"][1:] == [3, 3]
    params, history = reference_params(hold, X, y)
    np.testing.assert_array_equal(trainer.model.params, params)
    assert trainer.history.history["loss"] == history["loss"]


@pytest.fixture
def lone_worker(tmp_path):
    """A function starting `dask worker ADDRESS --no-nanny` (nothing restarts it once
    killed); returns its process."""
    started = []

    def start(address: str) -> subprocess.Popen:
        env = subprocess_env()
        # this module, and the tests folder whose conftest it imports
        env["PYTHONPATH"] += os.pathsep.join(["", str(Path(__file__).parent), str(TESTS)])
        proc = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", address, "--no-nanny",
             "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"],
            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def test_a_worker_killed_mid_step_is_left_out_and_the_step_rerun(cluster, lone_worker,
                                                                   tmp_path):
    """3 workers, one of them without a nanny; it is SIGKILLed while step 2 of epoch 1 is held
    on every worker. The step is re-run on the other two (one warning), the rest of the fit
    runs on 2, parameters as n_jobs=1; after close() nothing of partrain is left on the
    survivors or in this process."""
    local, client = cluster(2)
    victim = lone_worker(local.scheduler_address)
    client.wait_for_workers(3, timeout=60)
    hold = tmp_path / "hold"
    X, y = make_data(held_model(hold), 640)
    callback = HoldStep(hold, epoch=1, step=2, n_inside=3,
                        action=lambda: os.kill(victim.pid, signal.SIGKILL))
    with pytest.warns(RuntimeWarning, match="A Dask worker was lost") as caught:
        with Trainer(held_model(hold), scheduler=client, **DASK) as trainer:
            trainer.fit(X, y, epochs=EPOCHS, callbacks=[callback])
    assert victim.wait(timeout=10) == -signal.SIGKILL
    assert f"hold.{victim.pid}" in callback.inside  # killed inside the step
    assert len([w for w in caught if "was lost" in str(w.message)]) == 1
    assert callback.processes == 2  # the held step, re-run on the survivors
    assert trainer.history.history["workers"] == [3, 3, 2]
    deadline = time.monotonic() + 10  # (the scheduler forgets the killed worker by itself)
    while len(client.nthreads()) > 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = sorted(client.nthreads())
    assert len(survivors) == 2
    assert on_workers(client) == {w: {"threads": [], "actors": 0, "plugins": []}
                                  for w in survivors}
    assert partrain_keys(client) == [] and master_threads() == []
    params, history = reference_params(hold, X, y)
    np.testing.assert_array_equal(trainer.model.params, params)
    assert trainer.history.history["loss"] == history["loss"]


def wait_for_event(name: str) -> None:
    """A task that waits (up to 60 s) for the `distributed.Event` called `name`."""
    distributed.Event(name).wait(timeout=60)


class BacklogThenIdle(Callback):
    """After epoch 0: a backlog of 3 tasks, all pinned to the one worker and waiting for an
    event, so that `adapt` grows the cluster to 3 (the new workers stay free for the chunk
    servers), then wait until the engine computes on 3 workers. After epoch 1: set the event
    (the backlog ends) and wait until `adapt` has shrunk the cluster to 1 and the workers it
    retired have closed (each waits for its chunk server to end)."""

    def __init__(self, local, client):
        self.local, self.client = local, client
        self.event = distributed.Event(f"backlog-{os.getpid()}-{id(self)}", client=client)
        self.tasks = []

    def on_epoch_end(self, trainer, epoch, logs):
        if epoch == 0:
            self.tasks = self.client.map(wait_for_event, [self.event.name] * 3,
                                         workers=sorted(self.client.nthreads()), pure=False)
            assert trainer.engine.wait_for_servers(3, timeout=60) == 3
        elif epoch == 1:
            self.event.set()
            self.client.gather(self.tasks)
            self.tasks = []
            deadline = time.monotonic() + 60
            while (len(self.client.nthreads()) > 1 or len(self.local.workers) > 1) \
                    and time.monotonic() < deadline:
                time.sleep(0.05)


def test_adapt_on_a_scheduler_given_by_address(cluster, tmp_path):
    """`cluster.adapt(minimum=1, maximum=3)` on a LocalCluster that the Trainer reaches by its
    address: grown to 3 by a backlog of tasks, shrunk back to 1 once idle, during one fit;
    no step fails, the history shows both, parameters as n_jobs=1."""
    local, client = cluster(1)
    local.adapt(minimum=1, maximum=3, interval="100ms", wait_count=5, target_duration="0.1s")
    hold = tmp_path / "hold"  # never created: nothing held
    X, y = make_data(held_model(hold), 640)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with Trainer(held_model(hold), scheduler=local.scheduler_address, **DASK) as trainer:
            trainer.fit(X, y, epochs=EPOCHS, callbacks=[BacklogThenIdle(local, client)])
    assert trainer.history.history["workers"][1:] == [3, 1]
    params, history = reference_params(hold, X, y)
    np.testing.assert_array_equal(trainer.model.params, params)
    assert trainer.history.history["loss"] == history["loss"]
