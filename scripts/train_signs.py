#!/usr/bin/env python3
"""Train the SIGNS tutorial network (zoo.signs_cnn) on SIGNS files, in parallel.

The set-up of the tutorial: Conv 3x3/10 stride 2 pad 2 -> ReLU -> MaxPool 2 stride 1 -> Dense 6,
Adam lr 1e-3, batch 64, pixels / 255. Files are the course's `train_signs.h5` / `test_signs.h5`
(or `.npz` with arrays x, y, classes), read by `partrain.data.load_signs_file`.

    python scripts/train_signs.py --train data/signs/train_signs.h5 \\
        --test data/signs/test_signs.h5 --n-jobs 2

With only `--test` (e.g. the 120 images of a shared folder), the network is trained and reported
on that one file: a check that it can fit real images, not a measure of generalisation. The
per-epoch validation uses the last --validation-split of the training images, never the test
file; the test file is evaluated once, at the end.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from _tutorial_run import (
    LOAD_ERRORS,
    add_run_options,
    check_limit,
    fail,
    fit_timed,
    processes_used,
    save_if_asked,
)

from partrain import zoo
from partrain.data import load_signs_file
from partrain.trainer import validation_split_point
from partrain.zoo import TRAINING_DEFAULTS

DEFAULTS = TRAINING_DEFAULTS["signs-cnn"]  # epochs 20, batch 64, lr 1e-3: the tutorial's


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train zoo.signs_cnn (the SIGNS tutorial set-up: Adam lr "
        f"{DEFAULTS['lr']:g}, batch {DEFAULTS['batch_size']}) on SIGNS .h5/.npz files.")
    parser.add_argument("--train", metavar="FILE", help="training file (train_signs.h5 or .npz)")
    parser.add_argument("--test", metavar="FILE", help="test file (test_signs.h5 or .npz); "
                        "given alone, training and reporting both use it")
    add_run_options(parser, DEFAULTS, seed_help="seed of init and shuffling")
    args = parser.parse_args(argv)
    check_limit(parser, args)
    if not (args.train or args.test):
        parser.error("give --train FILE and --test FILE (or at least one of them)")
    return args


def load(path: str):
    """Images scaled to [0, 1] as float32, labels, class names."""
    x, y, names = load_signs_file(path)
    return x.astype(np.float32) / np.float32(255), y, names


def main(argv=None) -> int:
    args = parse_args(argv)
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
        trainer, wall = fit_timed(model, x_train, y_train, args, DEFAULTS)
    except LOAD_ERRORS as exc:
        return fail("train_signs.py", exc)
    n_train = validation_split_point(len(x_train), args.validation_split)
    _, train_acc = model.evaluate(x_train[:n_train], y_train[:n_train])  # the images trained on
    _, test_acc = model.evaluate(x_test, y_test)
    print(f"train accuracy {train_acc:.4f}  test accuracy {test_acc:.4f}  "
          f"wall time {wall:.1f} s ({processes_used(trainer)})")
    save_if_asked(model, args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
