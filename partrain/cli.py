"""The `partrain` command line: train | evaluate | gradcheck | bench.

Exit statuses: 0 success; 1 a failure during the work (a worker error, a NaN loss, gradcheck
FAIL, a file written elsewhere than asked); 2 a usage or input error, reported before any
training; 128 + N after signal N (130 Ctrl-C, 143 SIGTERM, 141 stdout closed).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np

from . import zoo
from .callbacks import Callback, EarlyStopping, ModelCheckpoint
from .chunks import WorkerCrashError
from .data import DATASETS, DataError, DataWarning, load_dataset
from .io import FileFormatError, check_fits_memory, output_problem, read_npz, write_text
from .layers import BatchNorm, Dropout
from .model import Sequential, model_from_arrays
from .optim import optimizer_config
from .parallel import ParallelismWarning
from .runlock import CheckpointClaim, CheckpointInUseError
from .trainer import TrainingInterrupted, validation_split_point

# Per-model defaults: `partrain train` alone trains something real, offline, in seconds.
MODEL_DEFAULTS = {
    "digits-cnn": {"dataset": "digits", "epochs": 10, "batch_size": 32, "lr": 3e-3},
    "signs-cnn": {"dataset": "signs", "epochs": 20, "batch_size": 64, "lr": 1e-3},
    "mnist-cnn": {"dataset": "mnist", "epochs": 2, "batch_size": 32, "lr": 1e-3},
    "mlp": {"dataset": "mnist", "epochs": 10, "batch_size": 64, "lr": 1e-3, "lr_decay": 0.01},
}
# `train` options that define a run: with --resume, each may only repeat the checkpoint's value
RUN_DEFINING = ("model", "dataset", "normalize", "optimizer", "lr", "lr_decay", "batch_size",
                "chunk_size", "seed", "momentum", "dropout", "batchnorm", "validation_split")
DEFAULT_VALIDATION_SPLIT = 0.1  # of the training set, held out for the per-epoch val_* metrics
EXIT_USAGE, EXIT_FAILURE = 2, 1
EXIT_CLOSED_PIPE = 128 + signal.SIGPIPE  # what a shell reports for a tool killed by SIGPIPE


class UsageError(Exception):
    """A bad option or combination: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) instead of the usage block."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


# ----------------------------------------------------------------------------- helpers


def _csv(kind):
    """argparse type for comma-separated lists: "1,2" -> [1, 2]."""
    def parse(text: str):
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} list: {text!r}") from None
    return parse


def _dataset_options(args, model: Sequential | None) -> dict:
    """Options of --dataset: those recorded with `model`, else what the model needs (synthetic
    data take the model's input shape and class count)."""
    meta = {} if model is None else model.metadata
    recorded = meta.get("dataset_options")
    if isinstance(recorded, dict) and meta.get("dataset") == _dataset_name(args.dataset):
        return {k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()}
    if args.dataset == "synthetic" and model is not None:
        return {"shape": model.input_shape, "n_classes": model.n_classes}
    return {}


def _load_data(args, model: Sequential | None, options: dict | None = None,
               split: str | None = None):
    """The dataset named by --dataset, normalised by --normalize, with `options`; only
    `split` ("train" or "test") if given. What the loader noticed goes to stderr as notes."""
    options = _dataset_options(args, model) if options is None else options
    with warnings.catch_warnings(record=True) as noticed:
        warnings.simplefilter("always", DataWarning)
        data = load_dataset(args.dataset, args.data_dir, normalize=args.normalize, split=split,
                            **options)
    for warning in noticed:
        if issubclass(warning.category, DataWarning):
            print(f"note: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename,
                                 warning.lineno)
    return data


def _dataset_name(name: str) -> str:
    """--dataset as recorded: an npz path made absolute, so that evaluate finds it anywhere."""
    return "npz:" + str(Path(name[4:]).resolve()) if name.startswith("npz:") else name


def _given(value, default):
    """`value` unless the option was not given (None); 0 counts as given."""
    return default if value is None else value


def build_model(name: str, dataset, seed: int, dropout: float, batchnorm: bool) -> Sequential:
    """A zoo network for `dataset`; the MLP adapts to its image size and class count."""
    if name == "mlp":
        n_in = int(np.prod(dataset.input_shape))
        return zoo.mlp(dims=(n_in, 100, 100, dataset.n_classes), dropout=dropout,
                       batchnorm=batchnorm, input_shape=dataset.input_shape, seed=seed)
    if dropout or batchnorm:
        raise UsageError("--dropout and --batchnorm apply to --model mlp only")
    model = zoo.get(name, seed=seed)
    _check_fit(model, dataset, f"--model {name}")
    return model


def _check_fit(model: Sequential, dataset, what: str) -> None:
    if model.input_shape != dataset.input_shape or model.n_classes != dataset.n_classes:
        raise UsageError(
            f"{what} takes {'x'.join(map(str, model.input_shape))} inputs and "
            f"{model.n_classes} classes, but dataset {dataset.name!r} has "
            f"{'x'.join(map(str, dataset.input_shape))} images and {dataset.n_classes} classes"
        )


# ----------------------------------------------------------------------------- train


