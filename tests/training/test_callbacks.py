"""Callbacks with Keras's meanings (EarlyStopping, ReduceLROnPlateau, ModelCheckpoint,
CSVLogger), function learning-rate schedules, validation_split, History.epoch, the start-up
time, the progress bar, and callback state carried through checkpoints bit for bit (issue 12).

Keras's rules are written out here, independently of partrain, from its documentation and
source (keras/src/callbacks/early_stopping.py and reduce_lr_on_plateau.py, Keras 3): the
callbacks under test must agree with them epoch by epoch.
"""

import csv
import math

import numpy as np
import pytest
from faulty_layers import InterruptAt
from training_runs import reference, setup

import partrain
from partrain import Callback, Trainer, optim, zoo
from partrain.callbacks import CSVLogger, EarlyStopping, ModelCheckpoint, ReduceLROnPlateau

TIMING = ("examples_per_s", "epoch_time_s", "startup_s")  # the only keys that vary run to run


# ----------------------------------------------------------------------------- references


def keras_early_stopping(values, patience, min_delta=0.0, maximize=False):
    """Keras 3's EarlyStopping.on_epoch_end over `values`: (epochs run, best epoch)."""
    best, best_epoch, wait = (-math.inf if maximize else math.inf), 0, 0
    delta = abs(min_delta) if maximize else -abs(min_delta)
    for epoch, current in enumerate(values):
        wait += 1
        improved = (current - delta > best) if maximize else (current - delta < best)
        if improved:
            best, best_epoch, wait = current, epoch, 0
            continue
        if wait >= patience and epoch > 0:
            return epoch + 1, best_epoch
    return len(values), best_epoch


def keras_reduce_lr(values, lr, factor, patience, min_delta=1e-4, cooldown=0, min_lr=0.0):
    """Keras 3's ReduceLROnPlateau over `values` (mode min): the lr of each epoch."""
    best, wait, cooldown_counter, lrs = math.inf, 0, 0, []
    for current in values:
        lrs.append(lr)
        if cooldown_counter > 0:
            cooldown_counter -= 1
            wait = 0
        if current < best - min_delta:
            best, wait = current, 0
        elif not cooldown_counter > 0:
            wait += 1
            if wait >= patience and lr > min_lr:
                lr = max(lr * factor, min_lr)
                cooldown_counter, wait = cooldown, 0
    return lrs


class Script(Callback):
    """Replace logs[key] at each epoch end by a scripted value (for the callbacks after it)."""

    def __init__(self, key, values):
        self.key, self.values = key, values

    def on_epoch_end(self, trainer, epoch, logs):
        logs[self.key] = self.values[epoch]


class Snapshots(Callback):
    """params after each epoch, by epoch index."""

    def __init__(self):
        self.params = {}

    def on_epoch_end(self, trainer, epoch, logs):
        self.params[epoch] = trainer.model.params.copy()


def tiny(seed=0):
    """A 1-step-per-epoch trainer on 16 random examples: (trainer, X, y)."""
    model = zoo.mlp(dims=(8, 6, 3), seed=seed)
    rng = np.random.default_rng(seed)
    X = rng.random((16, 8)).astype(np.float32)
    return Trainer(model, optim.SGD(0.1), batch_size=16, progress=False), X, rng.integers(0, 3, 16)


# ----------------------------------------------------------------------------- EarlyStopping

SEQUENCES = {  # id: (monitored values, patience, min_delta, monitor)
    "keras-doc-example": ([1.0] * 10, 3, 0.0, "loss"),  # Keras's docstring: "only 4 epochs"
    "patience-0": ([3.0, 2.0, 2.5, 1.0, 1.0], 0, 0.0, "loss"),
    "patience-2": ([5.0, 4.0, 4.5, 4.2, 3.9, 4.0, 4.0, 4.0, 3.0], 2, 0.0, "loss"),
    "min-delta": ([5.0, 4.6, 4.2, 3.7, 3.6, 3.5, 3.4, 3.3], 1, 0.45, "loss"),
    "ties-do-not-improve": ([2.0, 1.0, 1.0, 1.0, 0.5, 0.4], 2, 0.0, "loss"),
    "accuracy-maximised": ([0.1, 0.3, 0.3, 0.35, 0.2, 0.2, 0.9], 2, 0.0, "accuracy"),
    "never-stops": ([5.0, 4.0, 3.0, 2.0, 1.0], 1, 0.0, "loss"),
}


