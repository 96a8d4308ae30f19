"""Tests of ``partrain.Trainer``: identical results for any n_jobs, optimizer and history,
resuming, faults (dead or failing workers, NaN, signals), checkpoints and argument errors."""

import os
import re
import select
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from conftest import TESTS, make_data
from faulty_layers import (
    BAD_MESSAGE,
    SENTINEL,
    DieOnSentinel,
    InfOnSentinel,
    InterruptAt,
    RaiseOnSentinel,
    descendants,
    shm_segments,
    wait_gone,
)
from train_worker_script import make_run
from training_runs import Result, assert_same_run, reference, setup, train

from partrain import (
    Callback,
    EarlyStopping,
    NonFiniteLossError,
    ParallelismWarning,
    Sequential,
    Trainer,
    WorkerCrashError,
    optim,
    zoo,
)
from partrain.callbacks import HISTORY_KEYS
from partrain.io import FileFormatError, write_npz
from partrain.layers import BatchNorm, Dense, ReLU
from partrain.loky_engine import LokyEngine

HERE = TESTS
SCRIPT = HERE / "train_worker_script.py"

class KillWorkerAt(Callback):
    """SIGKILL the first worker after step `step` of epoch `epoch`; wait until it is dead."""

    def __init__(self, epoch, step):
        self.at, self.killed = (epoch, step), []

    def on_batch_end(self, trainer, step, logs):
        if (trainer.epoch, step) == self.at:
            pid = trainer.engine.worker_pids()[0]
            os.kill(pid, signal.SIGKILL)
            assert wait_gone([pid]) == []
            time.sleep(0.1)  # let the pool's manager thread notice before the next step
            self.killed.append(pid)


class Recorder(Callback):
    """Keep copies of params and buffers after each step, and the workers seen."""

    def __init__(self):
        self.params = self.buffers = None
        self.pids = set()

    def on_batch_end(self, trainer, step, logs):
        self.params = trainer.model.params.copy()
        self.buffers = trainer.model.buffers.copy()
        if trainer.n_jobs > 1:
            self.pids.update(trainer.engine.worker_pids())


def poisoned(X, index):
    """A copy of X whose example `index` carries the sentinel that fault layers react to."""
    X = X.copy()
    X[index] = 2 * SENTINEL
    return X


def faulty_mlp(fault_layer, batchnorm=False):
    """fault layer -> Dense 16 [-> BatchNorm] -> ReLU -> Dense 10 on 64 features."""
    layers = [fault_layer, Dense(16)] + ([BatchNorm()] if batchnorm else []) + [ReLU(), Dense(10)]
    return Sequential(layers, (64,), seed=0)


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("n_jobs", [2, 3])
@pytest.mark.parametrize("config", ["cnn", "mlp_dropout", "ragged", "batchnorm"])
def test_results_are_identical_for_any_n_jobs(config, n_jobs):
    """Params, buffers and metrics after 2 epochs equal the n_jobs=1 run bit for bit."""
    got = train(config, n_jobs=n_jobs)
    assert got.n_workers == n_jobs - 1  # the master computes a share too
    assert_same_run(got, reference(config))


def test_batch_256_gives_the_same_parameters_on_1_2_4_and_8_processes():
    """16 chunks of 16 per step, shared by 1, 2, 4 or 8 processes (oversubscribed here):
    every process makes the tree additions inside its group, the master the rest, and the
    parameters are identical bit for bit."""
    model = zoo.mlp(dims=(64, 32, 10), dropout=0.2, batchnorm=True, seed=4)
    X, y = make_data(model, 600, seed=5)
    finals = []
    for n_jobs in (1, 2, 4, 8):
        copy = model.copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ParallelismWarning)  # 4 and 8 exceed the cores
            trainer = Trainer(copy, n_jobs=n_jobs, batch_size=256, chunk_size=16, seed=1,
                              progress=False)
        with trainer:
            trainer.fit(X, y, epochs=1)
            assert len(trainer.engine.worker_pids()) == n_jobs - 1
        finals.append((copy.params, copy.buffers))
    for params, buffers in finals[1:]:
        np.testing.assert_array_equal(params, finals[0][0])
        np.testing.assert_array_equal(buffers, finals[0][1])


