#!/usr/bin/env python3
"""Train the MNIST tutorial network (zoo.mnist_cnn) in parallel and report accuracy and time.

The network of the NumPy CNN tutorial (seed 003): Conv 5x5/8 -> ReLU -> Conv 5x5/8 -> ReLU ->
MaxPool 2 -> Dense 128 -> ReLU -> Dense 10, batch 32, 2 epochs. The tutorial reports about 98%
test accuracy after 2 epochs and about 5 hours of training on a laptop. Two set-ups:

``--setup partrain`` (default)
    partrain's: Adam lr 1e-3 (0.9, 0.999, eps 1e-8 added to sqrt(v_hat), bias-corrected), He
    initialisation, pixels / 255, the 60,000 training images less the validation hold-out.
``--setup article``
    the tutorial's, as its code runs: Adam lr 0.01, beta1 0.95, beta2 0.99 without bias
    correction, eps 1e-7 inside the square root, and m and v started from 0 at every batch (its
    adamGD re-creates them per call); inputs minus int(mean), divided by int(std); filters
    normal with std 1/sqrt(filter-bank size), dense weights normal x 0.01; trained on the first
    50,000 training images (the other 10,000 validate). ``--adam article-persistent`` keeps m
    and v across steps instead, as the article's formulas read.

``--adam``, ``--init``, ``--normalize``, ``--lr``, ``--betas`` change one part of a set-up
(docs/results.md lists what each part costs).

    python scripts/train_mnist.py --n-jobs 2                    # the full run
    python scripts/train_mnist.py --n-jobs 2 --setup article    # the tutorial's set-up
    python scripts/train_mnist.py --n-jobs 2 --limit 5000       # a quick one

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
    processes_used,
    save_if_asked,
    split_sizes,
)

from partrain import Sequential, optim, zoo
from partrain.data import load_dataset
from partrain.zoo import TRAINING_DEFAULTS

DEFAULTS = TRAINING_DEFAULTS["mnist-cnn"]  # 2 epochs, batch 32, lr 1e-3: the tutorial's
TUTORIAL = ("the tutorial reports about 98% test accuracy after 2 epochs, and about 5 hours "
            "of training on a laptop")
# What each set-up chooses; --adam/--init/--normalize/--lr/--betas override one part.
SETUPS = {
    "partrain": {"adam": "standard", "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8,
                 "init": "he", "normalize": "scale", "validation_split": 0.1},
    "article": {"adam": "article", "lr": 0.01, "betas": (0.95, 0.99), "eps": 1e-7,
                "init": "article", "normalize": "standardize-int",
                "validation_split": 1 / 6},  # of 60,000: trains on the first 50,000
}
ADAMS = {
    "standard": {},
    "article": {"bias_correction": False, "eps_inside_sqrt": True, "keep_moments": False},
    "article-persistent": {"bias_correction": False, "eps_inside_sqrt": True},
}
INITS = {"he": {}, "article": {"conv_init": "array", "dense_init": "small"}}


def build(setup: dict, seed: int) -> tuple[Sequential, optim.Adam]:
    """The network and optimizer of a resolved set-up (SETUPS entry with overrides)."""
    model = zoo.mnist_cnn(seed=seed, **INITS[setup["init"]])
    b1, b2 = setup["betas"]
    return model, optim.Adam(setup["lr"], b1, b2, setup["eps"], **ADAMS[setup["adam"]])


def describe(setup: dict) -> str:
    """One line naming every part of a set-up."""
    b1, b2 = setup["betas"]
    adam = {"standard": "bias-corrected, eps outside sqrt",
            "article": "no bias correction, eps inside sqrt, m and v restarted every batch",
            "article-persistent": "no bias correction, eps inside sqrt"}[setup["adam"]]
    return (f"Adam lr {setup['lr']:g} betas ({b1:g}, {b2:g}) eps {setup['eps']:g} ({adam}), "
            f"init {setup['init']}, normalize {setup['normalize']}")


def _betas(text: str) -> tuple[float, float]:
    try:
        b1, b2 = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BETA1,BETA2, got {text!r}") from None
    return b1, b2


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train zoo.mnist_cnn (batch 32, 2 epochs) with partrain's set-up (Adam lr "
        f"{DEFAULTS['lr']:g}) or the tutorial's own (--setup article); {TUTORIAL}.")
    add_mnist_data_options(parser)
    add_run_options(parser, DEFAULTS, seed_help="seed of init and shuffling")
    parser.add_argument("--setup", choices=sorted(SETUPS), default="partrain",
                        help="partrain's set-up (default) or the tutorial's as written")
    parser.add_argument("--adam", choices=sorted(ADAMS), default=None,
                        help="standard: bias-corrected, eps added to sqrt(v_hat); article: "
                        "no bias correction, eps inside the sqrt, m and v restarted at every "
                        "batch (the tutorial's code); article-persistent: the same keeping m "
                        "and v")
    parser.add_argument("--init", choices=sorted(INITS), default=None,
                        help="he; article: filters std 1/sqrt(size), dense weights x 0.01")
    parser.add_argument("--normalize", choices=["scale", "standardize", "standardize-int"],
                        default=None, help="pixels / 255, or minus mean over std")
    parser.add_argument("--lr", type=float, default=None, help="Adam's learning rate")
    parser.add_argument("--betas", type=_betas, default=None, metavar="B1,B2",
                        help="Adam's beta1,beta2")
    parser.set_defaults(validation_split=None)  # the set-up's, unless given
    args = parser.parse_args(argv)
    args.resolved = dict(SETUPS[args.setup])
    for part in ("adam", "init", "normalize", "lr", "betas", "validation_split"):
        if getattr(args, part) is not None:
            args.resolved[part] = getattr(args, part)
    args.validation_split = args.resolved["validation_split"]
    check_limit(parser, args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    setup = args.resolved
    try:
        data = load_dataset(args.dataset, args.data_dir, normalize=setup["normalize"])
        x_train, y_train = data.x_train[:args.limit], data.y_train[:args.limit]
        model, optimizer = build(setup, args.seed)
        model.metadata.update(model="mnist-cnn", dataset=args.dataset,
                              normalize=setup["normalize"])
        if data.normalization is not None:
            model.metadata["normalization"] = data.normalization
        print(f"mnist_cnn on {data.name} ({args.setup} set-up: {describe(setup)}): "
              f"{split_sizes(len(x_train), args.validation_split)} / {len(data.x_test):,} "
              f"test images, n_jobs={args.n_jobs}, batch {DEFAULTS['batch_size']}, "
              f"{args.epochs} epochs")
        trainer, wall = fit_timed(model, x_train, y_train, args, DEFAULTS, optimizer=optimizer)
    except LOAD_ERRORS as exc:
        return fail("train_mnist.py", exc)
    _, test_acc = model.evaluate(data.x_test, data.y_test)
    print(f"test accuracy {test_acc:.4f}  wall time {wall:.1f} s ({processes_used(trainer)})")
    print(f"This run trained on {split_sizes(len(x_train), args.validation_split)} images of "
          f"{data.name}; for reference, on MNIST's training images {TUTORIAL}.")
    save_if_asked(model, args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
