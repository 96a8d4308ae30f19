"""The `partrain` command line: train | evaluate | gradcheck | bench."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from . import zoo
from .callbacks import Callback
from .chunks import WorkerCrashError
from .data import DATASETS, DataError, load_dataset
from .io import FileFormatError
from .model import Sequential
from .parallel import ParallelismWarning

# Per-model defaults: `partrain train` alone trains something real, offline, in seconds.
MODEL_DEFAULTS = {
    "digits-cnn": {"dataset": "digits", "epochs": 10, "batch_size": 32, "lr": 3e-3},
    "signs-cnn": {"dataset": "signs", "epochs": 20, "batch_size": 64, "lr": 1e-3},
    "mnist-cnn": {"dataset": "mnist", "epochs": 2, "batch_size": 32, "lr": 1e-3},
    "mlp": {"dataset": "mnist", "epochs": 10, "batch_size": 64, "lr": 1e-3, "lr_decay": 0.01},
}
RUN_DEFINING = ("model", "optimizer", "lr", "lr_decay", "batch_size", "chunk_size", "seed",
                "momentum", "dropout", "batchnorm")
EXIT_USAGE, EXIT_FAILURE = 2, 1


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


def _load_data(args, model: Sequential | None):
    """The dataset named by --dataset; synthetic data take the model's input and class count."""
    options = {}
    if args.dataset == "synthetic" and model is not None:
        options = {"shape": model.input_shape, "n_classes": model.n_classes}
    return load_dataset(args.dataset, args.data_dir, normalize=args.normalize, **options)


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


class EpochSummary(Callback):
    """One line per epoch: train loss/accuracy, validation accuracy, speed, time."""

    def __init__(self, total_epochs: int, quiet: bool):
        self.total, self.quiet = total_epochs, quiet

    def on_epoch_end(self, trainer, epoch, logs):
        if self.quiet:
            return
        val = f"  val_acc {logs['val_accuracy']:.4f}" if "val_accuracy" in logs else ""
        line = (f"epoch {epoch + 1:>3}/{self.total}  loss {logs['loss']:.4f}  "
                f"acc {logs['accuracy']:.4f}{val}  {logs['examples_per_s']:,.0f} ex/s  "
                f"{logs['epoch_time_s']:.1f} s")
        from tqdm.auto import tqdm

        tqdm.write(line)


# ----------------------------------------------------------------------------- train