@pytest.mark.parametrize("config", ["mlp", "mlp_dropout"])
def test_seed_determines_the_run(config):
    """Same seed: same params; another seed (shuffling, dropout masks): other params."""
    np.testing.assert_array_equal(train(config, seed=0).params, reference(config).params)
    assert not np.array_equal(train(config, seed=1).params, reference(config).params)


def test_seed_reaches_dropout_masks():
    """Without shuffling, only dropout can make two seeds differ; it must."""
    runs = []
    for seed in (0, 1):
        model, X, y, _, kwargs = setup("mlp_dropout", seed=seed)
        Trainer(model, **kwargs).fit(X, y, epochs=1, shuffle=False)
        runs.append(model.params)
    assert not np.array_equal(*runs)


def test_a_second_fit_sees_data_changed_in_place():
    """fit(X), change X in place (e.g. re-augment it), fit(X) again: n_jobs=2 == n_jobs=1."""
    results = []
    for n_jobs in (1, 2):
        model = zoo.mlp(dims=(64, 32, 10))
        rng = np.random.default_rng(0)
        X = rng.random((120, 64)).astype(np.float32)
        y = rng.integers(0, 10, size=120)
        with Trainer(model, n_jobs=n_jobs, batch_size=40, chunk_size=10,
                     progress=False) as trainer:
            trainer.fit(X, y, epochs=1)
            X[...] = rng.random((120, 64))
            trainer.fit(X, y, epochs=1)
        results.append(model.params)
    np.testing.assert_array_equal(results[1], results[0])


# ----------------------------------------------------------------------------- optimizer, history


@pytest.mark.parametrize("optimizer, n_jobs", [("adam", 1), ("adam", 2), ("sgd", 1)])
def test_one_step_applies_the_optimizer_to_the_mean_gradient(optimizer, n_jobs):
    """One full-batch step: Adam moves by lr g / (|g| + eps) (t=1), SGD by lr g, g = mean."""
    model = zoo.mlp(dims=(64, 32, 10), dtype="float64", seed=2)
    X, y = make_data(model, 48, seed=5)
    before = model.params.copy()
    g = model.loss_and_grad(before, X, y).grad / len(X)
    lr = 1e-2
    opt = optim.Adam(lr) if optimizer == "adam" else optim.SGD(lr)
    with Trainer(model, opt, n_jobs=n_jobs, batch_size=len(X), chunk_size=10,
                 progress=False) as trainer:
        trainer.fit(X, y, epochs=1)
    expected = before - lr * (g / (np.abs(g) + 1e-8) if optimizer == "adam" else g)
    np.testing.assert_allclose(model.params, expected, rtol=1e-12, atol=1e-12)
    assert opt.state["step"] == 1


