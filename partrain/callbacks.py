"""Training history and callbacks: Keras's protocol and meanings, on a partrain Trainer.

Every callback's state is plain data (`state_dict()` / `load_state_dict()`: ints, floats,
strings and NumPy arrays), so that a checkpoint holds it and a resumed run stops, logs, saves
and reduces exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
from pathlib import Path

import numpy as np

from .io import write_text

HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy", "examples_per_s", "epoch_time_s",
                "startup_s", "lr", "workers")
METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")  # what a callback can monitor


class History:
    """Per-epoch metrics: `history["loss"][e]` is the mean training loss of epoch e, etc.

    Keys: `loss`, `accuracy` (means over the epoch's training examples), `val_loss`,
    `val_accuracy` (end of epoch, empty without validation), `examples_per_s` and
    `epoch_time_s` (training time, start-up excluded), `startup_s` (seconds spent starting
    the engine and its worker processes during that epoch: 0 once they run), `lr` and
    `workers` (the most processes that computed chunks in any step of the epoch).
    """

    def __init__(self, history: dict | None = None):
        self.history: dict[str, list] = {key: [] for key in HISTORY_KEYS}
        for key, values in (history or {}).items():
            self.history[key] = list(values)

    @property
    def epochs(self) -> int:
        """Number of epochs recorded."""
        return len(self.history["loss"])

    @property
    def epoch(self) -> list[int]:
        """The indices (from 0) of the epochs recorded, as Keras's `History.epoch`."""
        return list(range(self.epochs))

    def append(self, logs: dict) -> None:
        """Add one epoch's metrics, as plain Python numbers (JSON-ready, as Keras's)."""
        for key, value in logs.items():
            plain = value.item() if isinstance(value, np.generic) else value
            self.history.setdefault(key, []).append(plain)

    def __repr__(self) -> str:
        keys = sorted(k for k, v in self.history.items() if v)
        return f"History({self.epochs} epochs, keys={keys})"


class Callback:
    """Override any of these; `trainer.stop_training = True` ends `fit` after this epoch.

    `epoch` is the trainer's epoch index (from 0, counting every epoch of the run, resumed
    ones included). A callback with state returns it from `state_dict()` as plain data and
    takes it back in `load_state_dict()`: the trainer saves it in its checkpoints and, after
    `Trainer.from_checkpoint`, hands it to the callback of the same class (and rank among
    callbacks of that class) in the next `fit`, before `on_train_begin`.
    """

    def on_train_begin(self, trainer) -> None: ...

    def on_epoch_begin(self, trainer, epoch: int) -> None: ...

    def on_batch_end(self, trainer, step: int, logs: dict) -> None: ...

    def on_epoch_end(self, trainer, epoch: int, logs: dict) -> None: ...

    def on_train_end(self, trainer) -> None: ...

    def state_dict(self) -> dict:
        """What a checkpoint must hold to resume this callback (empty: nothing)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Take back a `state_dict()` (from a checkpoint) before `on_train_begin`."""


def say(text: str) -> None:
    """One line on stderr, written above any progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(text, file=sys.stderr)


def _check_monitor(owner: str, monitor: str) -> str:
    if monitor not in METRICS:
        hint = ""
        if monitor in ("acc", "val_acc"):
            hint = f" (Keras 2 called it {monitor!r}; use {monitor.replace('acc', 'accuracy')!r})"
        raise ValueError(f"Invalid monitor for {owner}: {monitor!r}, expected one of "
                         f"{list(METRICS)}{hint}.")
    return monitor


def _check_mode(mode: str, monitor: str) -> bool:
    """True when larger is better: mode 'max', or 'auto' for an accuracy (Keras's rule)."""
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"Invalid mode: {mode!r}, expected one of ['auto', 'max', 'min'].")
    return mode == "max" or (mode == "auto" and "acc" in monitor)


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}.")
    return int(value)