def cmd_train(args) -> int:
    if args.plot:
        from .plots import require_matplotlib

        require_matplotlib()
    scheduler = _scheduler(args)
    signals = _Signals()
    signals.install()
    try:
        return _train(args, scheduler, signals)
    except KeyboardInterrupt as exc:  # (from then on, _fit_and_finish reports signals itself)
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"partrain train: interrupted by {signal.Signals(signum).name} before training "
              "started; nothing was written", file=sys.stderr)
        return 128 + signum
    finally:
        signals.restore()


def _train(args, scheduler, signals: _Signals) -> int:
    from .optim import SGD, Adam
    from .trainer import Trainer

    overrides = dict(n_jobs=args.n_jobs, progress=not args.quiet, checkpoint=args.checkpoint,
                     backend=args.backend, scheduler=scheduler)
    if args.resume:
        trainer = Trainer.from_checkpoint(args.resume, **overrides)
        run = checkpoint_run(trainer)
        _check_resume(args, run)
        model_name = run["model"] or "model"
        args.dataset = _given(args.dataset, run["dataset"])
        if args.dataset is None:
            raise UsageError(f"--dataset is required: {args.resume} does not name its dataset")
        args.normalize = _given(args.normalize, _given(run["normalize"], "scale"))
        # (a checkpoint from before --validation-split validated on the test set: no split)
        args.validation_split = _given(args.validation_split, _given(run["validation_split"],
                                                                     0.0))
        defaults = MODEL_DEFAULTS.get(model_name, {})
    else:
        model_name = _given(args.model, "digits-cnn")
        defaults = MODEL_DEFAULTS[model_name]
        args.dataset = _given(args.dataset, defaults["dataset"])
        args.normalize = _given(args.normalize, "scale")
        args.validation_split = _given(args.validation_split, DEFAULT_VALIDATION_SPLIT)
        if args.momentum is not None and args.optimizer != "sgd":
            raise UsageError("--momentum applies to --optimizer sgd only")
    epochs = _given(args.epochs, defaults.get("epochs", 10))
    if epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {epochs}")
    if not 0 <= args.validation_split < 1:
        raise UsageError(f"--validation-split must be in [0, 1), got {args.validation_split:g}")
    if args.early_stopping is not None and args.early_stopping < 0:
        raise UsageError(f"--early-stopping must be >= 0, got {args.early_stopping}")
    for option, value in (("--early-stopping", args.early_stopping),
                          ("--save-best", args.save_best)):
        if value is not None and args.validation_split == 0:
            raise UsageError(f"{option} watches val_loss, which needs --validation-split > 0")
    outputs = _Outputs(args, model_name, signals)  # every output path checked here
    with _claim(args.checkpoint) as claim:  # before the data load: a second run stops now
        if args.resume:
            options = _dataset_options(args, trainer.model)
            data = _load_data(args, trainer.model, options)
            _check_fit(trainer.model, data, f"the model in {args.resume}")
            model = trainer.model
        else:
            probe = None if model_name == "mlp" else zoo.get(model_name)
            data = _load_data(args, probe or zoo.mlp(input_shape=(28, 28, 1)))
            model = build_model(model_name, data, _given(args.seed, 0),
                                _given(args.dropout, 0.0), bool(args.batchnorm))
            options = _dataset_options(args, model)
            lr = _given(args.lr, defaults["lr"])
            optimizer = SGD(lr, momentum=_given(args.momentum, 0.0)) \
                if args.optimizer == "sgd" else Adam(lr)
            trainer = Trainer(model, optimizer, batch_size=_given(args.batch_size,
                                                                  defaults["batch_size"]),
                              chunk_size=args.chunk_size, seed=_given(args.seed, 0),
                              lr_schedule=_given(args.lr_decay, defaults.get("lr_decay")),
                              **overrides)
            model.metadata["model"] = model_name
        if len(data.x_train) == 0:
            raise UsageError(f"dataset {data.name!r} has no training examples")
        # what the data pipeline was: resume and evaluate rebuild exactly these inputs
        model.metadata.update(dataset=_dataset_name(args.dataset), normalize=args.normalize,
                              dataset_options={k: list(v) if isinstance(v, tuple) else v
                                               for k, v in options.items()},
                              validation_split=args.validation_split)
        trainer.checkpoint_claim = claim
        if data.synthetic and not args.quiet:
            print("NOTE: SYNTHETIC random data: for timing experiments only.", file=sys.stderr)
        return _fit_and_finish(args, trainer, data, epochs, model_name, outputs, signals)


