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
import time

from partrain import Trainer, optim, zoo
from partrain.cli import MODEL_DEFAULTS, EpochSummary
from partrain.data import load_dataset

DEFAULTS = MODEL_DEFAULTS["mnist-cnn"]  # 2 epochs, batch 32, lr 1e-3: the tutorial's
TUTORIAL = ("the tutorial reports about 98% test accuracy after 2 epochs, and about 5 hours "
            "of training on a laptop")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train zoo.mnist_cnn with the MNIST tutorial set-up (Adam lr "
        f"{DEFAULTS['lr']:g}, batch {DEFAULTS['batch_size']}, {DEFAULTS['epochs']} epochs); "
        f"{TUTORIAL}.")
    parser.add_argument("--data-dir", default="data",
                        help="folder holding mnist/*-ubyte.gz (default data/)")
    parser.add_argument("--dataset", default="mnist",
                        help="mnist (default), fashion-mnist or npz:PATH: any 28x28x1, "
                        "10-class dataset partrain.data.load_dataset reads")
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"],
                        help=f"epochs (default {DEFAULTS['epochs']})")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="train on the first N training images only (a quick run)")
    parser.add_argument("--n-jobs", type=int, default=1,
                        help="worker processes, -1 = all cores (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of init and shuffling")
    parser.add_argument("--save", metavar="MODEL.npz", help="save the trained model here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
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
        t0 = time.perf_counter()
        with Trainer(model, optim.Adam(DEFAULTS["lr"]), n_jobs=args.n_jobs,
                     batch_size=DEFAULTS["batch_size"], seed=args.seed,
                     progress=not args.quiet) as trainer:
            trainer.fit(x_train, y_train, epochs=args.epochs,
                        callbacks=[EpochSummary(args.epochs, args.quiet)])
        wall = time.perf_counter() - t0
    except (OSError, ValueError, ImportError) as exc:
        print(f"train_mnist.py: error: {exc}", file=sys.stderr)
        return 2
    _, test_acc = model.evaluate(data.x_test, data.y_test)
    print(f"test accuracy {test_acc:.4f}  wall time {wall:.1f} s (n_jobs={trainer.n_jobs})")
    print(f"This run trained on {len(x_train):,} images of {data.name}; for reference, on "
          f"MNIST's 60,000 training images {TUTORIAL}.")
    if args.save:
        model.save(args.save)
        print(f"model saved to {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