def cmd_train(args) -> int:
    from .optim import SGD, Adam
    from .trainer import Trainer

    if args.plot:
        from .plots import require_matplotlib

        require_matplotlib()
    overrides = dict(n_jobs=args.n_jobs, progress=not args.quiet, checkpoint=args.checkpoint,
                     backend=args.backend, scheduler=_scheduler(args))
    if args.resume:
        given = [f"--{k.replace('_', '-')}" for k in RUN_DEFINING if getattr(args, k) is not None]
        if given:
            raise UsageError(f"{', '.join(given)} cannot change on --resume: the checkpoint "
                             "defines the run")
        trainer = Trainer.from_checkpoint(args.resume, **overrides)
        model_name = trainer.model.metadata.get("model", "model")
        args.dataset = _given(args.dataset, trainer.model.metadata.get("dataset"))
        if args.dataset is None:
            raise UsageError(f"--dataset is required: {args.resume} does not name its dataset")
        defaults = MODEL_DEFAULTS.get(model_name, {})
    else:
        model_name = _given(args.model, "digits-cnn")
        defaults = MODEL_DEFAULTS[model_name]
        args.dataset = _given(args.dataset, defaults["dataset"])
        if args.momentum is not None and args.optimizer != "sgd":
            raise UsageError("--momentum applies to --optimizer sgd only")
    epochs = _given(args.epochs, defaults.get("epochs", 10))
    if epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {epochs}")
    for path in (args.history, args.save):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if args.resume:
        data = _load_data(args, trainer.model)
        _check_fit(trainer.model, data, f"the model in {args.resume}")
    else:
        probe = None if model_name == "mlp" else zoo.get(model_name)
        data = _load_data(args, probe or zoo.mlp(input_shape=(28, 28, 1)))
        model = build_model(model_name, data, _given(args.seed, 0),
                            _given(args.dropout, 0.0), bool(args.batchnorm))
        lr = _given(args.lr, defaults["lr"])
        optimizer = SGD(lr, momentum=_given(args.momentum, 0.0)) if args.optimizer == "sgd" \
            else Adam(lr)
        trainer = Trainer(model, optimizer, batch_size=_given(args.batch_size,
                                                              defaults["batch_size"]),
                          chunk_size=args.chunk_size, seed=_given(args.seed, 0),
                          lr_schedule=_given(args.lr_decay, defaults.get("lr_decay")),
                          **overrides)
        dataset = args.dataset
        if dataset.startswith("npz:"):  # so that evaluate finds it from anywhere
            dataset = "npz:" + str(Path(dataset[4:]).resolve())
        model.metadata.update(model=model_name, dataset=dataset, normalize=args.normalize)
    if data.synthetic and not args.quiet:
        print("NOTE: SYNTHETIC random data: for timing experiments only.", file=sys.stderr)
    remaining = epochs - trainer.epoch
    if remaining <= 0:
        print(f"The checkpoint has already trained {trainer.epoch} epochs (--epochs {epochs}): "
              "nothing to do.")
    else:
        with trainer:
            if not args.quiet:
                print(f"Training {model_name} on {data.name} ({len(data.x_train):,} train, "
                      f"{len(data.x_test):,} test) with n_jobs={trainer.n_jobs}, batch "
                      f"{trainer.batch_size}, chunk {trainer.chunk_size}; epochs "
                      f"{trainer.epoch + 1}..{epochs}", file=sys.stderr)
            for note in trainer.plan.notes(chunk_option="--chunk-size {}"):
                print(f"note: {note}", file=sys.stderr)
            t0 = time.perf_counter()
            trainer.fit(data.x_train, data.y_train, epochs=remaining,
                        validation_data=(data.x_test, data.y_test),
                        callbacks=[EpochSummary(epochs, args.quiet)])
            wall = time.perf_counter() - t0
        test_loss, test_acc = trainer.model.evaluate(data.x_test, data.y_test)
        print(f"test accuracy {test_acc:.4f}  test loss {test_loss:.4f}  "
              f"wall time {wall:.1f} s")
    save = _given(args.save, f"{model_name}.npz")
    trainer.model.save(save)
    print(f"model saved to {save}")
    if args.history:
        Path(args.history).write_text(json.dumps(trainer.history.history, indent=1))
    if args.plot:
        from .plots import plot_history

        print(f"plot: {plot_history(trainer.history.history, Path(args.plot) / 'history.png')}")
    return 0