def _fit_and_finish(args, trainer, data, epochs: int, model_name: str, outputs: _Outputs,
                    signals: _Signals) -> int:
    """Train the remaining epochs, then write the files (first, signals held), evaluate on
    the test set and plot. A signal or a closed stdout after the last epoch still leaves
    every file written; one during training leaves the checkpoint."""
    remaining = epochs - trainer.epoch
    try:
        if remaining <= 0:
            print(f"The checkpoint has already trained {trainer.epoch} epochs (--epochs "
                  f"{epochs}): nothing to do.")
            outputs.evaluated = True  # (no training, so no test score due)
            outputs.write_files(trainer)
        else:
            if not args.quiet:
                n_train = validation_split_point(len(data.x_train), args.validation_split)
                print(f"Training {model_name} on {data.name} ({n_train:,} train, "
                      f"{len(data.x_train) - n_train:,} validation, {len(data.x_test):,} test) "
                      f"with n_jobs={trainer.n_jobs}, batch {trainer.batch_size}, chunk "
                      f"{trainer.chunk_size}; epochs {trainer.epoch + 1}..{epochs}",
                      file=sys.stderr)
            for note in trainer.plan.notes("--chunk-size {}", "--batch-size {}"):
                print(f"note: {note}", file=sys.stderr)
            n_train = validation_split_point(len(data.x_train), args.validation_split)
            if trainer.batch_size > n_train:
                print(f"note: --batch-size {trainer.batch_size:,} is more than the {n_train:,} "
                      "training examples: each step takes all of them", file=sys.stderr)
            callbacks = [EpochSummary(epochs, args.quiet), StopWhenStdoutCloses(sys.stdout)]
            best = None if args.save_best is None else ModelCheckpoint(args.save_best)
            callbacks += [best] if best else []
            if args.early_stopping is not None:
                callbacks.append(EarlyStopping("val_loss", patience=args.early_stopping))
            t0 = time.perf_counter()
            with trainer:
                trainer.fit(data.x_train, data.y_train, epochs=remaining,
                            validation_split=args.validation_split, callbacks=callbacks)
                wall = time.perf_counter() - t0
                outputs.write_files(trainer)
            test_loss, test_acc = trainer.model.evaluate(data.x_test, data.y_test)
            print(f"test accuracy {test_acc:.4f}  test loss {test_loss:.4f}  "
                  f"wall time {wall:.1f} s")
            if best is not None and best.best_epoch is not None:
                print(f"best model: epoch {best.best_epoch + 1} (val_loss {best.best:.4f}), "
                      f"saved to {args.save_best}")
            outputs.evaluated = True
        outputs.plot(trainer)
    except KeyboardInterrupt as exc:  # TrainingInterrupted, or Ctrl-C outside of fit
        signum = getattr(exc, "signum", signal.SIGINT)
        trained = trainer.epoch >= epochs and trainer.step_in_epoch == 0
        if trained:
            with contextlib.suppress(KeyboardInterrupt):  # a second signal: report anyway
                outputs.write_files(trainer)
        outputs.report_interrupted(signum, trainer, epochs, trained)
        return 128 + signum
    except ConnectionError as exc:  # the Dask scheduler could not be reached at the start
        raise UsageError(str(exc)) from None
    except OSError as exc:  # e.g. the checkpoint could not be written any more
        if args.checkpoint is None:
            raise
        trained = trainer.epoch >= epochs and trainer.step_in_epoch == 0
        outputs.rescue_checkpoint(trainer, exc, epochs, trained)
        if not trained:
            return EXIT_FAILURE
        outputs.write_files(trainer)
    return outputs.report()