@pytest.mark.parametrize("case", list(SEQUENCES))
def test_early_stopping_follows_keras(case):
    """Epochs run and best epoch equal Keras's rule (stop once `patience` epochs in a row did
    not improve: the old partrain ran one epoch more)."""
    values, patience, min_delta, monitor = SEQUENCES[case]
    trainer, X, y = tiny()
    stopper = EarlyStopping(monitor, patience=patience, min_delta=min_delta, verbose=0)
    history = trainer.fit(X, y, epochs=len(values), callbacks=[Script(monitor, values), stopper])
    expected_epochs, expected_best = keras_early_stopping(
        values, patience, min_delta, maximize=monitor == "accuracy")
    assert history.epochs == expected_epochs
    assert stopper.best_epoch == expected_best
    assert (stopper.stopped_epoch is None) == (expected_epochs == len(values))
    if case == "keras-doc-example":
        assert history.epochs == 4


def test_early_stopping_says_why_on_stderr(capsys):
    trainer, X, y = tiny()
    values = [3.0, 2.0, 2.5, 2.4, 2.2]
    trainer.fit(X, y, epochs=5, callbacks=[Script("loss", values), EarlyStopping("loss",
                                                                                 patience=2)])
    err = capsys.readouterr().err
    assert "EarlyStopping: stopped after epoch 4" in err, err
    assert "loss" in err and "best 2 at epoch 2" in err and "patience 2" in err, err


@pytest.mark.parametrize("restore", [False, True])
def test_early_stopping_restores_the_best_weights_only_if_asked(restore, capsys):
    """Keras's default keeps the last epoch's weights; restore_best_weights=True gives back
    those of the best epoch (here epoch 1 of 4) and says so."""
    trainer, X, y = tiny()
    snapshots = Snapshots()
    values = [3.0, 1.0, 2.0, 2.0]
    trainer.fit(X, y, epochs=6, callbacks=[Script("loss", values), snapshots, EarlyStopping(
        "loss", patience=2, restore_best_weights=restore)])
    assert sorted(snapshots.params) == [0, 1, 2, 3]
    expected = snapshots.params[1] if restore else snapshots.params[3]
    np.testing.assert_array_equal(trainer.model.params, expected)
    assert ("restored the weights of epoch 2" in capsys.readouterr().err) == restore


def test_early_stopping_is_reset_at_each_fit():
    """The same callback in a second fit starts afresh (Keras): its first epoch is the best
    so far even though it is worse than the first fit's best."""
    trainer, X, y = tiny()
    stopper = EarlyStopping("loss", patience=1, verbose=0)
    trainer.fit(X, y, epochs=4, callbacks=[Script("loss", [1.0, 2.0, 3.0, 4.0]), stopper])
    assert (trainer.epoch, stopper.stopped_epoch) == (2, 1)
    values = {2: 9.0, 3: 8.0, 4: 7.0}  # epochs continue from 2
    trainer.fit(X, y, epochs=3, callbacks=[Script("loss", values), stopper])
    assert trainer.epoch == 5 and stopper.stopped_epoch is None and stopper.best == 7.0


def test_early_stopping_on_validation_without_validation_is_refused_before_training():
    trainer, X, y = tiny()
    with pytest.raises(ValueError, match="EarlyStopping monitors 'val_loss'.*validation_split"):
        trainer.fit(X, y, epochs=2, callbacks=[EarlyStopping()])
    assert trainer.epoch == 0


@pytest.mark.parametrize("kwargs, match", [
    ({"monitor": "val_acc"}, "val_accuracy"), ({"monitor": "f1"}, "monitor"),
    ({"mode": "up"}, "mode"), ({"patience": -1}, "patience"), ({"patience": 1.5}, "patience"),
    ({"min_delta": float("nan")}, "min_delta"),
])
def test_early_stopping_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EarlyStopping(**kwargs)


# ----------------------------------------------------------------------------- ReduceLROnPlateau

