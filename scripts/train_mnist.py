#!/usr/bin/env python3
"""Train the MNIST tutorial network (zoo.mnist_cnn) in parallel and report accuracy and time.

The set-up of the tutorial: Conv 5x5/8 -> ReLU -> Conv 5x5/8 -> ReLU -> MaxPool 2 -> Dense 128
-> ReLU -> Dense 10, Adam lr 1e-3, batch 32, 2 epochs over the 60,000 training images. The
tutorial's single-process NumPy code reports about 98% test accuracy after 2 epochs and about
5 hours of training on a laptop.

    python scripts/train_mnist.py --n-jobs 2                 # the full run
    python scripts/train_mnist.py --n-jobs 2 --limit 5000    # a quick one

The four MNIST files are read from DATA_DIR/mnist/ (or DATA_DIR/) and downloaded there if
missing, as `partrain.data.load_dataset("mnist", DATA_DIR)` does.
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
    save_if_asked,
)

from partrain import zoo
from partrain.cli import MODEL_DEFAULTS
from partrain.data import load_dataset

DEFAULTS = MODEL_DEFAULTS["mnist-cnn"]  # 2 epochs, batch 32, lr 1e-3: the tutorial's
TUTORIAL = ("the tutorial reports about 98% test accuracy after 2 epochs, and about 5 hours "
            "of training on a laptop")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train zoo.mnist_cnn with the MNIST tutorial set-up (Adam lr "
        f"{DEFAULTS['lr']:g}, batch {DEFAULTS['batch_size']}, {DEFAULTS['epochs']} epochs); "
        f"{TUTORIAL}.")
    add_mnist_data_options(parser)
    add_run_options(parser, DEFAULTS, seed_help="seed of init and shuffling")
    args = parser.parse_args(argv)
    check_limit(parser, args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        data = load_dataset(args.dataset, args.data_dir)
        x_train, y_train = data.x_train[:args.limit], data.y_train[:args.limit]
        model = zoo.mnist_cnn(seed=args.seed)
        model.metadata.update(model="mnist-cnn", dataset=args.dataset, normalize="scale")
        print(f"mnist_cnn on {data.name}: {len(x_train):,} training / {len(data.x_test):,} test "
              f"images, n_jobs={args.n_jobs}, batch {DEFAULTS['batch_size']}, Adam lr "
              f"{DEFAULTS['lr']:g}, {args.epochs} epochs")
        trainer, wall = fit_timed(model, x_train, y_train, args, DEFAULTS)
    except LOAD_ERRORS as exc:
        return fail("train_mnist.py", exc)
    _, test_acc = model.evaluate(data.x_test, data.y_test)
    print(f"test accuracy {test_acc:.4f}  wall time {wall:.1f} s (n_jobs={trainer.n_jobs})")
    print(f"This run trained on {len(x_train):,} images of {data.name}; for reference, on "
          f"MNIST's 60,000 training images {TUTORIAL}.")
    save_if_asked(model, args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