class _Outputs:
    """The files `train` writes (--save, --history, --plot; --checkpoint is the trainer's).

    Every path is checked when this object is made, before any data load or worker start.
    A write that still fails after training goes next to the intended path, else to the
    working directory, else to the temporary folder, and the report says where.
    """

    def __init__(self, args, model_name: str, signals: _Signals):
        self.save = Path(_given(args.save, f"{model_name}.npz"))
        self.history = None if args.history is None else Path(args.history)
        self.plot_dir = None if args.plot is None else Path(args.plot)
        self.checkpoint = None if args.checkpoint is None else Path(args.checkpoint)
        self.signals = signals
        self.written: dict[str, Path | None] = {}  # what -> where (None: nowhere)
        self.problems: list[str] = []
        self.evaluated = False
        self.title = f"{model_name} on {_dataset_name(args.dataset) if args.dataset else '?'}"
        checks = [("--save", _given(args.save, str(self.save)), False, f"{model_name}.npz"),
                  ("--checkpoint", args.checkpoint, False, "checkpoint.npz"),
                  ("--history", args.history, False, "history.json"),
                  ("--save-best", args.save_best, False, "best.npz")]
        if args.plot is not None:
            checks += [("--plot", args.plot, True, None),
                       ("--plot", str(self.plot_dir / "history.png"), False, None)]
        check_outputs(checks)
        files = [("--save", self.save), ("--checkpoint", self.checkpoint),
                 ("--history", self.history), ("--resume", args.resume),
                 ("--save-best", args.save_best)]
        for (a, path_a), (b, path_b) in itertools.combinations(files, 2):
            if path_a is None or path_b is None or {a, b} == {"--checkpoint", "--resume"}:
                continue
            if os.path.realpath(path_a) == os.path.realpath(path_b) and \
                    os.path.realpath(path_a) != os.path.realpath(os.devnull):
                raise UsageError(f"{a} and {b} both name {path_a}: one would overwrite the "
                                 "other; give them different paths")

    def write_files(self, trainer) -> None:
        """The model and the history, each once; a signal meanwhile waits for the end."""
        with self.signals.held():
            if "model" not in self.written:
                self.written["model"] = self._write("model", self.save, trainer.model.save)
            if self.history is not None and "history" not in self.written:
                text = json.dumps(trainer.history.history, indent=1)
                self.written["history"] = self._write("history", self.history,
                                                      lambda path: write_text(path, text))

    def _write(self, what: str, path: Path, write) -> Path | None:
        where, reason = _write_somewhere(write, path)
        if where is None:
            self.problems.append(f"could not write the {what} to {path} ({reason}) nor to "
                                 "any other place")
        elif where != path:
            self.problems.append(f"could not write the {what} to {path} ({reason}); wrote "
                                 f"it to {where} instead")
        return where

    def plot(self, trainer) -> None:
        if self.plot_dir is None:
            return
        from .plots import plot_history

        try:
            self.written["plot"] = plot_history(trainer.history.history,
                                                self.plot_dir / "history.png", self.title)
        except OSError as exc:
            self.problems.append(f"could not write the plot {self.plot_dir / 'history.png'} "
                                 f"({exc.strerror or exc})")

    def report(self) -> int:
        """Print where the files went; exit status 1 if one is not where it was asked for."""
        if self.written.get("model"):
            print(f"model saved to {self.written['model']}")
        if self.written.get("plot"):
            print(f"plot: {self.written['plot']}")
        for problem in self.problems:
            print(f"partrain train: failed: {problem}", file=sys.stderr)
        return EXIT_FAILURE if self.problems else 0

    def report_interrupted(self, signum: int, trainer, epochs: int, trained: bool) -> None:
        """One line on stderr: what was saved, and what was not done."""
        why = "stdout was closed" if signum == signal.SIGPIPE else \
            f"interrupted by {signal.Signals(signum).name}"
        if trained:
            done = [f"{what} saved to {path}" for what, path in self.written.items() if path]
            if self.checkpoint is not None:
                done.append(f"checkpoint in {self.checkpoint}")
            expected = ["model"] + (["history"] if self.history is not None else [])
            missing = [what for what in expected if not self.written.get(what)]
            missing += [] if self.evaluated else ["test evaluation"]
            missing += ["plot"] if self.plot_dir is not None and "plot" not in self.written \
                else []
            if signum == signal.SIGPIPE and not missing and not self.problems:
                return  # a closed stdout after a complete run: quiet, as a Unix tool
            line = f"{why} after training: {', '.join(done) or 'nothing written'}"
            if missing:
                line += f"; not done: {', '.join(missing)}"
        else:
            line = f"{why} at {_position(trainer, epochs)}; "
            if self.checkpoint is not None:
                line += f"checkpoint in {self.checkpoint}: go on with --resume {self.checkpoint}"
            else:
                line += "the training so far is lost (no --checkpoint)"
        for problem in self.problems:
            line += f"; {problem}"
        print(f"partrain train: {line}", file=sys.stderr)

    def rescue_checkpoint(self, trainer, exc: OSError, epochs: int, trained: bool) -> None:
        """Training stopped on an OSError (e.g. its checkpoint folder vanished): write the
        checkpoint of the last completed step somewhere, and say where on stderr."""
        where, _ = _write_somewhere(trainer.save_checkpoint, self.checkpoint)
        if trained:
            stopped = "training ended"
        else:
            stopped = f"training stopped at {_position(trainer, epochs)}"
        if where is None:
            saved = "and its checkpoint could not be written anywhere"
        else:
            saved = f"the checkpoint of its last step is in {where}"
            saved += "" if trained else f": go on with --resume {where}"
        problem = f"{stopped} with {type(exc).__name__}: {exc.strerror or exc}; {saved}"
        if trained:
            self.problems.append(problem)
        else:
            print(f"partrain train: failed: {problem}", file=sys.stderr)


def check_outputs(checks) -> None:
    """Refuse, in one UsageError, the first (option, path or None, is a folder, example file
    name or None) whose path cannot be written (see `io.output_problem`): a folder given for
    a file, a device, pipe or socket (never replaced), an unwritable folder."""
    for option, given, folder, example in checks:  # (paths shown as the user typed them)
        problem = None if given is None else output_problem(given, folder=folder)
        if problem:
            hint = f"; e.g. {option} {Path(given) / example}" \
                if example and Path(given).is_dir() else ""
            raise UsageError(f"{option} {given}: {problem}{hint}")


def _position(trainer, epochs: int) -> str:
    """Where an unfinished run stands, e.g. "epoch 2 of 5, after step 17"."""
    if trainer.step_in_epoch:
        return f"epoch {trainer.epoch + 1} of {epochs}, after step {trainer.step_in_epoch}"
    return f"the start of epoch {trainer.epoch + 1} of {epochs}"


def _write_somewhere(write, path: Path) -> tuple[Path | None, str | None]:
    """`write(path)`, else `write` to the first of `_rescue_paths` that works: (where it went
    or None, why `path` failed or None)."""
    try:
        write(path)
        return path, None
    except OSError as exc:
        reason = exc.strerror or str(exc)
    for other in _rescue_paths(path):
        try:
            write(other)
        except OSError:
            continue
        return other, reason
    return None, reason


def _rescue_paths(path: Path):
    """Where to put a file that could not be written to `path`: next to it, in the working
    directory, in the temporary folder; never over an existing file."""
    tagged = f"{path.stem}.rescued-{os.getpid()}{path.suffix}"
    for other in (path.with_name(tagged), Path.cwd() / path.name, Path.cwd() / tagged,
                  Path(tempfile.gettempdir()) / tagged):
        if not other.exists() and os.path.realpath(other) != os.path.realpath(path):
            yield other


