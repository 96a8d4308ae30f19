#!/usr/bin/env python3
"""Train the MLP of the assignment (784-100-100-10) on MNIST, in parallel.

The set-up: zoo.mlp(dims=(784, 100, 100, 10)) with optional dropout and batch normalisation,
Adam lr 1e-3, batch 64, inverse-time learning-rate decay lr / (1 + d * epoch). The assignment
expects more than 96% accuracy on both the training and the test set.

    python scripts/train_mlp.py --n-jobs 2
    python scripts/train_mlp.py --n-jobs 2 --dropout 0.2 --batchnorm

Batch normalisation uses per-chunk ("ghost batch") statistics, see the README.
"""

from __future__ import annotations

import argparse
import sys

from _tutorial_run import (
    LOAD_ERRORS,
    add_mnist_data_options,
    add_run_options,
    check_limit,
    fail,
    fit_timed,
    processes_used,
    save_if_asked,
    split_sizes,
)

from partrain import zoo
from partrain.data import load_dataset
from partrain.trainer import validation_split_point
from partrain.zoo import TRAINING_DEFAULTS

DEFAULTS = TRAINING_DEFAULTS["mlp"]  # batch 64, lr 1e-3, decay 0.01, 10 epochs
EXPECTED = 0.96  # the assignment: "> 96% for both test and train"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train zoo.mlp(dims=(784, 100, 100, 10)) on MNIST with Adam (lr "
        f"{DEFAULTS['lr']:g}, batch {DEFAULTS['batch_size']}, inverse-time decay); prints train "
        f"and test accuracy (the assignment expects > {EXPECTED:.0%} on both).")
    add_mnist_data_options(parser)
    add_run_options(parser, DEFAULTS, seed_help="seed of init, shuffling, dropout")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="dropout rate after each hidden layer (default 0: none)")
    parser.add_argument("--batchnorm", action="store_true",
                        help="batch normalisation before each hidden ReLU")
    parser.add_argument("--lr-decay", type=float, default=DEFAULTS["lr_decay"],
                        help=f"inverse-time decay d (default {DEFAULTS['lr_decay']:g})")
    args = parser.parse_args(argv)
    check_limit(parser, args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        data = load_dataset(args.dataset, args.data_dir)
        x_train, y_train = data.x_train[:args.limit], data.y_train[:args.limit]
        model = zoo.mlp(dims=(784, 100, 100, 10), dropout=args.dropout,
                        batchnorm=args.batchnorm, input_shape=(28, 28, 1), seed=args.seed)
        model.metadata.update(model="mlp", dataset=args.dataset, normalize="scale")
        print(f"mlp 784-100-100-10 (dropout {args.dropout:g}, batchnorm "
              f"{'on' if args.batchnorm else 'off'}) on {data.name}: "
              f"{split_sizes(len(x_train), args.validation_split)} / {len(data.x_test):,} test "
              f"images, n_jobs={args.n_jobs}, batch "
              f"{DEFAULTS['batch_size']}, Adam lr {DEFAULTS['lr']:g} / (1 + {args.lr_decay:g} "
              f"* epoch), {args.epochs} epochs")
        trainer, wall = fit_timed(model, x_train, y_train, args, DEFAULTS,
                                  lr_schedule=args.lr_decay)
    except LOAD_ERRORS as exc:
        return fail("train_mlp.py", exc)
    n_train = validation_split_point(len(x_train), args.validation_split)
    _, train_acc = model.evaluate(x_train[:n_train], y_train[:n_train])  # inference mode
    _, test_acc = model.evaluate(data.x_test, data.y_test)
    verdict = "both above" if min(train_acc, test_acc) > EXPECTED else "NOT both above"
    print(f"train accuracy {train_acc:.4f}  test accuracy {test_acc:.4f}  wall time {wall:.1f} s "
          f"({processes_used(trainer)}); {verdict} the assignment's {EXPECTED:.0%}")
    save_if_asked(model, args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