PLATEAUS = {  # id: (values, factor, patience, min_delta, cooldown, min_lr)
    "patience-2": ([5, 4, 4, 4, 3.9, 3.9, 3.9, 3.9, 1], 0.5, 2, 1e-4, 0, 0.0),
    "cooldown": ([5, 5, 5, 5, 5, 5, 5, 5, 5, 5], 0.5, 1, 1e-4, 2, 0.0),
    "min-lr": ([5] * 8, 0.1, 1, 1e-4, 0, 0.015),
    "min-delta": ([5, 4.95, 4.9, 4.85, 4.0, 3.99, 3.98], 0.5, 2, 0.1, 0, 0.0),
}


@pytest.mark.parametrize("case", list(PLATEAUS))
def test_reduce_lr_on_plateau_follows_keras(case, capsys):
    values, factor, patience, min_delta, cooldown, min_lr = PLATEAUS[case]
    trainer, X, y = tiny()
    history = trainer.fit(X, y, epochs=len(values), callbacks=[
        Script("loss", [float(v) for v in values]),
        ReduceLROnPlateau("loss", factor, patience, min_delta=min_delta, cooldown=cooldown,
                          min_lr=min_lr)])
    expected = keras_reduce_lr(values, 0.1, factor, patience, min_delta, cooldown, min_lr)
    assert len(set(expected)) > 1, "degenerate case: no reduction"
    assert history.history["lr"] == pytest.approx(expected, rel=1e-12)
    assert "ReduceLROnPlateau: loss has not improved" in capsys.readouterr().err


def test_reduce_lr_on_plateau_multiplies_the_schedule():
    """With an inverse-time schedule the reduction multiplies the scheduled rate."""
    model = zoo.mlp(dims=(8, 6, 3))
    trainer = Trainer(model, optim.SGD(0.1), batch_size=16, lr_schedule=1.0, progress=False)
    _, X, y = tiny()
    history = trainer.fit(X, y, epochs=4, callbacks=[
        Script("loss", [1.0, 1.0, 1.0, 1.0]), ReduceLROnPlateau("loss", 0.5, 1, verbose=0)])
    # schedule 0.1 / (1 + e); reductions after epochs 1 and 2 (0: best, 1 and 2: no better)
    expected = [0.1, 0.1 / 2, 0.1 / 3 * 0.5, 0.1 / 4 * 0.25]
    assert history.history["lr"] == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------- ModelCheckpoint


def test_model_checkpoint_keeps_the_best_model(tmp_path):
    """The file holds the model of the epoch with the lowest val_loss, not the last one."""
    model, X, y, validation, kwargs = setup("mlp")
    trainer = Trainer(model, optim.Adam(0.01), **kwargs)
    snapshots = Snapshots()
    best = tmp_path / "best.npz"
    values = [3.0, 2.0, 1.0, 1.5, 1.0, 2.5]  # the best is epoch 2 (a tie later is not better)
    history = trainer.fit(X, y, epochs=6, validation_data=validation, callbacks=[
        Script("val_loss", values), snapshots, ModelCheckpoint(best)])
    assert history.epochs == 6
    saved = partrain.load(best)
    np.testing.assert_array_equal(saved.params, snapshots.params[2])
    assert not np.array_equal(saved.params, model.params)


def test_model_checkpoint_every_epoch_with_a_name_template(tmp_path):
    trainer, X, y = tiny()
    trainer.fit(X, y, epochs=3, callbacks=[
        ModelCheckpoint(tmp_path / "m-{epoch:02d}-{loss:.1f}.npz", monitor="loss",
                        save_best_only=False)])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 3 and names[0].startswith("m-01-") and names[2].startswith("m-03-")


# ----------------------------------------------------------------------------- CSVLogger


def read_csv(path, drop=TIMING):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in row.items() if k not in drop} for row in rows]


def test_csv_logger_writes_one_row_per_epoch_with_every_history_key(tmp_path):
    model, X, y, validation, kwargs = setup("mlp")
    path = tmp_path / "log.csv"
    history = Trainer(model, **kwargs).fit(X, y, epochs=3, validation_data=validation,
                                           callbacks=[CSVLogger(path)]).history
    header = path.read_text().splitlines()[0].split(",")
    assert header == ["epoch", *sorted(partrain.callbacks.HISTORY_KEYS)]
    rows = read_csv(path, drop=())
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    for key in partrain.callbacks.HISTORY_KEYS:
        assert [float(r[key]) for r in rows] == history[key], key  # repr: exact round trip


