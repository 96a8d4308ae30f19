"""`partrain train`: a reference network on a dataset, in named steps: settle the options
(a new run, or a checkpoint's run to go on with), check every output path, claim the
checkpoint, load the data, build the trainer, record the data pipeline in the model, then fit,
write the files, evaluate on the test set once, and plot."""

from __future__ import annotations

import contextlib
import signal
import sys
import time

from .. import zoo
from ..callbacks import Callback, EarlyStopping, EpochSummary, ModelCheckpoint
from ..layers import BatchNorm, Dropout
from ..optim import SGD, Adam, optimizer_config
from ..runlock import CheckpointClaim
from ..shm import SharedMemoryFullError
from ..signals import SignalGate, TrainingInterrupted
from ..trainer import DEFAULT_VALIDATION_SPLIT, Trainer, validation_split_point
from ..zoo import TRAINING_DEFAULTS
from .common import (
    EXIT_FAILURE,
    UsageError,
    build_model,
    check_fit,
    dataset_name,
    dataset_options,
    given,
    load_data,
    scheduler_address,
)
from .outputs import TrainOutputs

# `train` options that define a run: with --resume, each may only repeat the checkpoint's value
RUN_DEFINING = ("model", "dataset", "normalize", "optimizer", "lr", "lr_decay", "batch_size",
                "chunk_size", "seed", "momentum", "dropout", "batchnorm", "validation_split")


def cmd_train(args) -> int:
    """`partrain train`; Ctrl-C before training starts writes nothing and says so."""
    if args.plot:
        from ..plots import require_matplotlib

        require_matplotlib()
    scheduler = scheduler_address(args)
    signals = SignalGate()
    signals.install()
    try:
        return run_training(args, scheduler, signals)
    except KeyboardInterrupt as exc:  # (from then on, fit_and_finish reports signals itself)
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"partrain train: interrupted by {signal.Signals(signum).name} before training "
              "started; nothing was written", file=sys.stderr)
        return 128 + signum
    finally:
        signals.restore()


def run_training(args, scheduler: str | None, signals: SignalGate) -> int:
    """The steps of `train`, in order; each raises UsageError before any work it would waste."""
    overrides = dict(n_jobs=args.n_jobs, progress=not args.quiet, checkpoint=args.checkpoint,
                     backend=args.backend, scheduler=scheduler)
    if args.resume:
        trainer = Trainer.from_checkpoint(args.resume, **overrides)
        model_name, defaults = settle_resumed_options(args, trainer)
    else:
        trainer = None
        model_name, defaults = settle_new_options(args)
    epochs = check_run_options(args, defaults)
    outputs = TrainOutputs(args, model_name, signals)  # every output path checked here
    with claim_checkpoint(args.checkpoint) as claim:  # before the data load: a second run stops now
        if trainer is None:
            probe = None if model_name == "mlp" else zoo.get(model_name)
            data = load_data(args, probe or zoo.mlp(input_shape=(28, 28, 1)))
            trainer = new_trainer(args, model_name, defaults, data, overrides)
        else:
            data = load_data(args, trainer.model)
            check_fit(trainer.model, data, f"the model in {args.resume}")
        if len(data.x_train) == 0:
            raise UsageError(f"dataset {data.name!r} has no training examples")
        record_data_pipeline(args, trainer.model, data)
        trainer.checkpoint_claim = claim
        if data.synthetic and not args.quiet:
            print("NOTE: SYNTHETIC random data: for timing experiments only.", file=sys.stderr)
        return fit_and_finish(args, trainer, data, epochs, model_name, outputs)


def settle_resumed_options(args, trainer: Trainer) -> tuple[str, dict]:
    """--resume: options left out take the checkpoint's values; given ones must equal them.
    Returns the model's name and its training defaults."""
    run = checkpoint_run(trainer)
    check_resume(args, run)
    model_name = run["model"] or "model"
    args.dataset = given(args.dataset, run["dataset"])
    if args.dataset is None:
        raise UsageError(f"--dataset is required: {args.resume} does not name its dataset")
    args.normalize = given(args.normalize, given(run["normalize"], "scale"))
    # (a checkpoint from before --validation-split validated on the test set: no split)
    args.validation_split = given(args.validation_split, given(run["validation_split"], 0.0))
    return model_name, TRAINING_DEFAULTS.get(model_name, {})


