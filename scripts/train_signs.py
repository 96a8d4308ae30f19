#!/usr/bin/env python3
"""Train the SIGNS tutorial network (zoo.signs_cnn) on SIGNS files, in parallel.

The set-up of the tutorial: Conv 3x3/10 stride 2 pad 2 -> ReLU -> MaxPool 2 stride 1 -> Dense 6,
Adam lr 1e-3, batch 64, pixels / 255. Files are the course's `train_signs.h5` / `test_signs.h5`
(or `.npz` with arrays x, y, classes), read by `partrain.data.load_signs_file`.

    python scripts/train_signs.py --train data/signs/train_signs.h5 \\
        --test data/signs/test_signs.h5 --n-jobs 2

With only `--test` (e.g. the 120 images of a shared folder), the network is trained and reported
on that one file: a check that it can fit real images, not a measure of generalisation.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from partrain import Trainer, optim, zoo
from partrain.cli import MODEL_DEFAULTS, EpochSummary
from partrain.data import load_signs_file

DEFAULTS = MODEL_DEFAULTS["signs-cnn"]  # epochs 20, batch 64, lr 1e-3: the tutorial's


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train zoo.signs_cnn (the SIGNS tutorial set-up: Adam lr "
        f"{DEFAULTS['lr']:g}, batch {DEFAULTS['batch_size']}) on SIGNS .h5/.npz files.")
    parser.add_argument("--train", metavar="FILE", help="training file (train_signs.h5 or .npz)")
    parser.add_argument("--test", metavar="FILE", help="test file (test_signs.h5 or .npz); "
                        "given alone, training and reporting both use it")
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"],
                        help=f"epochs (default {DEFAULTS['epochs']})")
    parser.add_argument("--n-jobs", type=int, default=1,
                        help="worker processes, -1 = all cores (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of init and shuffling")
    parser.add_argument("--save", metavar="MODEL.npz", help="save the trained model here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
    args = parser.parse_args(argv)
    if not (args.train or args.test):
        parser.error("give --train FILE and --test FILE (or at least one of them)")
    return args


def load(path: str):
    """Images scaled to [0, 1] as float32, labels, class names."""
    x, y, names = load_signs_file(path)
    return x.astype(np.float32) / np.float32(255), y, names


def main(argv=None) -> int:
    args = parse_args(argv)
    prog = "train_signs.py"
    try:
        if args.train and args.test:
            x_train, y_train, names = load(args.train)
            x_test, y_test, test_names = load(args.test)
            if names != test_names:
                raise ValueError(f"{args.train} has classes {names}, {args.test} has {test_names}")
        else:
            only = args.train or args.test
            print(f"NOTE: only {'--train' if args.train else '--test'} was given: training and "
                  f"reporting on the same file {only} (a check that the network fits real "
                  "images, not a measure of generalisation).")
            x_train, y_train, names = load(only)
            x_test, y_test = x_train, y_train
        model = zoo.signs_cnn(seed=args.seed)
        model.metadata.update(model="signs-cnn", dataset="signs", normalize="scale")
        print(f"signs_cnn on {len(x_train)} training / {len(x_test)} test images "
              f"({len(names)} classes), n_jobs={args.n_jobs}, batch {DEFAULTS['batch_size']}, "
              f"Adam lr {DEFAULTS['lr']:g}, {args.epochs} epochs")
        t0 = time.perf_counter()
        with Trainer(model, optim.Adam(DEFAULTS["lr"]), n_jobs=args.n_jobs,
                     batch_size=DEFAULTS["batch_size"], seed=args.seed,
                     progress=not args.quiet) as trainer:
            trainer.fit(x_train, y_train, epochs=args.epochs,
                        validation_data=(x_test, y_test),
                        callbacks=[EpochSummary(args.epochs, args.quiet)])
        wall = time.perf_counter() - t0
    except (OSError, ValueError, ImportError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    _, train_acc = model.evaluate(x_train, y_train)
    _, test_acc = model.evaluate(x_test, y_test)
    print(f"train accuracy {train_acc:.4f}  test accuracy {test_acc:.4f}  "
          f"wall time {wall:.1f} s (n_jobs={trainer.n_jobs})")
    if args.save:
        model.save(args.save)
        print(f"model saved to {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