@contextlib.contextmanager
def _claim(checkpoint: str | None):
    """The claim on --checkpoint (see partrain.runlock), held until the command ends."""
    if checkpoint is None:
        yield None
        return
    with CheckpointClaim(checkpoint) as claim:
        yield claim


def checkpoint_run(trainer) -> dict:
    """The run-defining options of a trainer (rebuilt from a checkpoint), named as in `train`.

    None where the checkpoint does not say (model, dataset and normalize come from the
    metadata the command line records; a checkpoint written from Python may lack them).
    """
    meta, layers = trainer.model.metadata, trainer.model.layers
    optimizer = optimizer_config(trainer.optimizer)
    return {
        "model": meta.get("model"), "dataset": meta.get("dataset"),
        "normalize": meta.get("normalize"), "validation_split": meta.get("validation_split"),
        "optimizer": optimizer["name"],
        "lr": trainer.base_lr, "lr_decay": trainer.lr_schedule.config().get("decay", 0.0),
        "batch_size": trainer.batch_size, "chunk_size": trainer.chunk_size,
        "seed": trainer.seed, "momentum": optimizer.get("momentum"),
        "dropout": max((layer.rate for layer in layers if isinstance(layer, Dropout)),
                       default=0.0),
        "batchnorm": any(isinstance(layer, BatchNorm) for layer in layers),
    }


def _check_resume(args, run: dict) -> None:
    """With --resume, each run-defining option given must equal the checkpoint's; list all
    that differ (with both values) in one UsageError."""
    differ = []
    for name in RUN_DEFINING:
        given = getattr(args, name)
        if given is None or run[name] is None and name in ("model", "dataset", "normalize",
                                                           "validation_split"):
            continue
        if name == "dataset":
            given = _dataset_name(given)
        elif name == "chunk_size":  # the trainer caps the chunk at the batch size
            given = min(given, _given(args.batch_size, run["batch_size"]))
        if given != run[name]:
            option = "--" + name.replace("_", "-")
            differ.append(f"{option} {_shown(given)} (checkpoint: {_shown(run[name])})")
    if differ:
        raise UsageError(f"--resume {args.resume} goes on with the checkpoint's run, and these "
                         f"options differ from it: {', '.join(differ)}; leave them out (or "
                         "equal), or drop --resume to start a new run")


def _shown(value) -> str:
    """An option's value as --resume names it: switches as on/off, by type (1 == True)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return "not set" if value is None else str(value)


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
                   f"{logs['epoch_time_s']:.1f} s")


class StopWhenStdoutCloses(Callback):
    """Stop training, as SIGPIPE would stop a Unix tool, once the reader of stdout has gone
    (`partrain train | head -3`): checkpoint written, exit status 141."""

    def __init__(self, stream):
        self.stream = stream

    def _check(self) -> None:
        if getattr(self.stream, "closed_pipe", False):
            raise TrainingInterrupted(signal.SIGPIPE)

    def on_batch_end(self, trainer, step, logs):
        self._check()

    def on_epoch_end(self, trainer, epoch, logs):
        self._check()


class _Signals:
    """SIGINT and SIGTERM raise TrainingInterrupted wherever the command line is in charge:
    everywhere but inside `fit`, whose own guard stands in for these handlers while it runs
    (and gives them back after), acting on a signal only at safe points. Inside `held()` a
    signal waits for the end of the block, so that a file being written is finished first.
    """

    DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}

    def __init__(self):
        self.depth = 0
        self.pending: int | None = None
        self.previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, default in self.DEFAULTS.items():  # an ignored SIGINT stays ignored
            if signal.getsignal(signum) is default:
                self.previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.depth:
            self.pending = signum
        else:
            raise TrainingInterrupted(signum)

    @contextlib.contextmanager
    def held(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth and self.pending is not None:
            signum, self.pending = self.pending, None
            raise TrainingInterrupted(signum)


_ADDRESS = re.compile(r"(?:(?:tcp|tls|ws|wss|ucx)://)?(?:\[[0-9A-Fa-f:.]+\]|[\w.-]+):(\d{1,5})")


def _scheduler(args) -> str | None:
    """--scheduler, checked against --backend and for the form of an address, so that a typo
    fails at once instead of inside Dask."""
    if args.scheduler is not None and args.backend != "dask":
        raise UsageError("--scheduler needs --backend dask")
    if args.scheduler is not None:
        match = _ADDRESS.fullmatch(args.scheduler)
        if match is None or not 0 < int(match[1]) < 65536:
            raise UsageError(f"--scheduler must be a Dask scheduler address such as "
                             f"tcp://HOST:8786, got {args.scheduler!r}")
    return args.scheduler


# ----------------------------------------------------------------------------- bench


def add_bench_parser(sub) -> None:
    """Register `partrain bench` on the CLI's subparsers."""
    bench = sub.add_parser(
        "bench", help="scaling experiment: examples/s, speedup, efficiency per n_jobs",
        description="Time full training steps on synthetic data of each model's input shape.")
    bench.add_argument("--model", type=_csv(str), default=["signs-cnn", "mnist-cnn", "mlp"],
                       help="comma-separated models (default signs-cnn,mnist-cnn,mlp)")
    bench.add_argument("--batch-size", type=_csv(int), default=[32, 64],
                       help="comma-separated batch sizes (default 32,64)")
    bench.add_argument("--n-jobs", type=_csv(int), default=[1, 2],
                       help="comma-separated worker counts (default 1,2)")
    bench.add_argument("--chunk-size", type=int, default=None,
                       help="examples per task (default: from model and batch size)")
    bench.add_argument("--chunk-plan", type=_csv(str), default=["auto"],
                       help="comma-separated chunk plans: auto (partrain's) and/or max4 (the "
                       "first release's, at most 4 chunks per batch) for before/after tables")
    bench.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    bench.add_argument("--repeats", type=int, default=5,
                       help="rounds; each times every configuration once (default 5)")
    bench.add_argument("--duration", type=float, default=3.0, help="seconds per window")
    bench.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up")
    bench.add_argument("--compare", choices=["torch"], default=None,
                       help="also time PyTorch: default and tuned at 1..cores threads, DDP at "
                       "each n_jobs above 1")
    bench.add_argument("--scaling", choices=["strong", "weak", "both"], default="strong",
                       help="strong: fixed batch; weak: --batch-size per process, the batch "
                       "grows with n_jobs (default strong)")
    bench.add_argument("--no-ceiling", dest="ceiling", action="store_false",
                       help="skip the ceiling rows (independent processes, no engine)")
    bench.add_argument("--backend", choices=["loky", "dask"], default="loky",
                       help="dask: also times the local backend, to show Dask's overhead")
    bench.add_argument("--scheduler", default=None,
                       help="dask scheduler address tcp://HOST:8786 (default: a local cluster)")
    bench.add_argument("--json", default=None, help="write the full report here")
    bench.add_argument("--csv", default=None, help="write one row per configuration here")
    bench.add_argument("--plot", default=None, help="write the scaling plot (PNG) here")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    """`partrain bench`: run, print the table, write the requested files."""
    from .bench import format_table, run_bench, write_csv, write_json
    from .plots import plot_scaling

    if args.plot:
        from .plots import require_matplotlib

        require_matplotlib()
    check_outputs([(f"--{option}", getattr(args, option), False, None)
                   for option in ("json", "csv", "plot")])
    report = run_bench([m.replace("_", "-") for m in args.model], args.batch_size, args.n_jobs,
                       args.dtype, args.repeats, args.duration, args.warmup,
                       compare_torch=args.compare == "torch", chunk_size=args.chunk_size,
                       backend=args.backend, scheduler=_scheduler(args),
                       progress=not args.quiet, ceiling=args.ceiling,
                       chunk_plans=tuple(args.chunk_plan),
                       scaling=("strong", "weak") if args.scaling == "both" else (args.scaling,))
    print(format_table(report))
    for option, writer in ((args.json, write_json), (args.csv, write_csv),
                           (args.plot, plot_scaling)):
        if option:
            writer(report, option)
            print(f"wrote {option}")
    return 0