def settle_new_options(args) -> tuple[str, dict]:
    """A new run: options left out take the model's training defaults."""
    model_name = given(args.model, "digits-cnn")
    defaults = TRAINING_DEFAULTS[model_name]
    args.dataset = given(args.dataset, defaults["dataset"])
    args.normalize = given(args.normalize, "scale")
    args.validation_split = given(args.validation_split, DEFAULT_VALIDATION_SPLIT)
    if args.momentum is not None and args.optimizer != "sgd":
        raise UsageError("--momentum applies to --optimizer sgd only")
    return model_name, defaults


def check_run_options(args, defaults: dict) -> int:
    """Refuse impossible values and combinations; return the total number of epochs."""
    epochs = given(args.epochs, defaults.get("epochs", 10))
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
    return epochs


def new_trainer(args, model_name: str, defaults: dict, data, overrides: dict) -> Trainer:
    """The reference network for `data` and its trainer, from the options and defaults."""
    model = build_model(model_name, data, given(args.seed, 0), given(args.dropout, 0.0),
                        bool(args.batchnorm))
    lr = given(args.lr, defaults["lr"])
    optimizer = SGD(lr, momentum=given(args.momentum, 0.0)) if args.optimizer == "sgd" \
        else Adam(lr)
    model.metadata["model"] = model_name
    return Trainer(model, optimizer, batch_size=given(args.batch_size, defaults["batch_size"]),
                   chunk_size=args.chunk_size, seed=given(args.seed, 0),
                   lr_schedule=given(args.lr_decay, defaults.get("lr_decay")), **overrides)


def record_data_pipeline(args, model, data) -> None:
    """What the data pipeline was, in the model's metadata: resume and evaluate rebuild
    exactly these inputs (with the normalisation statistics, evaluate needs no training
    split)."""
    options = dataset_options(args, model)
    model.metadata.update(dataset=dataset_name(args.dataset), normalize=args.normalize,
                          dataset_options={k: list(v) if isinstance(v, tuple) else v
                                           for k, v in options.items()},
                          validation_split=args.validation_split)
    if data.normalization is not None:
        model.metadata["normalization"] = data.normalization


def fit_and_finish(args, trainer, data, epochs: int, model_name: str,
                   outputs: TrainOutputs) -> int:
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
                      f"on {describe_backend(trainer)}, batch {trainer.batch_size}, chunk "
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
        if args.checkpoint is None or isinstance(exc, SharedMemoryFullError):
            raise  # (no room for the workers' shared arrays: nothing trained, nothing to save)
        trained = trainer.epoch >= epochs and trainer.step_in_epoch == 0
        outputs.rescue_checkpoint(trainer, exc, epochs, trained)
        if not trained:
            return EXIT_FAILURE
        outputs.write_files(trainer)
    return outputs.report()


def describe_backend(trainer) -> str:
    """What computes the steps, for the train header: the serial engine, loky's processes,
    or a Dask cluster (given by address: its workers now, which starts the engine)."""
    processes, n_jobs = trainer.plan.processes, trainer.n_jobs
    if trainer.backend == "dask":
        if trainer.backend_options.get("scheduler") is None:
            return (f"the dask backend (a local cluster of {processes} worker "
                    f"process{'es' * (processes > 1)})")
        engine = trainer.engine
        return f"the dask backend (scheduler {engine.address}, {engine.n_workers} workers)"
    asked = "" if processes == n_jobs else f", of n_jobs={n_jobs}"
    if processes == 1:
        return f"the serial backend (1 process{asked})"
    return f"the loky backend ({processes} processes{asked})"


@contextlib.contextmanager
def claim_checkpoint(checkpoint: str | None):
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


def check_resume(args, run: dict) -> None:
    """With --resume, each run-defining option given must equal the checkpoint's; list all
    that differ (with both values) in one UsageError."""
    differ = []
    for name in RUN_DEFINING:
        value = getattr(args, name)
        if value is None or run[name] is None and name in ("model", "dataset", "normalize",
                                                           "validation_split"):
            continue
        if name == "dataset":
            value = dataset_name(value)
        elif name == "chunk_size":  # the trainer caps the chunk at the batch size
            value = min(value, given(args.batch_size, run["batch_size"]))
        if value != run[name]:
            option = "--" + name.replace("_", "-")
            differ.append(f"{option} {_shown(value)} (checkpoint: {_shown(run[name])})")
    if differ:
        raise UsageError(f"--resume {args.resume} goes on with the checkpoint's run, and these "
                         f"options differ from it: {', '.join(differ)}; leave them out (or "
                         "equal), or drop --resume to start a new run")


def _shown(value) -> str:
    """An option's value as --resume names it: switches as on/off, by type (1 == True)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return "not set" if value is None else str(value)


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