def _scheduler(args) -> str | None:
    """--scheduler, checked against --backend."""
    if args.scheduler and args.backend != "dask":
        raise UsageError("--scheduler needs --backend dask")
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
    bench.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    bench.add_argument("--repeats", type=int, default=5, help="timed windows (default 5)")
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
    report = run_bench([m.replace("_", "-") for m in args.model], args.batch_size, args.n_jobs,
                       args.dtype, args.repeats, args.duration, args.warmup,
                       compare_torch=args.compare == "torch", chunk_size=args.chunk_size,
                       backend=args.backend, scheduler=_scheduler(args),
                       progress=not args.quiet, ceiling=args.ceiling,
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
    from .model import load

    if args.plot:
        from .plots import require_matplotlib

        require_matplotlib()
    model = load(args.model_file)
    args.dataset = args.dataset or model.metadata.get("dataset")
    if args.dataset is None:
        raise UsageError("--dataset is required: the model file does not name its dataset")
    if args.normalize is None:
        args.normalize = model.metadata.get("normalize", "scale")
    data = _load_data(args, model)
    _check_fit(model, data, f"the model in {args.model_file}")
    X, y = (data.x_test, data.y_test) if args.split == "test" else (data.x_train, data.y_train)
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
        print(f"\nplots: {plot_recall(recall, names, out / 'recall.png')}, "
              f"{plot_confusion(cm, names, out / 'confusion.png')}")
    return 0


# ----------------------------------------------------------------------------- gradcheck


def cmd_gradcheck(args) -> int:
    from .gradcheck import gradcheck

    for option, value, ok in (("--eps", args.eps, args.eps > 0),
                              ("--n-params", args.n_params, args.n_params >= 1),
                              ("--examples", args.examples, args.examples >= 1)):
        if not ok:
            raise UsageError(f"{option} must be > 0, got {value}")
    model = zoo.get(args.model, seed=args.seed, dtype="float64")
    rng = np.random.default_rng(args.seed)
    X = rng.random((args.examples, *model.input_shape))
    y = rng.integers(0, model.n_classes, args.examples)
    result = gradcheck(model, X, y, eps=args.eps, n_params=args.n_params, seed=args.seed)
    for name, ratio in result.per_param.items():
        print(f"  {name:<14} {ratio:.3e}")
    verdict = "PASS" if result.passed(args.tol) else "FAIL"
    print(f"{verdict}: relative difference {result.rel_diff:.3e} over {result.n_checked:,} "
          f"of {model.n_params:,} parameters (tolerance {args.tol:g})")
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
    train.add_argument("--checkpoint", default=None, help="write checkpoints to this .npz")
    train.add_argument("--resume", default=None, help="continue from this checkpoint")
    train.add_argument("--save", default=None, help="model file (default MODEL.npz)")
    train.add_argument("--history", default=None, help="write the history as JSON here")
    train.add_argument("--plot", default=None, help="write history.png into this folder")
    _add_data_options(train)
    train.add_argument("--backend", choices=["loky", "dask"], default="loky",
                       help="how chunks reach workers (default loky)")
    train.add_argument("--scheduler", default=None,
                       help="dask scheduler address tcp://HOST:8786 (default: a local cluster)")
    train.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("evaluate", help="accuracy, per-class recall, confusion matrix")
    evaluate.add_argument("model_file", help="a model saved by train (.npz)")
    evaluate.add_argument("--dataset", default=None,
                          help=f"{datasets} (default: the one the model was trained on)")
    evaluate.add_argument("--split", choices=["test", "train"], default="test")
    evaluate.add_argument("--plot", default=None,
                          help="write recall.png and confusion.png into this folder")
    _add_data_options(evaluate, normalize_default=None)
    evaluate.set_defaults(func=cmd_evaluate)

    check = sub.add_parser("gradcheck", help="numerical gradient check of a network")
    check.add_argument("--model", choices=models, default="digits-cnn")
    check.add_argument("--eps", type=float, default=1e-7, help="finite-difference step")
    check.add_argument("--n-params", type=int, default=500,
                       help="random subset of parameters to check (default 500)")
    check.add_argument("--examples", type=int, default=2, help="random inputs (default 2)")
    check.add_argument("--tol", type=float, default=1e-6, help="pass threshold")
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(func=cmd_gradcheck)

    add_bench_parser(sub)
    return parser


def _add_data_options(parser, normalize_default="scale") -> None:
    parser.add_argument("--data-dir", default="data", help="dataset folder (default data/)")
    parser.add_argument("--normalize", choices=["scale", "standardize", "none"],
                        default=normalize_default, help="input scaling (default scale)")


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = make_parser()
    args = parser.parse_args(argv)
    prog = f"partrain {args.command}"
    try:
        with warnings.catch_warnings():  # `train` prints these in its header instead
            warnings.simplefilter("ignore", ParallelismWarning)
            return args.func(args)
    except (UsageError, ValueError, FileNotFoundError, FileFormatError, DataError,
            ImportError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (WorkerCrashError, FloatingPointError) as exc:
        print(f"{prog}: failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt as exc:
        where = f"; checkpoint in {args.checkpoint}" if getattr(args, "checkpoint", None) else ""
        print(f"{prog}: interrupted{where}", file=sys.stderr)
        return 128 + getattr(exc, "signum", signal.SIGINT)