# ----------------------------------------------------------------------------- evaluate


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """counts[i, j] = examples of true class i predicted as j."""
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes ** 2).reshape(
        n_classes, n_classes)


def cmd_evaluate(args) -> int:
    if args.plot:
        from .plots import require_matplotlib

        require_matplotlib()
        check_outputs([("--plot", args.plot, True, None),
                       *(("--plot", str(Path(args.plot) / name), False, None)
                         for name in ("recall.png", "confusion.png"))])
    # a checkpoint holds a model too (with its optimizer state, ignored here)
    meta, arrays = read_npz(args.model_file, ("model", "checkpoint"))
    model = model_from_arrays(meta, arrays, args.model_file)
    args.dataset = args.dataset or model.metadata.get("dataset")
    if args.dataset is None:
        raise UsageError("--dataset is required: the model file does not name its dataset")
    if args.normalize is None:
        args.normalize = model.metadata.get("normalize", "scale")
    # only the split evaluated, unless standardising needs the training set's statistics
    split = None if args.normalize == "standardize" else \
        "test" if args.split == "test" else "train"
    data = _load_data(args, model, split=split)
    _check_fit(model, data, f"the model in {args.model_file}")
    X, y = _evaluation_split(args, model, data)
    pred = model.predict(X)
    k, names = data.n_classes, data.class_names
    cm = confusion_matrix(y, pred, k)
    recall = np.divide(np.diag(cm), cm.sum(axis=1), out=np.zeros(k), where=cm.sum(axis=1) > 0)
    loss, acc = model.evaluate(X, y)
    print(f"{args.model_file} on {data.name} ({args.split}, {len(y):,} examples)")
    print(f"accuracy {acc:.4f}  loss {loss:.4f}\n")
    width = max(5, *(len(n) for n in names))
    print("per-class recall")
    for name, r, n in zip(names, recall, cm.sum(axis=1)):
        print(f"  {name:>{width}}  {r:.4f}  ({n} examples)")
    print("\nconfusion matrix (rows: true, columns: predicted)")
    cell = max(4, len(str(cm.max())) + 1)
    print(" " * (width + 2) + "".join(f"{n[:cell - 1]:>{cell}}" for n in names))
    for name, row in zip(names, cm):
        print(f"  {name:>{width}}" + "".join(f"{v:>{cell}}" for v in row))
    if args.plot:
        from .plots import plot_confusion, plot_recall

        out = Path(args.plot)
        title = (f"{model.metadata.get('model') or Path(args.model_file).name} on {data.name}, "
                 f"{args.split} split: accuracy {acc:.4f}")
        print(f"\nplots: {plot_recall(recall, names, out / 'recall.png', title)}, "
              f"{plot_confusion(cm, names, out / 'confusion.png', title)}")
    return 0