def test_history_matches_a_hand_replay_of_sgd():
    """Loss = mean over the epoch's examples (ragged last batch), accuracy, val, lr per epoch."""
    model = zoo.mlp(dims=(64, 32, 10), dtype="float64", seed=4)
    X, y = make_data(model, 100, seed=6)
    Xv, yv = make_data(model, 30, seed=7)
    replay = model.copy()
    lr, decay, batch = 0.5, 0.5, 30
    expected = {key: [] for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr")}
    for epoch in range(2):
        epoch_lr, loss, correct = lr / (1 + decay * epoch), 0.0, 0
        for start in range(0, len(X), batch):  # batches of 30, 30, 30, 10
            Xb, yb = X[start:start + batch], y[start:start + batch]
            r = replay.loss_and_grad(replay.params, Xb, yb)
            loss, correct = loss + r.loss, correct + r.n_correct
            replay.params -= epoch_lr * r.grad / len(Xb)
        val_loss, val_acc = replay.evaluate(Xv, yv)
        for key, value in zip(expected, (loss / len(X), correct / len(X), val_loss, val_acc,
                                         epoch_lr)):
            expected[key].append(value)

    trainer = Trainer(model, optim.SGD(lr), batch_size=batch, chunk_size=7, lr_schedule=decay,
                      progress=False)
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    history = trainer.fit(X, y, epochs=2, validation_data=(Xv, yv), shuffle=False)
    assert signal.getsignal(signal.SIGTERM) is sigterm_handler  # fit's handler is removed
    assert history is trainer.history
    assert set(HISTORY_KEYS) <= set(history.history)
    assert all(len(history.history[key]) == 2 for key in HISTORY_KEYS)
    np.testing.assert_allclose(model.params, replay.params, rtol=1e-10, atol=1e-12)
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(history.history[key], expected[key], rtol=1e-10)
    for key in ("accuracy", "val_accuracy", "lr"):
        assert history.history[key] == pytest.approx(expected[key], rel=1e-15)
    assert all(t > 0 for t in history.history["epoch_time_s"])
    assert all(s > 0 for s in history.history["examples_per_s"])


def test_fit_twice_continues_like_one_fit():
    """fit(1 epoch) + fit(2 epochs) on one trainer == fit(3 epochs); the pool is reused."""
    model, X, y, validation, kwargs = setup("mlp_dropout")
    with Trainer(model, n_jobs=2, **kwargs) as trainer:
        trainer.fit(X, y, epochs=1, validation_data=validation)
        pids = trainer.engine.worker_pids()
        assert (trainer.epoch, trainer.history.epochs) == (1, 1)
        trainer.fit(X, y, epochs=2, validation_data=validation)
        assert trainer.engine.worker_pids() == pids
        assert (trainer.epoch, trainer.history.epochs) == (3, 3)
    got = Result(model.params, model.buffers, trainer.history.history, 2)
    assert_same_run(got, reference("mlp_dropout", epochs=3))


def test_history_without_validation_has_empty_val_lists():
    """No validation data: val lists stay empty while the others get one value per epoch."""
    model, X, y, _, kwargs = setup("mlp")
    history = Trainer(model, **kwargs).fit(X, y, epochs=3).history
    assert history["val_loss"] == history["val_accuracy"] == []
    assert all(len(history[key]) == 3 for key in ("loss", "accuracy", "lr", "epoch_time_s"))


# ----------------------------------------------------------------------------- worker faults


def test_killed_worker_is_replaced_and_results_are_unaffected():
    """SIGKILL a worker mid-training: RuntimeWarning, pool rebuilt, same params as n_jobs=1."""
    killer = KillWorkerAt(epoch=0, step=2)
    with pytest.warns(RuntimeWarning, match="[Ww]orker") as warned:
        got = train("mlp_dropout", n_jobs=2, callbacks=[killer])
    assert len(killer.killed) == 1
    assert any("died" in str(w.message) for w in warned)
    assert_same_run(got, reference("mlp_dropout"))


def test_workers_that_keep_dying_raise_worker_crash_error(tmp_path):
    """A step that kills its worker every time: WorkerCrashError after max_restarts, with a
    checkpoint of the last completed step and no worker left."""
    model = faulty_mlp(DieOnSentinel(os.getpid()))
    X, y = make_data(model, 120)
    checkpoint = tmp_path / "crash.npz"
    recorder = Recorder()
    trainer = Trainer(model, n_jobs=2, batch_size=20, chunk_size=5, max_restarts=1,
                      checkpoint=checkpoint, progress=False)
    with pytest.warns(RuntimeWarning, match="worker died") as warned, \
            pytest.raises(WorkerCrashError, match="died"):
        trainer.fit(poisoned(X, 70), y, epochs=2, shuffle=False, callbacks=[recorder])
    assert len([w for w in warned if "worker died" in str(w.message)]) == 1  # 1 restart
    assert not trainer.engine_started
    assert wait_gone(recorder.pids) == []
    resumed = Trainer.from_checkpoint(checkpoint, progress=False)
    assert (resumed.epoch, resumed.step_in_epoch) == (0, 3)  # example 70 is in step 3
    np.testing.assert_array_equal(resumed.model.params, recorder.params)
    # In the master (n_jobs=1) the layer never kills: resuming there finishes the run.
    resumed.fit(poisoned(X, 70), y, epochs=2, shuffle=False)
    uninterrupted = faulty_mlp(DieOnSentinel(os.getpid()))
    Trainer(uninterrupted, batch_size=20, chunk_size=5, progress=False).fit(
        poisoned(X, 70), y, epochs=2, shuffle=False)
    np.testing.assert_array_equal(resumed.model.params, uninterrupted.params)


def test_exception_in_a_worker_keeps_its_type_and_the_trainer_recovers():
    """ValueError raised in a worker reaches the caller as the same ValueError with the same
    message at n_jobs 1 and 2, the worker's traceback as its cause; pool gone; fit works
    again and the whole sequence matches n_jobs=1."""
    final = []
    for n_jobs in (1, 2):
        model = faulty_mlp(RaiseOnSentinel())
        X, y = make_data(model, 120)
        recorder = Recorder()
        trainer = Trainer(model, n_jobs=n_jobs, batch_size=20, chunk_size=5, progress=False)
        segments = shm_segments(os.getpid())
        with pytest.raises(ValueError) as info:
            trainer.fit(poisoned(X, 50), y, epochs=1, shuffle=False, callbacks=[recorder])
        assert type(info.value) is ValueError and str(info.value) == BAD_MESSAGE
        if n_jobs > 1:  # example 50 is in chunk 2 of step 2: the worker's group
            remote = str(info.value.__cause__)
            assert "RaiseOnSentinel" in remote or "faulty_layers" in remote, remote
            assert not trainer.engine_started
            assert shm_segments(os.getpid()) <= segments
            assert len(recorder.pids) == 1  # n_jobs=2: the master and one worker
            assert wait_gone(recorder.pids) == []
        stopped_at = trainer.step_in_epoch
        trainer.fit(X, y, epochs=1, shuffle=False)
        trainer.close()
        final.append((stopped_at, model.params))
    assert final[1][0] == final[0][0] == 2  # example 50 is in step 2
    np.testing.assert_array_equal(final[1][1], final[0][1])


def test_the_pool_keeps_serving_after_an_error_in_a_worker():
    """The engine itself survives a chunk's exception: the next gradient on the same pool
    (same worker process) equals the serial engine's."""
    from partrain.engine import SerialEngine

    model = faulty_mlp(RaiseOnSentinel())
    X, y = make_data(model, 40)
    engine = LokyEngine(model, chunk_size=5, n_processes=2, batch_size=20)
    out = np.empty_like(model.params)
    try:
        engine.bind(poisoned(X, 15), y)
        with pytest.raises(ValueError, match=BAD_MESSAGE):
            engine.gradient(np.arange(20), (0, 1), out)
        engine.bind(X, y)
        engine.gradient(np.arange(20), (0, 1), out)
        pids = engine.worker_pids()
        engine.gradient(np.arange(20), (0, 2), out)
        assert engine.worker_pids() == pids and len(pids) == 1
    finally:
        engine.close(kill=True)
    serial = SerialEngine(model, chunk_size=5, batch_size=20)
    serial.bind(X, y)
    expected = np.empty_like(out)
    serial.gradient(np.arange(20), (0, 2), expected)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_non_finite_loss_stops_without_applying_the_update(tmp_path, n_jobs):
    """NaN loss -> NonFiniteLossError naming epoch and step; params are those of the last
    step, the checkpoint of the last epoch is byte-identical."""
    model = faulty_mlp(InfOnSentinel())
    X, y = make_data(model, 100)
    checkpoint = tmp_path / "nan.npz"
    trainer = Trainer(model, n_jobs=n_jobs, batch_size=20, chunk_size=5, checkpoint=checkpoint,
                      progress=False)
    trainer.fit(X, y, epochs=1, shuffle=False)
    saved = checkpoint.read_bytes()
    recorder = Recorder()
    with pytest.raises(NonFiniteLossError, match="epoch 1 step 2"), np.errstate(all="ignore"):
        trainer.fit(poisoned(X, 45), y, epochs=1, shuffle=False, callbacks=[recorder])
    assert checkpoint.read_bytes() == saved
    assert (trainer.epoch, trainer.step_in_epoch) == (1, 2)
    np.testing.assert_array_equal(model.params, recorder.params)
    assert not trainer.engine_started


def test_non_finite_loss_leaves_batchnorm_statistics_untouched():
    """The failed step's (infinite) batch statistics are not folded into the running buffers."""
    model = faulty_mlp(InfOnSentinel(), batchnorm=True)
    X, y = make_data(model, 100)
    recorder = Recorder()
    trainer = Trainer(model, batch_size=20, chunk_size=5, progress=False)
    with pytest.raises(NonFiniteLossError, match="epoch 0 step 2"), np.errstate(all="ignore"):
        trainer.fit(poisoned(X, 45), y, epochs=1, shuffle=False, callbacks=[recorder])
    np.testing.assert_array_equal(model.params, recorder.params)
    np.testing.assert_array_equal(model.buffers, recorder.buffers)


# ----------------------------------------------------------------------------- signals


def read_started_line(proc, timeout=60.0) -> str:
    """The script's "started ..." line, or fail with its stderr."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 0.1)[0]:
            line = proc.stdout.readline()
            if line.startswith("started"):
                return line
    proc.kill()
    pytest.fail(f"the training script never started; stderr:\n{proc.communicate()[1]}")


def stop_tree(proc, children) -> str:
    """SIGKILL a still running script and its children (started by this test); its stderr."""
    if proc.poll() is not None and proc.stderr.closed:
        return ""
    for pid in [proc.pid, *children]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        return proc.communicate(timeout=5)[1][-5000:]
    except (subprocess.TimeoutExpired, ValueError):
        return ""


def replay_to(epoch, step):
    """A serial trainer of the script's run stopped after `step` steps of epoch `epoch`."""
    trainer, X, y = make_run(n_jobs=1)
    if epoch:
        trainer.fit(X, y, epochs=epoch)
    if step:
        with pytest.raises(KeyboardInterrupt):
            trainer.fit(X, y, epochs=1, callbacks=[InterruptAt(epoch, step - 1)])
    return trainer


@pytest.mark.parametrize("signum, exception", [
    (signal.SIGINT, "KeyboardInterrupt|TrainingInterrupted"),  # the latter subclasses the former
    (signal.SIGTERM, "TrainingInterrupted"),
], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_training_with_a_checkpoint_and_no_leftovers(tmp_path, signum, exception):
    """A signal to a training process: exit < 10 s, non-zero code, a checkpoint equal to a
    replay up to its step, no surviving child process, no shared-memory segment left."""
    checkpoint = tmp_path / "run.npz"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(checkpoint)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children = set()
    try:
        workers = [int(pid) for pid in read_started_line(proc).split()[1:]]
        children = descendants(proc.pid)
        assert len(workers) == 2 and set(workers) <= children
        time.sleep(0.05)  # land somewhere inside the second epoch
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)  # the script's faulthandler dumps every thread
        time.sleep(0.5)
        stderr = stop_tree(proc, children)
        pytest.fail(f"no exit within 10 s of {signal.Signals(signum).name}; stderr:\n{stderr}")
    finally:
        stop_tree(proc, children)
    assert proc.returncode != 0
    assert re.search(exception, stderr), stderr
    assert wait_gone(children) == []
    assert shm_segments(proc.pid) == set()
    assert os.listdir(tmp_path) == ["run.npz"]  # no temporary file left
    resumed = Trainer.from_checkpoint(checkpoint)
    assert resumed.epoch >= 1
    replayed = replay_to(resumed.epoch, resumed.step_in_epoch)
    np.testing.assert_array_equal(resumed.model.params, replayed.model.params)
    np.testing.assert_array_equal(resumed.optimizer.state["m"], replayed.optimizer.state["m"])
    assert resumed.optimizer.state["step"] == replayed.optimizer.state["step"]
    assert resumed.history.history["loss"] == replayed.history.history["loss"]


# ----------------------------------------------------------------------------- resuming


@pytest.mark.parametrize("config", ["mlp", "mlp_dropout", "batchnorm"])
def test_resume_from_epoch_checkpoint_equals_uninterrupted(tmp_path, config):
    """1 epoch + save_checkpoint + from_checkpoint().fit(2 epochs) == 3 epochs."""
    model, X, y, validation, kwargs = setup(config)
    trainer = Trainer(model, **kwargs)
    trainer.fit(X, y, epochs=1, validation_data=validation)
    path = trainer.save_checkpoint(tmp_path / "epoch1.npz")
    resumed = Trainer.from_checkpoint(path, progress=False)
    assert (resumed.epoch, resumed.step_in_epoch) == (1, 0)
    resumed.fit(X, y, epochs=2, validation_data=validation)
    got = Result(resumed.model.params, resumed.model.buffers, resumed.history.history, 0)
    assert_same_run(got, reference(config, epochs=3))


def test_resume_from_mid_epoch_interrupt_equals_uninterrupted(tmp_path):
    """Ctrl-C after step 2 of epoch 1 (n_jobs=2) writes a checkpoint; resuming it (n_jobs=1)
    for 2 epochs finishes epoch 1 and runs epoch 2: same as 3 uninterrupted epochs."""
    model, X, y, validation, kwargs = setup("ragged")
    checkpoint = tmp_path / "mid.npz"
    trainer = Trainer(model, n_jobs=2, checkpoint=checkpoint, **kwargs)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(X, y, epochs=3, validation_data=validation, callbacks=[InterruptAt(1, 2)])
    assert not trainer.engine_started
    resumed = Trainer.from_checkpoint(checkpoint, progress=False)
    assert (resumed.epoch, resumed.step_in_epoch) == (1, 3)
    resumed.fit(X, y, epochs=2, validation_data=validation)
    got = Result(resumed.model.params, resumed.model.buffers, resumed.history.history, 0)
    assert_same_run(got, reference("ragged", epochs=3))


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture
def checkpoint_file(tmp_path):
    """A checkpoint written by fit (in a folder fit has to create) after 2 epochs."""
    model, X, y, _, kwargs = setup("batchnorm")
    path = tmp_path / "runs" / "ckpt.npz"
    trainer = Trainer(model, checkpoint=path, **kwargs)
    trainer.fit(X, y, epochs=2)
    return path, trainer


def test_checkpoint_is_atomic_and_pickle_free(checkpoint_file):
    """Only the checkpoint in its folder (no temp file), readable with allow_pickle=False."""
    path, trainer = checkpoint_file
    trainer.save_checkpoint(path)  # overwrite in place
    assert os.listdir(path.parent) == ["ckpt.npz"]
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    np.testing.assert_array_equal(arrays["params"], trainer.model.params)
    np.testing.assert_array_equal(arrays["buffers"], trainer.model.buffers)
    resumed = Trainer.from_checkpoint(path)
    assert (resumed.epoch, resumed.history.epochs) == (2, 2)
    np.testing.assert_array_equal(resumed.optimizer.state["v"], trainer.optimizer.state["v"])


def _truncate(path, model):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _foreign_npz(path, model):
    np.savez(path, weights=np.arange(3.0))


def _model_file(path, model):
    model.save(path)


def _incomplete_checkpoint(path, model):
    write_npz(path, "checkpoint", {"config": model.config()},
              {"params": model.params, "buffers": model.buffers})


def _garbage(path, model):
    path.write_bytes(b"not a zip file at all")


@pytest.mark.parametrize("spoil", [_truncate, _foreign_npz, _model_file, _incomplete_checkpoint,
                                   _garbage])
def test_bad_checkpoint_gives_a_clear_error_naming_the_path(checkpoint_file, spoil):
    """Truncated, foreign, wrong-kind, incomplete or garbage files -> FileFormatError(path)."""
    path, trainer = checkpoint_file
    spoil(path, trainer.model)
    with pytest.raises(FileFormatError, match=str(path).replace("\\", "\\\\")) as info:
        Trainer.from_checkpoint(path)
    assert isinstance(info.value, ValueError)


def test_missing_checkpoint_and_fixed_overrides_are_refused(checkpoint_file):
    """A missing file is FileNotFoundError; changing batch_size on resume is a ValueError."""
    path, _ = checkpoint_file
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        Trainer.from_checkpoint(path.parent / "nope.npz")
    with pytest.raises(ValueError, match="batch_size"):
        Trainer.from_checkpoint(path, batch_size=7)


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("kwargs, match", [
    ({"n_jobs": 0}, "n_jobs"),
    ({"n_jobs": True}, "n_jobs"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": -1}, "batch_size"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"checkpoint_every": 0}, "checkpoint_every"),
    ({"backend": "threads"}, r"backend.*'dask', 'loky'"),
], ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_bad_trainer_argument_is_named(kwargs, match):
    """Each bad constructor argument: ValueError naming it, and no process started."""
    before = descendants(os.getpid())
    with pytest.raises(ValueError, match=match):
        Trainer(zoo.digits_cnn(), **{"n_jobs": 2, **kwargs})
    assert descendants(os.getpid()) <= before


def _X(m=20):
    return np.random.default_rng(0).random((m, 8, 8, 1))


def _y(m=20):
    return np.arange(m) % 10


@pytest.mark.parametrize("fit_args, match", [
    ({"X": _X(), "y": _y(19)}, "`X` and `y`"),
    ({"X": _X(), "y": np.where(_y() == 3, 10, _y())}, r"`y`.*\[0, 9\]"),
    ({"X": _X().reshape(20, 64), "y": _y()}, r"`X`.*\(m, 8, 8, 1\)"),
    ({"X": _X()[:, :, :7], "y": _y()}, r"`X`.*\(m, 8, 8, 1\)"),
    ({"X": np.where(_X() > 0.9, np.nan, _X()), "y": _y()}, "`X`.*NaN"),
    ({"X": _X(0), "y": _y(0)}, "`X`.*at least one"),
    ({"epochs": 0}, "epochs"),
    ({"epochs": 1.5}, "epochs"),
    ({"validation_data": (_X(5),)}, "validation_data"),
    ({"validation_data": (_X(5).reshape(5, 64), _y(5))}, "validation"),
], ids=["length", "label", "flat_images", "image_size", "nan", "empty", "epochs0",
        "epochs_float", "validation_pair", "validation_shape"])
def test_bad_fit_argument_is_named_before_any_worker_starts(fit_args, match):
    """Each bad fit argument: ValueError naming it; no engine, no process started."""
    trainer = Trainer(zoo.digits_cnn(), n_jobs=2, batch_size=8, progress=False)
    before = descendants(os.getpid())
    args = {"X": _X(), "y": _y(), "epochs": 1, **fit_args}
    with pytest.raises(ValueError, match=match):
        trainer.fit(args.pop("X"), args.pop("y"), **args)
    assert not trainer.engine_started
    assert descendants(os.getpid()) <= before
    assert trainer.epoch == 0 and trainer.history.epochs == 0


# ----------------------------------------------------------------------------- early stopping


@pytest.mark.parametrize("monitor, n_jobs", [("loss", 1), ("val_accuracy", 2)])
def test_early_stopping_stops_and_restores_the_best_params(monitor, n_jobs):
    """No improvement can beat min_delta=1e9: stop after epoch 1, params of epoch 0 back."""
    stopper = EarlyStopping(monitor=monitor, patience=0, min_delta=1e9,
                            restore_best_weights=True)
    model, X, y, validation, kwargs = setup("batchnorm")
    with Trainer(model, n_jobs=n_jobs, **kwargs) as trainer:
        trainer.fit(X, y, epochs=10, validation_data=validation, callbacks=[stopper])
        if n_jobs > 1:
            assert isinstance(trainer.engine, LokyEngine)
    assert (trainer.epoch, trainer.history.epochs, stopper.best_epoch) == (2, 2, 0)
    best = reference("batchnorm", epochs=1)
    np.testing.assert_array_equal(model.params, best.params)
    np.testing.assert_array_equal(model.buffers, best.buffers)


@pytest.mark.parametrize("n_jobs", [1, 2])
@pytest.mark.parametrize("n_examples", [0, 17])
def test_train_step_refuses_an_empty_or_oversized_batch_in_one_line(n_jobs, n_examples):
    """A batch of 0 or more than batch_size examples is a ValueError naming the sizes, and
    leaves the parameters and the optimizer untouched."""
    model = zoo.digits_cnn(seed=0)
    X = np.random.default_rng(0).random((40, 8, 8, 1)).astype(np.float32)
    y = np.arange(40) % 10
    trainer = Trainer(model, n_jobs=n_jobs, batch_size=16, chunk_size=8, progress=False)
    before = model.params.copy()
    with trainer, trainer.session(X, y):
        with pytest.raises(ValueError, match=f"1 to 16 examples .*got {n_examples}"):
            trainer.train_step(np.arange(n_examples))
    np.testing.assert_array_equal(model.params, before)
    assert trainer.optimizer.state["step"] == 0