def _check_real(name: str, value, minimum: float | None = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or (minimum is not None and value < minimum):
        rule = "a finite number" + ("" if minimum is None else f" >= {minimum:g}")
        raise ValueError(f"`{name}` must be {rule}, got {value!r}.")
    return float(value)


def monitored_value(owner: Callback, logs: dict) -> float:
    """logs[owner.monitor], or a ValueError naming the keys there are."""
    if owner.monitor not in logs:
        raise ValueError(
            f"{type(owner).__name__} monitors {owner.monitor!r}, but the epoch logs only have "
            f"{sorted(logs)}; pass validation_data or validation_split to fit for 'val_*' "
            "metrics."
        )
    return float(logs[owner.monitor])


class EarlyStopping(Callback):
    """Stop training when `monitor` has stopped improving, as Keras's `EarlyStopping`.

    An epoch improves when its value beats the best so far by more than `min_delta`
    (``value < best - min_delta`` when minimising, ``value > best + min_delta`` when
    maximising). Training stops after `patience` epochs in a row without improvement
    (patience=0: at the first one), and a line on stderr says when and why. The state (best
    value, epoch, count) is reset at each `fit`, except when resuming from a checkpoint, which
    carries it on; a checkpoint of a run that had stopped makes the resumed `fit` stop at once.

    Parameters
    ----------
    monitor : {"val_loss", "val_accuracy", "loss", "accuracy"}
    min_delta : float
        The smallest change that counts as an improvement.
    patience : int
        Epochs without improvement before stopping.
    mode : {"auto", "min", "max"}
        "auto": maximise accuracies, minimise losses.
    restore_best_weights : bool
        At the end of `fit`, give the model back the parameters (and batch-norm buffers) of
        its best epoch, as Keras does whether or not training stopped early. One copy of the
        flat vector is kept. Off by default, as in Keras: the model keeps its last epoch's.
    verbose : int
        0: silent; 1 (default): say on stderr when training stops and when weights are
        restored.

    Attributes
    ----------
    best, best_epoch, wait, stopped_epoch
        The best value so far and its epoch (None before any), epochs since it, and the
        epoch after which training was stopped (None if it was not).
    """

    def __init__(self, monitor: str = "val_loss", min_delta: float = 0.0, patience: int = 0,
                 mode: str = "auto", restore_best_weights: bool = False, verbose: int = 1):
        self.monitor = _check_monitor("EarlyStopping", monitor)
        self.maximize = _check_mode(mode, monitor)
        self.mode = mode
        self.min_delta = abs(_check_real("min_delta", min_delta, minimum=None))
        self.patience = _check_count("patience", patience)
        self.restore_best_weights = bool(restore_best_weights)
        self.verbose = int(verbose)
        self._reset()
        self._resumed = False

    def _reset(self) -> None:
        self.wait = 0
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.stopped_epoch: int | None = None
        self.best_params: np.ndarray | None = None
        self.best_buffers: np.ndarray | None = None

    def _improves(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.maximize:
            return value - self.min_delta > self.best
        return value + self.min_delta < self.best

    def on_train_begin(self, trainer):
        if not self._resumed:
            self._reset()
            return
        self._resumed = False
        if self.stopped_epoch is not None:
            trainer.stop_training = True
            if self.verbose:
                say(f"EarlyStopping: the checkpoint's run stopped after epoch "
                    f"{self.stopped_epoch + 1} ({self.monitor} had not improved for "
                    f"{self.wait} epochs); no more epochs are trained.")

    def on_epoch_end(self, trainer, epoch, logs):
        value = monitored_value(self, logs)
        self.wait += 1
        if self._improves(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best_weights:
                self.best_params = trainer.model.params.copy()
                self.best_buffers = trainer.model.buffers.copy()
            return
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            trainer.stop_training = True
            if self.verbose:
                change = "rise above" if self.maximize else "fall below"
                target = self.best + self.min_delta if self.maximize \
                    else self.best - self.min_delta
                say(f"EarlyStopping: stopped after epoch {epoch + 1}: {self.monitor} did not "
                    f"{change} {target:.6g} (best {self.best:.6g} at epoch "
                    f"{self.best_epoch + 1}, min_delta {self.min_delta:g}) for {self.wait} "
                    f"epoch{'s' * (self.wait != 1)} in a row (patience {self.patience}).")

    def on_train_end(self, trainer):
        if self.restore_best_weights and self.best_params is not None:
            trainer.model.params[...] = self.best_params
            trainer.model.buffers[...] = self.best_buffers
            if self.verbose:
                say(f"EarlyStopping: restored the weights of epoch {self.best_epoch + 1} "
                    f"({self.monitor} {self.best:.6g}).")

    def state_dict(self) -> dict:
        state = {"wait": self.wait, "best": self.best, "best_epoch": self.best_epoch,
                 "stopped_epoch": self.stopped_epoch}
        if self.best_params is not None:
            state.update(best_params=self.best_params, best_buffers=self.best_buffers)
        return state

    def load_state_dict(self, state: dict) -> None:
        self._reset()
        self.wait, self.best = int(state["wait"]), state["best"]
        self.best_epoch, self.stopped_epoch = state["best_epoch"], state["stopped_epoch"]
        if "best_params" in state:
            self.best_params = np.array(state["best_params"], copy=True)
            self.best_buffers = np.array(state["best_buffers"], copy=True)
        self._resumed = True


class ModelCheckpoint(Callback):
    """Save the model (a model file, `Sequential.save`) when `monitor` improves.

    As Keras's `ModelCheckpoint`: with `save_best_only` (the default here) the file is written
    at the end of each epoch whose value beats the best so far (strictly), so it always
    holds the best model; otherwise at every epoch. `path` may hold `{epoch}` (from 1) and
    metric fields, e.g. "best-{epoch:02d}-{val_loss:.3f}.npz". The best value is kept
    across fits of the same callback, and in checkpoints. This is not the resume checkpoint
    (`Trainer(checkpoint=...)`), which holds the last state of the run.

    Parameters
    ----------
    path : str or os.PathLike
    monitor : {"val_loss", "val_accuracy", "loss", "accuracy"}
    save_best_only : bool
    mode : {"auto", "min", "max"}
    verbose : int
        1: a line on stderr at each save.
    """

    def __init__(self, path: str | os.PathLike, monitor: str = "val_loss",
                 save_best_only: bool = True, mode: str = "auto", verbose: int = 0):
        self.path = os.fspath(path)
        self.monitor = _check_monitor("ModelCheckpoint", monitor)
        self.maximize = _check_mode(mode, monitor)
        self.save_best_only = bool(save_best_only)
        self.verbose = int(verbose)
        self.best: float | None = None
        self.best_epoch: int | None = None

    def on_epoch_end(self, trainer, epoch, logs):
        value = monitored_value(self, logs)
        improved = self.best is None or (value > self.best if self.maximize
                                         else value < self.best)
        if improved:
            self.best, self.best_epoch = value, epoch
        if improved or not self.save_best_only:
            path = self.path.format(epoch=epoch + 1, **logs) if "{" in self.path else self.path
            trainer.model.save(path)
            if self.verbose:
                say(f"ModelCheckpoint: epoch {epoch + 1}, {self.monitor} {value:.6g}: model "
                    f"saved to {path}")

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]


class CSVLogger(Callback):
    """One CSV row per epoch: `epoch` (from 0) then every history key, as Keras's `CSVLogger`.

    The columns are those of the first epoch logged, sorted (a missing value is "NA"). A new
    `fit` starts the file afresh unless `append`. Resuming from a checkpoint appends: the
    file keeps its rows of the epochs the checkpoint holds (rows an interrupted run wrote
    after its checkpoint are dropped, they will be written again) and goes on from there.
    Each row is written and closed at the end of its epoch.
    """

    def __init__(self, path: str | os.PathLike, separator: str = ",", append: bool = False):
        self.path = Path(path)
        if not isinstance(separator, str) or len(separator) != 1:
            raise ValueError(f"`separator` must be one character, got {separator!r}.")
        self.separator = separator
        self.append = bool(append)
        self.keys: list[str] | None = None
        self._resumed = False

    def _rows(self, text: str) -> list[list[str]]:
        return list(csv.reader(io.StringIO(text), delimiter=self.separator))

    def _format(self, rows: list[list]) -> str:
        out = io.StringIO()
        csv.writer(out, delimiter=self.separator, lineterminator="\n").writerows(rows)
        return out.getvalue()

    def on_train_begin(self, trainer):
        resumed, self._resumed = self._resumed, False
        if resumed or self.append:
            rows = self._rows(self.path.read_text()) if self.path.is_file() else []
            if rows and (self.keys is None or rows[0] == ["epoch", *self.keys]):
                self.keys = rows[0][1:]
                kept = [row for row in rows[1:] if row and row[0].isdigit()
                        and (not resumed or int(row[0]) < trainer.epoch)]
                write_text(self.path, self._format([rows[0], *kept]))
                return
        self.keys = None
        write_text(self.path, "")

    def on_epoch_end(self, trainer, epoch, logs):
        rows = []
        if self.keys is None:
            self.keys = sorted(logs)
            rows.append(["epoch", *self.keys])
        rows.append([epoch, *(logs.get(key, "NA") for key in self.keys)])
        with open(self.path, "a", newline="") as f:
            f.write(self._format(rows))

    def state_dict(self) -> dict:
        return {"keys": self.keys}

    def load_state_dict(self, state: dict) -> None:
        self.keys = None if state["keys"] is None else list(state["keys"])
        self._resumed = True


class ReduceLROnPlateau(Callback):
    """Multiply the learning rate by `factor` when `monitor` has stopped improving, as
    Keras's `ReduceLROnPlateau`.

    An epoch improves when it beats the best by more than `min_delta`; after `patience`
    epochs in a row without improvement the rate is reduced (never below `min_lr`, and not at
    all once it is there), the count restarts, and `cooldown` epochs pass before counting
    again. The reduction applies from the next epoch, on top of the trainer's `lr_schedule`
    (the scheduled rate times factor ** reductions), and stays for later fits of the same
    callback; best value, count and cooldown restart at each `fit` (resuming from a
    checkpoint carries them on).

    Parameters
    ----------
    monitor : {"val_loss", "val_accuracy", "loss", "accuracy"}
    factor : float in (0, 1)
    patience : int
    mode : {"auto", "min", "max"}
    min_delta : float
    cooldown : int
    min_lr : float
    verbose : int
        1 (default): a line on stderr at each reduction.
    """

    def __init__(self, monitor: str = "val_loss", factor: float = 0.1, patience: int = 10,
                 mode: str = "auto", min_delta: float = 1e-4, cooldown: int = 0,
                 min_lr: float = 0.0, verbose: int = 1):
        self.monitor = _check_monitor("ReduceLROnPlateau", monitor)
        self.maximize = _check_mode(mode, monitor)
        factor = _check_real("factor", factor)
        if not 0 < factor < 1:
            raise ValueError(f"`factor` must be in (0, 1), got {factor!r}.")
        self.factor = factor
        self.patience = _check_count("patience", patience)
        self.min_delta = _check_real("min_delta", min_delta)
        self.cooldown = _check_count("cooldown", cooldown)
        self.min_lr = _check_real("min_lr", min_lr)
        self.verbose = int(verbose)
        self.reductions = 0
        self._reset()
        self._resumed = False

    def _reset(self) -> None:
        self.best: float | None = None
        self.wait = 0
        self.cooldown_counter = 0

    def _improves(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.maximize:
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def on_train_begin(self, trainer):
        if not self._resumed:
            self._reset()
        self._resumed = False

    def on_epoch_begin(self, trainer, epoch):
        if self.reductions:
            trainer.optimizer.lr = max(trainer.optimizer.lr * self.factor ** self.reductions,
                                       self.min_lr)

    def on_epoch_end(self, trainer, epoch, logs):
        value = monitored_value(self, logs)
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if self._improves(value):
            self.best, self.wait = value, 0
        elif self.cooldown_counter == 0:
            self.wait += 1
            if self.wait >= self.patience and trainer.optimizer.lr > self.min_lr:
                old = trainer.optimizer.lr
                self.reductions += 1
                self.cooldown_counter, self.wait = self.cooldown, 0
                if self.verbose:
                    say(f"ReduceLROnPlateau: {self.monitor} has not improved for "
                        f"{self.patience} epoch{'s' * (self.patience != 1)}: learning rate "
                        f"{old:.6g} -> {max(old * self.factor, self.min_lr):.6g} from epoch "
                        f"{epoch + 2}.")

    def state_dict(self) -> dict:
        return {"best": self.best, "wait": self.wait, "cooldown_counter": self.cooldown_counter,
                "reductions": self.reductions}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.wait = state["best"], int(state["wait"])
        self.cooldown_counter = int(state["cooldown_counter"])
        self.reductions = int(state["reductions"])
        self._resumed = True


class EpochSummary(Callback):
    """One line per epoch: train loss/accuracy, validation loss/accuracy, speed, time; before
    the first epoch of a fit, one line with the start-up time (not counted in ex/s)."""

    def __init__(self, total_epochs: int, quiet: bool):
        self.total, self.quiet = total_epochs, quiet
        self.first = True

    def on_train_begin(self, trainer):
        self.first = True

    def on_epoch_end(self, trainer, epoch, logs):
        if self.quiet:
            return
        from tqdm.auto import tqdm

        if self.first and "startup_s" in logs:
            tqdm.write(f"start-up {logs['startup_s']:.2f} s (engine, data and worker "
                       "processes; not counted in the ex/s below)")
        self.first = False
        val = "" if "val_loss" not in logs else \
            f"  val_loss {logs['val_loss']:.4f}  val_acc {logs['val_accuracy']:.4f}"
        tqdm.write(f"epoch {epoch + 1:>3}/{self.total}  loss {logs['loss']:.4f}  "
                   f"acc {logs['accuracy']:.4f}{val}  {logs['examples_per_s']:,.0f} ex/s  "
                   f"{logs['epoch_time_s']:.1f} s  {logs['workers']} proc")
