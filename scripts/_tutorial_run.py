"""What the tutorial training scripts share: their common options and the timed training run.

Each script keeps its own set-up (network, data, report); this module holds the parts that
would otherwise be copied into every one of them.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np

from partrain import Sequential, Trainer, optim
from partrain.callbacks import EpochSummary
from partrain.parallel import ParallelismWarning
from partrain.trainer import DEFAULT_VALIDATION_SPLIT, validation_split_point

LOAD_ERRORS = (OSError, ValueError, ImportError)  # reported in one line, exit status 2


def add_mnist_data_options(parser: argparse.ArgumentParser) -> None:
    """--data-dir, --dataset and --limit of the scripts that train on MNIST-like data."""
    parser.add_argument("--data-dir", default="data",
                        help="folder holding mnist/*-ubyte.gz (default data/)")
    parser.add_argument("--dataset", default="mnist",
                        help="mnist (default), fashion-mnist or npz:PATH: any 28x28x1, "
                        "10-class dataset partrain.data.load_dataset reads")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="train on the first N training images only (a quick run)")


def add_run_options(parser: argparse.ArgumentParser, defaults: dict, seed_help: str) -> None:
    """--epochs, --n-jobs, --chunk-size, --seed, --validation-split, --save and --quiet."""
    parser.add_argument("--epochs", type=int, default=defaults["epochs"],
                        help=f"epochs (default {defaults['epochs']})")
    parser.add_argument("--n-jobs", type=int, default=1,
                        help="worker processes, -1 = all cores (default 1)")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="examples per worker task (default: from model and batch size)")
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--validation-split", type=float, default=DEFAULT_VALIDATION_SPLIT,
                        metavar="F", help="hold out the last fraction F of the training images "
                        "for the per-epoch validation (default "
                        f"{DEFAULT_VALIDATION_SPLIT:g}, unless a set-up says otherwise); the test "
                        "set is used once, at the end")
    parser.add_argument("--save", metavar="MODEL.npz", help="save the trained model here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")


def check_limit(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--limit, when given, must be a positive count; --validation-split in [0, 1)."""
    if getattr(args, "limit", None) is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    if not 0 <= args.validation_split < 1:
        parser.error(f"--validation-split must be in [0, 1), got {args.validation_split:g}")


def split_sizes(n_images: int, validation_split: float) -> str:
    """'54,000 training + 6,000 validation' for `n_images` held out as the trainer does."""
    n_train = validation_split_point(n_images, validation_split)
    return f"{n_train:,} training + {n_images - n_train:,} validation"


def fit_timed(model: Sequential, x_train: np.ndarray, y_train: np.ndarray,
              args: argparse.Namespace, defaults: dict, lr_schedule=None,
              optimizer: optim.Optimizer | None = None) -> tuple[Trainer, float]:
    """Train with `optimizer` (default Adam at the set-up's lr) and the set-up's batch size,
    validating on the last --validation-split of the training images (never on the test
    set); return the trainer and the wall seconds."""
    t0 = time.perf_counter()
    optimizer = optim.Adam(defaults["lr"]) if optimizer is None else optimizer
    with warnings.catch_warnings():  # said below, in this script's own options
        warnings.simplefilter("ignore", ParallelismWarning)
        trainer = Trainer(model, optimizer, n_jobs=args.n_jobs, seed=args.seed,
                          batch_size=defaults["batch_size"], chunk_size=args.chunk_size,
                          lr_schedule=lr_schedule, progress=not args.quiet)
    for note in trainer.plan.notes("--chunk-size {}", "a batch of {}"):
        print(f"note: {note}", file=sys.stderr)
    with trainer:
        trainer.fit(x_train, y_train, epochs=args.epochs,
                    validation_split=args.validation_split,
                    callbacks=[EpochSummary(args.epochs, args.quiet)])
    return trainer, time.perf_counter() - t0


def processes_used(trainer: Trainer) -> str:
    """'n_jobs=2: 1 process' for the result line: what was asked for and what computed."""
    n = trainer.plan.processes
    return f"n_jobs={trainer.n_jobs}: {n} process{'es' * (n > 1)}"


def fail(prog: str, exc: Exception) -> int:
    """Report a load or training error in one line; the exit status of a usage error."""
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return 2


def save_if_asked(model: Sequential, path: str | None) -> None:
    """Save the trained model where --save says, if it says."""
    if path:
        model.save(path)
        print(f"model saved to {path}")