def _evaluation_split(args, model: Sequential, data) -> tuple[np.ndarray, np.ndarray]:
    """--split's examples: test; train = those trained on; validation = the held-out end of
    the training set (the model records its --validation-split)."""
    if args.split == "test":
        return data.x_test, data.y_test
    fraction = model.metadata.get("validation_split") or 0.0
    at = validation_split_point(len(data.x_train), fraction)
    if args.split == "train":
        return data.x_train[:at], data.y_train[:at]
    if not fraction:
        raise UsageError(f"--split validation: {args.model_file} was trained without a "
                         "validation split (--validation-split 0, or before partrain had one)")
    return data.x_train[at:], data.y_train[at:]


# ----------------------------------------------------------------------------- gradcheck


def cmd_gradcheck(args) -> int:
    from .gradcheck import gradcheck

    for option, value, ok in (("--eps", args.eps, args.eps > 0),
                              ("--n-params", args.n_params, args.n_params >= 1),
                              ("--examples", args.examples, args.examples >= 1)):
        if not ok:
            raise UsageError(f"{option} must be > 0, got {value}")
    if args.model_file is not None:
        if args.model is not None:
            raise UsageError("give a MODEL.npz or --model NAME, not both")
        meta, arrays = read_npz(args.model_file, ("model", "checkpoint"))
        model = model_from_arrays(meta, arrays, args.model_file).copy("float64")
        what = f"{args.model_file} at its saved parameters"
    else:
        name = _given(args.model, "digits-cnn")
        model = zoo.get(name, seed=args.seed, dtype="float64")
        what = f"{name} at its initial parameters (seed {args.seed})"
    check_fits_memory(f"--examples {args.examples}: the inputs",  # (before allocating them)
                      (args.examples, *model.input_shape), np.float64)
    rng = np.random.default_rng(args.seed)
    X = rng.random((args.examples, *model.input_shape))
    y = rng.integers(0, model.n_classes, args.examples)
    print(f"gradcheck of {what}, on {args.examples} random inputs; up to {args.n_params} "
          "entries of each parameter array")
    result = gradcheck(model, X, y, eps=args.eps, n_params=args.n_params, seed=args.seed)
    width = max(len(name) for name in result.per_param) if result.per_param else 0
    for name, ratio in result.per_param.items():
        checked, size = result.checked[name]
        print(f"  {name:<{width}}  {ratio:.3e}  ({checked:,} of {size:,})")
    verdict = "PASS" if result.passed(args.tol) else "FAIL"
    print(f"{verdict}: relative difference {result.rel_diff:.3e} over {result.n_checked:,} "
          f"of {model.n_params:,} parameters in {len(result.per_param)} arrays (tolerance "
          f"{args.tol:g})")
    return 0 if verdict == "PASS" else EXIT_FAILURE


