"""Training history and callbacks (a minimal Keras-like protocol)."""

from __future__ import annotations

import math

import numpy as np

HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy", "examples_per_s", "epoch_time_s",
                "lr")


class History:
    """Per-epoch metrics: `history["loss"][e]` is the mean training loss of epoch e, etc."""

    def __init__(self, history: dict | None = None):
        self.history: dict[str, list] = {key: [] for key in HISTORY_KEYS}
        for key, values in (history or {}).items():
            self.history[key] = list(values)

    @property
    def epochs(self) -> int:
        return len(self.history["loss"])

    def append(self, logs: dict) -> None:
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)

    def __repr__(self) -> str:
        keys = sorted(k for k, v in self.history.items() if v)
        return f"History({self.epochs} epochs, keys={keys})"


class Callback:
    """Override any of these; `trainer.stop_training = True` ends `fit` after this epoch."""

    def on_train_begin(self, trainer) -> None: ...

    def on_epoch_begin(self, trainer, epoch: int) -> None: ...

    def on_batch_end(self, trainer, step: int, logs: dict) -> None: ...

    def on_epoch_end(self, trainer, epoch: int, logs: dict) -> None: ...

    def on_train_end(self, trainer) -> None: ...


class EarlyStopping(Callback):
    """Stop when `monitor` has not improved by `min_delta` for `patience` epochs.

    With `restore_best`, the model gets back the parameters of its best epoch at the end
    (one copy of the flat vector is kept, nothing more).
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 5, min_delta: float = 0.0,
                 mode: str = "auto", restore_best: bool = True):
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"Invalid mode: {mode!r}, expected one of ['auto', 'max', 'min'].")
        if patience < 0:
            raise ValueError(f"`patience` must be >= 0, got {patience!r}.")
        self.monitor, self.patience, self.min_delta = monitor, patience, abs(min_delta)
        self.sign = -1.0 if mode == "max" or (mode == "auto" and "acc" in monitor) else 1.0
        self.restore_best = restore_best
        self.best = math.inf
        self.best_epoch = -1
        self.best_params: np.ndarray | None = None
        self.best_buffers: np.ndarray | None = None
        self.wait = 0

    def on_epoch_end(self, trainer, epoch, logs):
        if self.monitor not in logs:
            raise ValueError(
                f"EarlyStopping monitors {self.monitor!r}, but the epoch logs only have "
                f"{sorted(logs)}; pass validation_data to fit for 'val_*' metrics."
            )
        value = self.sign * logs[self.monitor]
        if value < self.best - self.min_delta:
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best:
                self.best_params = trainer.model.params.copy()
                self.best_buffers = trainer.model.buffers.copy()
        else:
            self.wait += 1
            if self.wait > self.patience:
                trainer.stop_training = True

    def on_train_end(self, trainer):
        if self.restore_best and self.best_params is not None and trainer.stop_training:
            trainer.model.params[...] = self.best_params
            trainer.model.buffers[...] = self.best_buffers
