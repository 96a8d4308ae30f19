"""The command line's parser: every command and option, with its default in its help."""

from __future__ import annotations

import argparse

from ..data import DATASETS
from ..zoo import TRAINING_DEFAULTS
from .bench import cmd_bench
from .common import EXIT_USAGE
from .evaluate import cmd_evaluate
from .gradcheck import cmd_gradcheck
from .train import cmd_train


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) instead of the usage block."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _csv(kind):
    """argparse type for comma-separated lists: "1,2" -> [1, 2]."""
    def parse(text: str):
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} list: {text!r}") from None
    return parse


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="partrain", description="Data-parallel training of NumPy networks.")
    parser.add_argument("--version", action="version", version=f"partrain {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    models = sorted(TRAINING_DEFAULTS)
    datasets = f"one of {', '.join(DATASETS)} or npz:PATH"

    train = sub.add_parser("train", help="train a reference network",
                           description="Train a reference network; defaults: digits-cnn on "
                           "the offline digits dataset.")
    train.add_argument("--model", choices=models, default=None,
                       help="network (default digits-cnn)")
    train.add_argument("--dataset", default=None,
                       help=f"{datasets} (default: the model's own, e.g. digits)")
    def per_model(key: str) -> str:
        return ", ".join(f"{name} {TRAINING_DEFAULTS[name].get(key, 0):g}" for name in models)

    train.add_argument("--epochs", type=int, default=None,
                       help=f"total epochs, also when resuming (default per model: "
                       f"{per_model('epochs')})")
    train.add_argument("--batch-size", type=int, default=None,
                       help=f"examples per update (default per model: "
                       f"{per_model('batch_size')})")
    train.add_argument("--chunk-size", type=int, default=None,
                       help="examples per worker task (default: from model and batch size)")
    train.add_argument("--lr", type=float, default=None,
                       help=f"learning rate (default per model: {per_model('lr')})")
    train.add_argument("--optimizer", choices=["adam", "sgd"], default=None,
                       help="optimizer (default adam)")
    train.add_argument("--momentum", type=float, default=None, help="SGD momentum (default 0)")
    train.add_argument("--lr-decay", type=float, default=None,
                       help="inverse-time decay d: lr / (1 + d * epoch) (default per "
                       f"model: {per_model('lr_decay')})")
    train.add_argument("--dropout", type=float, default=None,
                       help="MLP dropout rate (default 0)")
    train.add_argument("--batchnorm", action="store_const", const=True, default=None,
                       help="MLP batch normalisation (default off)")
    train.add_argument("--n-jobs", type=int, default=1,
                       help="processes computing each step, -1 = all cores (default 1: no "
                       "worker process; with --backend dask and no --scheduler, the local "
                       "cluster's workers)")
    train.add_argument("--seed", type=int, default=None,
                       help="seed of init, shuffling, dropout (default 0)")
    train.add_argument("--checkpoint", default=None,
                       help="write checkpoints to this .npz (claimed by this run: another run "
                       "naming it is refused while this one lives; default: none)")
    train.add_argument("--resume", default=None,
                       help="go on with the run in this checkpoint; options that define the "
                       "run may be repeated only with the checkpoint's values (default: a "
                       "new run)")
    train.add_argument("--validation-split", type=float, default=None, metavar="F",
                       help="hold out the last fraction F of the training set (before "
                       "shuffling) for the per-epoch val_loss/val_acc; 0 = none. The test set "
                       "is evaluated once, at the end (default 0.1)")
    train.add_argument("--early-stopping", type=int, default=None, metavar="PATIENCE",
                       help="stop once val_loss has not improved for PATIENCE epochs in a row "
                       "(Keras's EarlyStopping); the model saved is the last epoch's, keep "
                       "the best with --save-best (default: off)")
    train.add_argument("--save-best", default=None, metavar="PATH",
                       help="keep the model of the epoch with the lowest val_loss in this "
                       "file (Keras's ModelCheckpoint; default: off)")
    train.add_argument("--save", default=None, metavar="MODEL.npz",
                       help="model file (default MODEL-DATASET.npz in the current folder, e.g. "
                       "digits-cnn-digits.npz)")
    train.add_argument("--history", default=None,
                       help="write the history as JSON here (default: not written)")
    train.add_argument("--plot", default=None,
                       help="write history.png into this folder (default: no plot)")
    add_data_options(train, normalize_default=None)
    train.add_argument("--backend", choices=["loky", "dask"], default="loky",
                       help="how chunks reach workers (default loky)")
    train.add_argument("--scheduler", default=None,
                       help="dask scheduler address tcp://HOST:8786 (default: a local "
                       "cluster); connecting gives up after 10 s")
    train.add_argument("--quiet", action="store_true",
                       help="no progress bars or epoch lines (default: shown)")
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
    add_data_options(evaluate, normalize_default=None)
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
                       help="dask scheduler address tcp://HOST:8786 (default: a local "
                       "cluster); connecting gives up after 10 s")
    bench.add_argument("--json", default=None, help="write the full report here")
    bench.add_argument("--csv", default=None, help="write one row per configuration here")
    bench.add_argument("--plot", default=None, help="write the scaling plot (PNG) here")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.set_defaults(func=cmd_bench)


def add_data_options(parser, normalize_default="scale") -> None:
    parser.add_argument("--data-dir", default="data", help="dataset folder (default data/)")
    parser.add_argument("--normalize", choices=["scale", "standardize", "standardize-int",
                                                "none"],
                        default=normalize_default,
                        help="input scaling (default scale, or the one the model or checkpoint "
                        "was trained with)")


def _version() -> str:
    from ..version import __version__

    return __version__