def test_csv_logger_starts_afresh_unless_append(tmp_path):
    trainer, X, y = tiny()
    path = tmp_path / "log.csv"
    trainer.fit(X, y, epochs=2, callbacks=[CSVLogger(path)])
    trainer.fit(X, y, epochs=1, callbacks=[CSVLogger(path)])
    assert [r["epoch"] for r in read_csv(path)] == ["2"]
    trainer.fit(X, y, epochs=2, callbacks=[CSVLogger(path, append=True)])
    assert [r["epoch"] for r in read_csv(path)] == ["2", "3", "4"]


def test_csv_logger_resumes_from_the_checkpoint_epoch(tmp_path):
    """A checkpoint copied after epoch 1 while the run went on to write epoch 2's row: the
    resumed run drops that row, writes it again, and the file equals an uninterrupted run's."""

    class CopyCheckpointAt(Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            if epoch == 0:
                trainer.save_checkpoint(tmp_path / "after-1.npz")

    runs = {}
    for name in ("full", "cut"):
        model, X, y, validation, kwargs = setup("mlp_dropout")
        trainer = Trainer(model, **kwargs)
        extra = [CopyCheckpointAt()] if name == "cut" else []
        trainer.fit(X, y, epochs=3, validation_data=validation,
                    callbacks=[CSVLogger(tmp_path / f"{name}.csv"), *extra])
        runs[name] = model
    assert len(read_csv(tmp_path / "cut.csv")) == 3
    resumed = Trainer.from_checkpoint(tmp_path / "after-1.npz", progress=False)
    resumed.fit(X, y, epochs=2, validation_data=validation,
                callbacks=[CSVLogger(tmp_path / "cut.csv")])
    assert read_csv(tmp_path / "cut.csv") == read_csv(tmp_path / "full.csv")
    np.testing.assert_array_equal(resumed.model.params, runs["full"].params)


# ----------------------------------------------------------------------------- resume, bit for bit


def callbacks_of(tmp_path, name):
    return [EarlyStopping(patience=2, restore_best_weights=True),
            ReduceLROnPlateau(factor=0.5, patience=1, min_delta=0.0),
            CSVLogger(tmp_path / f"{name}.csv"), ModelCheckpoint(tmp_path / f"{name}-best.npz")]


def test_a_resumed_run_stops_logs_saves_and_reduces_as_the_uninterrupted_one(tmp_path):
    """Ctrl-C in the middle of epoch 4 (after the lr was reduced, before early stopping) and
    resuming with fresh callbacks gives the uninterrupted run's parameters, history, lr,
    stopping epoch, best model and CSV rows, bit for bit. (Measured: val_loss stops
    improving after epoch 2; lr halves from epoch 4; stop after epoch 4.)"""
    model, X, y, _, kwargs = setup("mlp_dropout")
    full = Trainer(model, optim.Adam(0.01), **kwargs)
    full_cbs = callbacks_of(tmp_path, "full")
    snapshots = Snapshots()
    full.fit(X, y, epochs=10, validation_split=0.25, callbacks=[*full_cbs, snapshots])
    assert full_cbs[0].stopped_epoch == 4 and full.epoch == 5
    assert full.history.history["lr"][-1] < full.history.history["lr"][0]

    model, X, y, _, kwargs = setup("mlp_dropout")
    checkpoint = tmp_path / "ck.npz"
    cut = Trainer(model, optim.Adam(0.01), checkpoint=checkpoint, **kwargs)
    with pytest.raises(KeyboardInterrupt):
        cut.fit(X, y, epochs=10, validation_split=0.25,
                callbacks=[*callbacks_of(tmp_path, "cut"), InterruptAt(4, 1)])
    resumed = Trainer.from_checkpoint(checkpoint, progress=False, checkpoint=checkpoint)
    assert (resumed.epoch, resumed.step_in_epoch) == (4, 2)
    cbs = callbacks_of(tmp_path, "cut")
    resumed.fit(X, y, epochs=6, validation_split=0.25, callbacks=cbs)

    assert (resumed.epoch, cbs[0].stopped_epoch, cbs[0].best_epoch) == (5, 4, 2)
    np.testing.assert_array_equal(resumed.model.params, full.model.params)  # best restored
    for key, values in full.history.history.items():
        if key not in TIMING:
            assert resumed.history.history[key] == values, key
    assert read_csv(tmp_path / "cut.csv") == read_csv(tmp_path / "full.csv")
    np.testing.assert_array_equal(partrain.load(tmp_path / "cut-best.npz").params,
                                  partrain.load(tmp_path / "full-best.npz").params)
    # the checkpoint of the finished run holds the LAST weights (training state) and a
    # stopped EarlyStopping: resuming it trains nothing more and restores the best again
    np.testing.assert_array_equal(partrain.io.read_npz(checkpoint, "checkpoint")[1]["params"],
                                  snapshots.params[4])
    again = Trainer.from_checkpoint(checkpoint, progress=False)
    stopper = EarlyStopping(patience=2, restore_best_weights=True)
    again.fit(X, y, epochs=3, validation_split=0.25, callbacks=[stopper])
    assert again.epoch == 5 and again.history.epochs == 5
    np.testing.assert_array_equal(again.model.params, full.model.params)


def test_checkpoint_callback_state_survives_a_save_before_any_fit(tmp_path):
    trainer, X, y = tiny()
    trainer.fit(X, y, epochs=2, callbacks=[Script("loss", [2.0, 3.0]),
                                           EarlyStopping("loss", patience=5)])
    trainer.save_checkpoint(tmp_path / "a.npz")
    Trainer.from_checkpoint(tmp_path / "a.npz").save_checkpoint(tmp_path / "b.npz")
    stopper = EarlyStopping("loss", patience=5)
    Trainer.from_checkpoint(tmp_path / "b.npz", progress=False).fit(X, y, epochs=1, callbacks=[
        Script("loss", {2: 4.0}), stopper])
    assert (stopper.best, stopper.best_epoch, stopper.wait) == (2.0, 0, 2)


# ----------------------------------------------------------------------------- lr as a function


def test_lr_schedule_function_and_resume(tmp_path):
    """lr_schedule=f gives f(epoch) per epoch; the checkpoint names f and says it must be
    passed again; passed again, the run goes on bit for bit."""

    def halving(epoch):
        return 0.2 * 0.5 ** epoch

    model, X, y, validation, kwargs = setup("mlp")
    full = Trainer(model, optim.SGD(0.1), lr_schedule=halving, **kwargs)
    full.fit(X, y, epochs=3)
    assert full.history.history["lr"] == [0.2, 0.1, 0.05]
    model, X, y, validation, kwargs = setup("mlp")
    part = Trainer(model, optim.SGD(0.1), lr_schedule=halving, **kwargs)
    part.fit(X, y, epochs=1)
    part.save_checkpoint(tmp_path / "ck.npz")
    with pytest.raises(ValueError, match=r"test_callbacks\..*halving.*pass it again"):
        Trainer.from_checkpoint(tmp_path / "ck.npz")
    resumed = Trainer.from_checkpoint(tmp_path / "ck.npz", lr_schedule=halving)
    resumed.fit(X, y, epochs=2)
    np.testing.assert_array_equal(resumed.model.params, full.model.params)
    assert resumed.history.history["lr"] == [0.2, 0.1, 0.05]


def test_lr_schedule_override_is_refused_for_a_named_schedule(tmp_path):
    trainer, X, y = tiny()
    trainer.fit(X, y, epochs=1)
    trainer.save_checkpoint(tmp_path / "ck.npz")
    with pytest.raises(ValueError, match="lr_schedule.*cannot change"):
        Trainer.from_checkpoint(tmp_path / "ck.npz", lr_schedule=lambda e: 0.1)


@pytest.mark.parametrize("schedule, match", [
    (lambda: 0.1, "one argument"), (lambda e: -1.0, "finite number > 0, got -1.0 for epoch 0"),
    (lambda e: "0.1", "finite number"), ("fast", "lr_schedule"),
])
def test_bad_lr_schedule_functions(schedule, match):
    trainer_args = dict(batch_size=16, progress=False)
    with pytest.raises(ValueError, match=match):
        trainer, X, y = tiny()
        Trainer(trainer.model, lr_schedule=schedule, **trainer_args).fit(X, y)


# ----------------------------------------------------------------------------- validation_split


def test_validation_split_holds_out_the_last_fraction_as_keras():
    """validation_split=0.25 of 160 examples == training on the first 120 and validating on
    the last 40 (floor(160 * 0.75)), before any shuffling."""
    results = []
    for split in (True, False):
        model, X, y, _, kwargs = setup("mlp_dropout")
        trainer = Trainer(model, **kwargs)
        if split:
            history = trainer.fit(X, y, epochs=2, validation_split=0.25)
        else:
            history = trainer.fit(X[:120], y[:120], epochs=2, validation_data=(X[120:], y[120:]))
        results.append((model.params, history.history))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    assert results[0][1]["val_loss"] == results[1][1]["val_loss"]


def test_validation_data_wins_over_validation_split():
    model, X, y, validation, kwargs = setup("mlp")
    history = Trainer(model, **kwargs).fit(X, y, epochs=1, validation_data=validation,
                                           validation_split=0.5)
    assert history.history["val_loss"] == [model.evaluate(*validation)[0]]
    np.testing.assert_array_equal(model.params, reference("mlp", epochs=1).params)


@pytest.mark.parametrize("split, match", [(1.0, r"\[0, 1\)"), (-0.1, r"\[0, 1\)"),
                                          (True, "validation_split"), (0.95, "0 to train on")])
def test_bad_validation_split(split, match):
    trainer, X, y = tiny()
    with pytest.raises(ValueError, match=match):
        trainer.fit(X, y, validation_split=split)


# ----------------------------------------------------------------------------- history, progress


def test_history_epoch_lists_the_epoch_indices_as_keras():
    trainer, X, y = tiny()
    trainer.fit(X, y, epochs=2)
    trainer.fit(X, y, epochs=1)
    assert trainer.history.epoch == [0, 1, 2]


def test_startup_is_reported_apart_from_the_first_epoch():
    """n_jobs=2: starting the worker takes time (a new Python process) that goes to
    startup_s, not into epoch 1's time and examples/s; later epochs have none."""
    model, X, y, validation, kwargs = setup("mlp_dropout")
    with Trainer(model, n_jobs=2, **kwargs) as trainer:
        history = trainer.fit(X, y, epochs=2, validation_data=validation).history
    assert history["startup_s"][0] > 0.05, history["startup_s"]  # spawning a process
    assert history["startup_s"][1] == 0.0
    for seen_per_s, seconds in zip(history["examples_per_s"], history["epoch_time_s"]):
        assert seen_per_s == pytest.approx(len(X) / seconds)


def test_the_progress_bar_ends_with_the_validation_metrics(capsys):
    model, X, y, validation, kwargs = setup("mlp")
    kwargs["progress"] = True
    Trainer(model, **kwargs).fit(X, y, epochs=1, validation_data=validation)
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.index("loss=") < last.index("acc=") < last.index("val_loss=") < \
        last.index("val_acc="), last
    assert last.rstrip().endswith("]") and "val_acc=" in last.split(",")[-1], last


def test_from_checkpoint_of_an_old_file_without_callback_state(tmp_path):
    """Checkpoints written before callback states existed still resume."""
    trainer, X, y = tiny()
    trainer.fit(X, y, epochs=1)
    path = trainer.save_checkpoint(tmp_path / "old.npz")
    meta, arrays = partrain.io.read_npz(path, "checkpoint")
    del meta["callbacks"]
    meta["partial"].pop("startup")
    partrain.io.write_npz(path, "checkpoint", {k: v for k, v in meta.items()
                                               if k not in ("kind", "version")}, arrays)
    resumed = Trainer.from_checkpoint(path, progress=False)
    resumed.fit(X, y, epochs=1, callbacks=[EarlyStopping("loss")])
    assert resumed.epoch == 2


def test_startup_is_found_when_the_first_step_has_one_chunk():
    """A session whose first step has one chunk (no worker needed) starts the pool at the
    next step: that one carries the start-up time."""
    model = zoo.mlp(dims=(8, 6, 3))
    X = np.random.default_rng(0).random((40, 8)).astype(np.float32)
    y = np.arange(40) % 3
    with Trainer(model, n_jobs=2, batch_size=16, chunk_size=8, progress=False) as trainer:
        with trainer.session(X, y):
            trainer.train_step(np.arange(8), 0, 0)  # one chunk: the master alone
            assert trainer.engine.worker_pids() == []
            trainer.train_step(np.arange(8, 24), 0, 1)  # two chunks: the worker starts
            first_parallel = trainer.last_startup_s
            trainer.train_step(np.arange(24, 40), 0, 2)
            assert trainer.last_startup_s == 0.0
    assert first_parallel > 0.05, first_parallel