# ----------------------------------------------------------------------------- parser


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="partrain", description="Data-parallel training of NumPy networks.")
    parser.add_argument("--version", action="version", version=f"partrain {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    models = sorted(MODEL_DEFAULTS)
    datasets = f"one of {', '.join(DATASETS)} or npz:PATH"

    train = sub.add_parser("train", help="train a reference network",
                           description="Train a reference network; defaults: digits-cnn on "
                           "the offline digits dataset.")
    train.add_argument("--model", choices=models, default=None,
                       help="network (default digits-cnn)")
    train.add_argument("--dataset", default=None,
                       help=f"{datasets} (default: the model's own, e.g. digits)")
    train.add_argument("--epochs", type=int, default=None,
                       help="total epochs, also when resuming (default per model)")
    train.add_argument("--batch-size", type=int, default=None, help="examples per update")
    train.add_argument("--chunk-size", type=int, default=None,
                       help="examples per worker task (default: from model and batch size)")
    train.add_argument("--lr", type=float, default=None, help="learning rate")
    train.add_argument("--optimizer", choices=["adam", "sgd"], default=None,
                       help="default adam")
    train.add_argument("--momentum", type=float, default=None, help="SGD momentum")
    train.add_argument("--lr-decay", type=float, default=None,
                       help="inverse-time decay d: lr / (1 + d * epoch)")
    train.add_argument("--dropout", type=float, default=None, help="MLP dropout rate")
    train.add_argument("--batchnorm", action="store_const", const=True, default=None,
                       help="MLP batch normalisation")
    train.add_argument("--n-jobs", type=int, default=1, help="worker processes, -1 = all cores")
    train.add_argument("--seed", type=int, default=None, help="seed of init, shuffling, dropout")
    train.add_argument("--checkpoint", default=None,
                       help="write checkpoints to this .npz (claimed by this run: another run "
                       "naming it is refused while this one lives)")
    train.add_argument("--resume", default=None,
                       help="go on with the run in this checkpoint; options that define the "
                       "run may be repeated only with the checkpoint's values")
    train.add_argument("--validation-split", type=float, default=None, metavar="F",
                       help="hold out the last fraction F of the training set (before "
                       "shuffling) for the per-epoch val_loss/val_acc; 0 = none. The test set "
                       "is evaluated once, at the end (default 0.1)")
    train.add_argument("--early-stopping", type=int, default=None, metavar="PATIENCE",
                       help="stop once val_loss has not improved for PATIENCE epochs in a row "
                       "(Keras's EarlyStopping); the model saved is the last epoch's, keep "
                       "the best with --save-best")
    train.add_argument("--save-best", default=None, metavar="PATH",
                       help="keep the model of the epoch with the lowest val_loss in this "
                       "file (Keras's ModelCheckpoint)")
    train.add_argument("--save", default=None, help="model file (default MODEL.npz)")
    train.add_argument("--history", default=None, help="write the history as JSON here")
    train.add_argument("--plot", default=None, help="write history.png into this folder")
    _add_data_options(train, normalize_default=None)
    train.add_argument("--backend", choices=["loky", "dask"], default="loky",
                       help="how chunks reach workers (default loky)")
    train.add_argument("--scheduler", default=None,
                       help="dask scheduler address tcp://HOST:8786 (default: a local cluster)")
    train.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("evaluate", help="accuracy, per-class recall, confusion matrix")
    evaluate.add_argument("model_file", help="a model (or checkpoint) saved by train (.npz)")
    evaluate.add_argument("--dataset", default=None,
                          help=f"{datasets} (default: the one the model was trained on)")
    evaluate.add_argument("--split", choices=["test", "train", "validation"], default="test",
                          help="test (default; needs only the test files); train: the "
                          "examples trained on; validation: the held-out end of the training "
                          "set (--validation-split)")
    evaluate.add_argument("--plot", default=None,
                          help="write recall.png and confusion.png into this folder")
    _add_data_options(evaluate, normalize_default=None)
    evaluate.set_defaults(func=cmd_evaluate)

    check = sub.add_parser("gradcheck", help="numerical gradient check of a network",
                           description="Compare the analytic gradient with central "
                           "differences (float64), per parameter array.")
    check.add_argument("model_file", nargs="?", default=None, metavar="MODEL.npz",
                       help="check a saved model (or checkpoint) at its parameters")
    check.add_argument("--model", choices=models, default=None,
                       help="check a fresh reference network (default digits-cnn)")
    check.add_argument("--eps", type=float, default=1e-7, help="finite-difference step")
    check.add_argument("--n-params", type=int, default=100,
                       help="entries checked in EACH parameter array, at random (all of a "
                       "smaller one; default 100)")
    check.add_argument("--examples", type=int, default=2, help="random inputs (default 2)")
    check.add_argument("--tol", type=float, default=1e-6, help="pass threshold")
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(func=cmd_gradcheck)

    add_bench_parser(sub)
    return parser


def _add_data_options(parser, normalize_default="scale") -> None:
    parser.add_argument("--data-dir", default="data", help="dataset folder (default data/)")
    parser.add_argument("--normalize", choices=["scale", "standardize", "none"],
                        default=normalize_default,
                        help="input scaling (default scale, or the one the model or checkpoint "
                        "was trained with)")


def _version() -> str:
    from .version import __version__

    return __version__


class _ClosedPipeSafe:
    """A stand-in for sys.stdout / sys.stderr on which writing to a closed pipe (its reader,
    e.g. `head`, has exited) does not raise BrokenPipeError: the text is dropped, the stream's
    descriptor is pointed at /dev/null (the recipe of Python's signal module documentation,
    "Note on SIGPIPE", so that the interpreter's last flush cannot fail either) and
    `closed_pipe` becomes true. Lines are flushed as they are written, so that a closed
    stdout is noticed at the next line rather than at exit."""

    def __init__(self, stream):
        self._stream = stream
        self.closed_pipe = False

    def write(self, text: str) -> int:
        if not self.closed_pipe:
            try:
                self._stream.write(text)
                if "\n" in text:
                    self._stream.flush()
            except BrokenPipeError:
                self._to_devnull()
        return len(text)

    def flush(self) -> None:
        if not self.closed_pipe:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._to_devnull()

    def _to_devnull(self) -> None:
        self.closed_pipe = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):  # e.g. a stream without a descriptor
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (see the module docstring)."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _ClosedPipeSafe(sys.stdout), _ClosedPipeSafe(sys.stderr)
    try:
        status = _main(argv)
        sys.stdout.flush()
        stdout_closed = sys.stdout.closed_pipe
    finally:
        sys.stdout, sys.stderr = saved
    return EXIT_CLOSED_PIPE if stdout_closed and status == 0 else status


def _main(argv: list[str] | None) -> int:
    parser = make_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    prog = f"partrain {args.command}"
    try:
        with warnings.catch_warnings():  # `train` prints these in its header instead
            warnings.simplefilter("ignore", ParallelismWarning)
            return args.func(args)
    except (UsageError, ValueError, FileNotFoundError, FileFormatError, DataError,
            ImportError, CheckpointInUseError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (WorkerCrashError, FloatingPointError, OSError) as exc:
        print(f"{prog}: failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt as exc:
        where = f"; checkpoint in {args.checkpoint}" if getattr(args, "checkpoint", None) else ""
        print(f"{prog}: interrupted{where}", file=sys.stderr)
        return 128 + getattr(exc, "signum", signal.SIGINT)
