"""Trainer: epochs, shuffling, minibatches, progress, validation, history, checkpoints.

The trainer knows nothing of processes: it asks its engine (`partrain.parallel`) for the summed
gradient of each minibatch, averages it, and applies ONE optimizer update on the master, which
alone holds the optimizer state.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import time
import weakref
from pathlib import Path

import numpy as np

from .callbacks import Callback, History
from .checks import positive_int
from .chunks import chunks_per_step, default_chunk_size
from .engine import ChunkTotals, WorkerCrashError
from .io import FileFormatError, read_npz, write_npz
from .model import Sequential, model_from_arrays
from .optim import (
    Adam,
    ConstantLR,
    FunctionSchedule,
    InverseTimeDecay,
    Optimizer,
    optimizer_config,
    optimizer_from_config,
    schedule_from_config,
)
from .parallel import BACKENDS, make_engine, plan_processes, resolve_n_jobs, warn_parallelism
from .runlock import CheckpointClaim
from .signals import SignalGate

SHUFFLE_STREAM, STEP_STREAM = 0, 1  # first key element: which kind of random draw
DEFAULT_VALIDATION_SPLIT = 0.1  # the share `partrain train` and the scripts hold out for val_*


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the update was not applied."""


class Trainer:
    """Data-parallel minibatch training of a `Sequential` model.

    Parameters
    ----------
    model : Sequential
    optimizer : Optimizer, optional
        Default `optim.Adam()`. Its state lives on the master only.
    n_jobs : int
        Processes that compute each step, the master included; -1 = all cores. 1 runs in the
        master with no pool (debugging mode). Never more processes start than a step has
        chunks: a larger n_jobs is clamped with a `ParallelismWarning` (see `plan`).
    batch_size : int
        Examples per optimizer update.
    chunk_size : int, optional
        Examples per task. The default depends on the model and batch size, never on n_jobs,
        so results are identical for every n_jobs. Batch norm uses per-chunk statistics.
    seed : int
        Keys every random draw: shuffling by (seed, epoch), dropout by (seed, epoch, step,
        chunk).
    progress : bool
        A tqdm bar per epoch on stderr; it ends with the epoch's validation metrics.
    lr_schedule : None, "constant", float, schedule object or function
        A float d means inverse-time decay lr / (1 + d * epoch); a plain function
        `epoch -> lr` (epoch from 0) gives each epoch's rate, as Keras's
        LearningRateScheduler (a checkpoint records only its name: pass it again to
        `from_checkpoint`).
    checkpoint : path, optional
        Where to write checkpoints: every `checkpoint_every` epochs, at the end of `fit`, on
        Ctrl-C/SIGTERM (state of the last completed step) and before a worker-crash error.
        `fit` claims the path for as long as it runs (`partrain.runlock`): a run in another
        process, or another Trainer, that names it meanwhile gets a `CheckpointInUseError`.
    backend : "loky" or "dask"
        How chunks reach workers when n_jobs > 1 (or always, for dask).
    blas_threads : int
        BLAS threads per worker (and in the master during `fit`); 1 avoids oversubscription.
    max_restarts : int
        Consecutive worker deaths tolerated (the step is recomputed) before giving up.
    scheduler : None, str or distributed.Client
        backend="dask" only: None starts a local cluster of `n_jobs` processes, closed with
        the trainer; an address "tcp://host:8786" or a Client uses that cluster and leaves it
        running.
    backend_options : dict, optional
        Extra engine arguments, e.g. {"step_timeout": 600} for dask.

    Attributes
    ----------
    checkpoint_claim : runlock.CheckpointClaim or None
        The claim on `checkpoint` while `fit` runs. Set it to a claim you already hold on
        that path (the command line claims it before loading data) and `fit` uses it instead
        of claiming the path itself; releasing it is then yours.

    Examples
    --------
    >>> from partrain import Trainer, zoo, optim
    >>> trainer = Trainer(zoo.digits_cnn(), optim.Adam(1e-3), n_jobs=2, progress=False)
    >>> history = trainer.fit(X, y, epochs=2)                           # doctest: +SKIP
    """

    def __init__(self, model: Sequential, optimizer: Optimizer | None = None, n_jobs: int = 1,
                 batch_size: int = 64, chunk_size: int | None = None, seed: int = 0,
                 progress: bool = True, lr_schedule=None, checkpoint: str | os.PathLike | None
                 = None, checkpoint_every: int = 1, backend: str = "loky",
                 blas_threads: int = 1, max_restarts: int = 3, scheduler=None,
                 backend_options: dict | None = None):
        if not isinstance(model, Sequential):
            raise ValueError(f"`model` must be a partrain Sequential, got {type(model).__name__}.")
        self.model = model
        self.optimizer = Adam() if optimizer is None else optimizer
        if not isinstance(self.optimizer, Optimizer):
            raise ValueError(
                f"`optimizer` must be a partrain optimizer (optim.Adam, optim.SGD), got "
                f"{type(optimizer).__name__}."
            )
        self.n_jobs = resolve_n_jobs(n_jobs)
        self.batch_size = positive_int("batch_size", batch_size)
        self.chunk_size = positive_int("chunk_size", chunk_size, allow_none=True) or \
            default_chunk_size(model, self.batch_size)
        self.chunk_size = min(self.chunk_size, self.batch_size)
        self.seed = int(seed)
        self.progress = bool(progress)
        self.lr_schedule = _as_schedule(lr_schedule)
        self.base_lr = self.optimizer.lr
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.checkpoint_every = positive_int("checkpoint_every", checkpoint_every)
        self.backend = backend
        self.blas_threads = positive_int("blas_threads", blas_threads)
        self.max_restarts = int(max_restarts)
        self.backend_options = dict(backend_options or {})
        if self.backend not in BACKENDS:
            raise ValueError(
                f"Invalid backend: {self.backend!r}, expected one of {sorted(BACKENDS)}."
            )
        self.plan = plan_processes(self.n_jobs, self.batch_size, self.chunk_size)
        for note in self.plan.notes():
            warn_parallelism(note)
        if scheduler is not None:
            if backend != "dask":
                raise ValueError(f"`scheduler` needs backend='dask', got backend={backend!r}.")
            self.backend_options["scheduler"] = scheduler
        self.history = History()
        self.epoch = 0  # index of the epoch in progress (= epochs completed, between epochs)
        self.step_in_epoch = 0  # steps of `epoch` already applied
        self._partial = _new_partial()
        self.stop_training = False
        self.checkpoint_claim: CheckpointClaim | None = None
        self._engine = None
        self._engine_finalizer = None
        self._largest_step = self.batch_size  # what the engine is sized for (see session)
        self._guard = SignalGate()  # Ctrl-C/SIGTERM acted on at safe points
        self._grad: np.ndarray | None = None  # the step's gradient buffer, during a session
        self._shuffle = True
        self._callbacks: list[Callback] | None = None  # those of the current (or last) fit
        self._pending_states: dict[str, dict] = {}  # callback states read from a checkpoint
        self._bind_seconds = 0.0  # start-up outside any step: engine creation, data binding
        self._fresh_session = False  # True until the session's first step
        self.last_startup_s = 0.0  # start-up time inside the last step (see train_step)

    # ------------------------------------------------------------------ engine lifecycle

    @property
    def engine(self):
        """The gradient engine, started on first use and reused across steps and fits."""
        if self._engine is None:
            processes = min(self.plan.processes,
                            chunks_per_step(self._largest_step, self.chunk_size))
            self._engine = make_engine(self.backend, self.model, self.chunk_size,
                                       processes, self._largest_step,
                                       blas_threads=self.blas_threads,
                                       max_restarts=self.max_restarts,
                                       check_interrupt=self._guard.check,
                                       **self.backend_options)
            self._engine_finalizer = weakref.finalize(self, self._engine.close)
        return self._engine

    @property
    def engine_started(self) -> bool:
        """Whether an engine (with its worker processes, if any) is running now."""
        return self._engine is not None

    def close(self, kill: bool = False) -> None:
        """Shut the workers down and free shared memory; the model keeps its parameters."""
        if self._engine is not None:
            self._engine.close(kill=kill)
            self._engine_finalizer.detach()
            self._engine = None

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close(kill=exc_info[0] is not None)

    # ------------------------------------------------------------------ training

    def fit(self, X, y, epochs: int = 1, validation_data: tuple | None = None,
            shuffle: bool | None = None, callbacks: tuple[Callback, ...] | list = (),
            validation_split: float = 0.0) -> History:
        """Train for `epochs` more epochs (finishing an interrupted one first); return history.

        Parameters
        ----------
        X, y : training images and class ids
        epochs : int
            Epochs to train in this call (a resumed epoch counts as one).
        validation_data : (X_val, y_val), optional
            Evaluated at the end of each epoch (`val_loss`, `val_accuracy`).
        shuffle : bool, optional
            Shuffle each epoch (keyed by seed and epoch); None keeps the run's setting.
        callbacks : list of Callback
            Called in order. After `from_checkpoint`, the checkpoint's callback states go to
            the callbacks of this fit (by class and rank within the class), so that they go
            on as in the uninterrupted run; any other fit starts them afresh, as Keras does.
        validation_split : float in [0, 1)
            As Keras: hold out the LAST fraction of (X, y), before any shuffling, as the
            validation set (the first floor(len(X) * (1 - validation_split)) examples are
            trained on). `validation_data` wins when both are given.

        Raises
        ------
        ValueError
            Bad arguments or data, or a callback monitoring 'val_*' without validation,
            before any worker starts.
        NonFiniteLossError
            The loss became NaN/inf (names epoch and step; the last checkpoint is kept).
        KeyboardInterrupt
            Ctrl-C or SIGTERM (`TrainingInterrupted`): a checkpoint of the last completed
            step is written when checkpointing is on, and the workers are stopped.
        WorkerCrashError
            Workers kept dying; a checkpoint is written first.
        """
        epochs = positive_int("epochs", epochs)
        callbacks = list(callbacks)
        if validation_data is not None:
            if len(validation_data) != 2:
                raise ValueError("`validation_data` must be a pair (X_val, y_val).")
            validation_data = self.model.check_Xy(
                *validation_data, names=("validation_data[0]", "validation_data[1]"))
        else:
            X, y, validation_data = self._split_validation(X, y, validation_split)
        for cb in callbacks:
            monitor = getattr(cb, "monitor", None)
            if validation_data is None and isinstance(monitor, str) and \
                    monitor.startswith("val_"):
                raise ValueError(
                    f"{type(cb).__name__} monitors {monitor!r}, but fit has no validation "
                    f"data: pass validation_data or validation_split, or monitor "
                    f"{monitor[4:]!r}."
                )
        self.stop_training = False
        if shuffle is not None:  # None keeps the run's setting (True, or the checkpoint's)
            self._shuffle = bool(shuffle)
        with self.session(X, y) as n_examples:
            self._callbacks = callbacks
            pending, self._pending_states = self._pending_states, {}
            for key, cb in _keyed(callbacks):
                if key in pending:
                    cb.load_state_dict(pending[key])
            for cb in callbacks:
                cb.on_train_begin(self)
            for _ in range(epochs):
                if self.stop_training:
                    break
                self._run_epoch(n_examples, validation_data, callbacks)
            # the checkpoint holds the training state, before any callback's final touch
            # (restoring the best weights, say): resuming it goes on as the run would have
            if self.checkpoint is not None:
                self.save_checkpoint(self.checkpoint)
            for cb in callbacks:
                cb.on_train_end(self)
            self._guard.check()  # a signal that came during the last epoch's end
        return self.history

    def _split_validation(self, X, y, validation_split):
        """(X_train, y_train, (X_val, y_val) or None): Keras's split of the last fraction."""
        ok = isinstance(validation_split, (int, float, np.integer, np.floating)) and \
            not isinstance(validation_split, bool) and 0 <= validation_split < 1
        if not ok:
            raise ValueError(
                f"`validation_split` must be a number in [0, 1), got {validation_split!r}.")
        if validation_split == 0:
            return X, y, None
        X, y = self.model.check_Xy(X, y)
        split_at = validation_split_point(len(X), validation_split)
        if split_at == 0 or split_at == len(X):
            raise ValueError(
                f"`validation_split` {validation_split} of {len(X)} examples leaves "
                f"{split_at} to train on and {len(X) - split_at} to validate on; both need "
                "at least one: give more data or another split."
            )
        return X[:split_at], y[:split_at], (X[split_at:], y[split_at:])

    @contextlib.contextmanager
    def session(self, X, y):
        """Make (X, y) the training set of `train_step` calls; yields its length.

        Validates the data (before any worker starts), limits BLAS threads, binds the data to
        the engine, and turns SIGINT/SIGTERM into a request that is honoured at the next safe
        point (between steps, or while waiting for workers): the signal raises
        `TrainingInterrupted` there, after the workers are stopped and, when checkpointing is
        on, the checkpoint of the last completed step is written. `fit` runs in one; use it
        directly to drive or time single steps.
        """
        X, y = self.model.check_Xy(X, y)
        if len(X) == 0:
            raise ValueError("`X` must hold at least one training example, got 0.")
        X, y = np.ascontiguousarray(X), np.ascontiguousarray(y)
        with self._guard.installed_and_held(), self._checkpoint_claimed(), self._blas_limit():
            try:
                self._grad = np.empty_like(self.model.params)
                # a batch larger than the training set takes all of it: size the engine
                # (slots, shared segments) for that, not for the batch size given
                largest = min(self.batch_size, len(X))
                if self._engine is None or largest > self._largest_step:
                    self.close()
                    self._largest_step = largest
                t0 = time.perf_counter()
                self.engine.bind(X, y)  # (creates the engine, and a Dask cluster, if needed)
                self._bind_seconds += time.perf_counter() - t0
                self._fresh_session = True
                yield len(X)
            except (KeyboardInterrupt, WorkerCrashError):
                self.close(kill=True)
                if self.checkpoint is not None:
                    self.save_checkpoint(self.checkpoint)
                raise
            except BaseException:
                self.close(kill=True)
                raise
            else:
                self.engine.end_session()
            finally:
                self._grad = None

    def train_step(self, batch_idx: np.ndarray, epoch: int = 0, step: int = 0) -> ChunkTotals:
        """One optimizer update from the examples `batch_idx` of the session's training set.

        The chunks' summed gradient (random draws keyed by (seed, epoch, step, chunk)) is
        divided by the number of examples and applied by the optimizer on the master; the
        batch-norm statistics are folded into the running buffers. Returns the step's sums.
        Raises NonFiniteLossError, without applying anything, when the loss is NaN or inf.

        `last_startup_s` is the part of this step spent starting workers: in the first step
        of a session that has work for them (more than one chunk: the loky pool starts
        there), the time the master waited beyond the slowest process's compute; 0 otherwise.
        """
        if self._grad is None:
            raise RuntimeError("train_step needs a session: `with trainer.session(X, y): ...`")
        grad = self._grad
        mean = 1.0 / max(len(batch_idx), 1)  # the sum becomes a mean (the engine refuses 0)
        totals = self.engine.gradient(batch_idx, (self.seed, STEP_STREAM, epoch, step), grad,
                                      scale=mean)
        timing = self.engine.last_timing
        self.last_startup_s = 0.0
        if self._fresh_session and timing is not None:
            self.last_startup_s = max(0.0, timing.run - timing.compute_max)
        self._fresh_session = self._fresh_session and self.plan.processes > 1 and \
            len(batch_idx) <= self.chunk_size  # a one-chunk step starts no worker
        if not math.isfinite(totals.loss):
            raise NonFiniteLossError(
                f"The training loss became {totals.loss} at epoch {epoch} step {step}; the "
                "update was not applied. Try a lower learning rate, scale the inputs to "
                "[0, 1] or standardise them, or use float64."
            )
        self.optimizer.step(self.model.params, grad)
        if totals.stats is not None:
            self.model.fold_batch_stats(totals.stats)
        return totals

    def _epoch_order(self, n: int, epoch: int) -> np.ndarray:
        if not self._shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, SHUFFLE_STREAM, epoch]).permutation(n)

    def _run_epoch(self, n: int, validation_data, callbacks) -> None:
        epoch = self.epoch
        n_steps = -(-n // self.batch_size)
        self.optimizer.lr = self.lr_schedule(self.base_lr, epoch)
        for cb in callbacks:
            cb.on_epoch_begin(self, epoch)
        order = self._epoch_order(n, epoch)
        p = self._partial
        p["startup"] += self._bind_seconds  # start-up is reported apart, never as training
        self._bind_seconds = 0.0
        bar = _progress_bar(self.progress, n_steps, epoch, self.step_in_epoch)
        started = time.perf_counter() - p["time"]
        try:
            for step in range(self.step_in_epoch, n_steps):
                self._guard.check()
                totals = self.train_step(
                    order[step * self.batch_size:(step + 1) * self.batch_size], epoch, step)
                started += self.last_startup_s
                p["startup"] += self.last_startup_s
                p["loss"] += totals.loss
                p["correct"] += totals.n_correct
                p["seen"] += totals.n_examples
                p["workers"] = max(p["workers"], self.engine.last_timing.processes)
                p["time"] = time.perf_counter() - started
                self.step_in_epoch = step + 1
                logs = {"loss": p["loss"] / p["seen"], "accuracy": p["correct"] / p["seen"],
                        "examples_per_s": p["seen"] / max(p["time"], 1e-9)}
                if bar is not None:
                    bar.set_postfix(_postfix(logs), refresh=False)
                    bar.update(1)
                for cb in callbacks:
                    cb.on_batch_end(self, step, logs)
            logs = self._epoch_logs(validation_data)
            if bar is not None and "val_loss" in logs:  # the bar ends with them, as Keras's
                bar.set_postfix(_postfix(logs))
        finally:
            if bar is not None:
                bar.close()
        self._end_epoch(logs, callbacks)

    def _epoch_logs(self, validation_data) -> dict:
        """The finished epoch's metrics, in the order of `callbacks.HISTORY_KEYS`."""
        p = self._partial
        logs = {"loss": p["loss"] / p["seen"], "accuracy": p["correct"] / p["seen"]}
        if validation_data is not None:
            logs["val_loss"], logs["val_accuracy"] = self.model.evaluate(*validation_data)
        logs.update(examples_per_s=p["seen"] / max(p["time"], 1e-9), epoch_time_s=p["time"],
                    startup_s=p["startup"], lr=self.optimizer.lr, workers=p["workers"])
        return logs

    def _end_epoch(self, logs: dict, callbacks) -> None:
        self.history.append(logs)
        self.epoch += 1
        self.step_in_epoch = 0
        self._partial = _new_partial()
        for cb in callbacks:
            cb.on_epoch_end(self, self.epoch - 1, logs)
        if self.checkpoint is not None and self.epoch % self.checkpoint_every == 0:
            self.save_checkpoint(self.checkpoint)

    def evaluate(self, X, y, batch_size: int = 256) -> tuple[float, float]:
        """(mean loss, accuracy) of the current model on (X, y)."""
        return self.model.evaluate(X, y, batch_size=batch_size)

    # ------------------------------------------------------------------ context managers

    def _blas_limit(self):
        """BLAS threads of the master limited to `blas_threads` (1: n_jobs processes use
        n_jobs cores, never more)."""
        from threadpoolctl import threadpool_limits

        return threadpool_limits(limits=self.blas_threads)

    # ------------------------------------------------------------------ checkpoints

    def config(self) -> dict:
        """The trainer's settings that determine the results (JSON-ready)."""
        return {"batch_size": self.batch_size, "chunk_size": self.chunk_size, "seed": self.seed,
                "lr_schedule": self.lr_schedule.config(), "base_lr": self.base_lr,
                "shuffle": self._shuffle}

    @contextlib.contextmanager
    def _checkpoint_claimed(self):
        """Hold the claim on `checkpoint` for the block, unless `checkpoint_claim` has it."""
        claim = self.checkpoint_claim
        if self.checkpoint is None or (claim is not None and claim.covers(self.checkpoint)):
            yield
            return
        with CheckpointClaim(self.checkpoint) as self.checkpoint_claim:
            try:
                yield
            finally:
                self.checkpoint_claim = None

    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Write everything needed to resume bit-for-bit to one `.npz`, atomically.

        Holds params, buffers, optimizer state, epoch, step within the epoch, the partial sums
        of an interrupted epoch, history, the state of every callback of the current (or
        last) `fit`, model, optimizer and trainer config. Random draws are keyed by (seed,
        epoch, step), so those also fix the RNG position. A path that another live run has
        claimed is refused (`runlock.CheckpointInUseError`), not overwritten.
        """
        state = self.optimizer.state_dict()
        arrays = {"params": self.model.params, "buffers": self.model.buffers}
        arrays.update({f"optim.{k}": v for k, v in state.items() if isinstance(v, np.ndarray)})
        callbacks = {}
        for key, cb_state in self._callback_states().items():
            callbacks[key] = {k: v for k, v in cb_state.items() if not isinstance(v, np.ndarray)}
            arrays.update({f"callback.{key}.{k}": v for k, v in cb_state.items()
                           if isinstance(v, np.ndarray)})
        meta = {
            "config": self.model.config(),
            "metadata": self.model.metadata,
            "optimizer": {**optimizer_config(self.optimizer), "lr": self.base_lr},
            "optimizer_step": state["step"],
            "trainer": self.config(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "partial": self._partial,
            "history": self.history.history,
            "callbacks": callbacks,
        }
        claim = self.checkpoint_claim
        held = claim is not None and claim.covers(path)
        with contextlib.nullcontext() if held else CheckpointClaim(path):
            return write_npz(path, "checkpoint", meta, arrays)

    def _callback_states(self) -> dict[str, dict]:
        """{key: state} of the current fit's callbacks, or those read from the checkpoint
        when no fit has run since."""
        if self._callbacks is None:
            return self._pending_states
        return {key: state for key, cb in _keyed(self._callbacks) if (state := cb.state_dict())}

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, **overrides) -> Trainer:
        """Rebuild model, optimizer and trainer state from a checkpoint; `overrides` set
        run-time options (n_jobs, progress, checkpoint, backend, ...).

        A run whose `lr_schedule` was a plain function must be given it again
        (`lr_schedule=fn`): a checkpoint records only the function's name. The checkpoint's
        callback states go to the callbacks of the next `fit` (see `fit`).

        Raises
        ------
        TypeError
            A keyword that is not a Trainer argument (checked before the file is read).
        ValueError
            An override of what defines the run (model, optimizer, batch_size, chunk_size,
            seed, lr_schedule), or an invalid override value; a function lr_schedule that
            the checkpoint cannot hold and that was not passed again.
        FileNotFoundError, FileFormatError
            No such file, or not a complete partrain checkpoint.
        """
        arguments = set(inspect.signature(cls).parameters)
        unknown = sorted(set(overrides) - arguments)
        if unknown:
            raise TypeError(
                f"from_checkpoint() got unexpected keyword argument(s) {unknown}; the run-time "
                f"options are {sorted(arguments - _RUN_DEFINING)}."
            )
        fixed = sorted((_RUN_DEFINING - {"lr_schedule"}) & set(overrides))
        if fixed:
            raise ValueError(
                f"{fixed} cannot change on resume: they define the run "
                "(use a fresh Trainer to start a different one)."
            )
        meta, arrays = read_npz(path, "checkpoint")
        try:
            model = model_from_arrays(meta, arrays, str(path))
            optimizer = optimizer_from_config(meta["optimizer"])
            optimizer.load_state_dict(
                {"step": meta["optimizer_step"],
                 **{k[6:]: v for k, v in arrays.items() if k.startswith("optim.")}},
                n_params=model.n_params)
            cfg = meta["trainer"]
            run = {"batch_size": cfg["batch_size"], "chunk_size": cfg["chunk_size"],
                   "seed": cfg["seed"],
                   "lr_schedule": _checkpoint_schedule(cfg["lr_schedule"], overrides, path)}
            callbacks = {key: dict(value) for key, value in meta.get("callbacks", {}).items()}
            for name, value in arrays.items():
                if name.startswith("callback."):
                    key, field = name[len("callback."):].split(".", 1)
                    callbacks.setdefault(key, {})[field] = value
            state = {"base_lr": cfg["base_lr"], "_shuffle": cfg["shuffle"],
                     "epoch": meta["epoch"], "step_in_epoch": meta["step_in_epoch"],
                     "_partial": {**_new_partial(), **meta["partial"]},
                     "history": History(meta["history"]), "_pending_states": callbacks}
        except (KeyError, TypeError) as exc:
            raise FileFormatError(
                f"'{path}' is not a complete partrain checkpoint (missing {exc})."
            ) from None
        trainer = cls(model, optimizer, **run, **overrides)
        for name, value in state.items():
            setattr(trainer, name, value)
        return trainer


_RUN_DEFINING = {"model", "optimizer", "batch_size", "chunk_size", "seed", "lr_schedule"}


def validation_split_point(n_examples: int, validation_split: float) -> int:
    """Keras's rule: the first floor(n * (1 - validation_split)) examples are trained on,
    the rest validate."""
    return int(math.floor(n_examples * (1.0 - validation_split)))


def _new_partial() -> dict:
    """The sums of an epoch in progress: nothing yet."""
    return {"loss": 0.0, "correct": 0, "seen": 0, "time": 0.0, "startup": 0.0, "workers": 0}


def _keyed(callbacks) -> list[tuple[str, Callback]]:
    """(key, callback): the class name, with '_2', '_3', ... for later ones of a class."""
    seen: dict[str, int] = {}
    keyed = []
    for cb in callbacks:
        name = type(cb).__name__
        seen[name] = seen.get(name, 0) + 1
        keyed.append((name if seen[name] == 1 else f"{name}_{seen[name]}", cb))
    return keyed


def _checkpoint_schedule(config: dict, overrides: dict, path):
    """The checkpoint's lr schedule; a function one must be in `overrides` (popped), any
    other must not be."""
    if (config or {}).get("name") == "function":
        if "lr_schedule" not in overrides:
            raise ValueError(
                f"'{path}' was trained with the lr_schedule function {config.get('function')}, "
                "which a checkpoint cannot hold: pass it again, "
                f"Trainer.from_checkpoint('{path}', lr_schedule=<that function>)."
            )
        return overrides.pop("lr_schedule")
    if "lr_schedule" in overrides:
        raise ValueError(
            "['lr_schedule'] cannot change on resume: it defines the run (use a fresh Trainer "
            "to start a different one)."
        )
    return schedule_from_config(config)


def _as_schedule(lr_schedule):
    if lr_schedule is None or lr_schedule == "constant":
        return ConstantLR()
    if isinstance(lr_schedule, (int, float)) and not isinstance(lr_schedule, bool):
        return InverseTimeDecay(float(lr_schedule))
    if callable(lr_schedule) and hasattr(lr_schedule, "config"):
        return lr_schedule
    if callable(lr_schedule):
        return FunctionSchedule(lr_schedule)
    raise ValueError(
        f"`lr_schedule` must be None, 'constant', a decay rate, an optim schedule or a "
        f"function epoch -> lr, got {lr_schedule!r}."
    )


def _postfix(logs: dict) -> dict:
    """What the progress bar shows after its counts, in this order (tqdm keeps a dict's)."""
    shown = {"loss": f"{logs['loss']:.4f}", "acc": f"{logs['accuracy']:.3f}",
             "ex_s": f"{logs['examples_per_s']:,.0f}"}
    if "val_loss" in logs:
        shown.update(val_loss=f"{logs['val_loss']:.4f}", val_acc=f"{logs['val_accuracy']:.3f}")
    return shown


def _progress_bar(enabled: bool, n_steps: int, epoch: int, done: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=n_steps, initial=done, desc=f"epoch {epoch + 1}", unit="step",
                leave=True, dynamic_ncols=True)
