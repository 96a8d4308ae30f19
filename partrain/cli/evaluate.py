"""`partrain evaluate`: accuracy, per-class recall and the confusion matrix of a saved model
on the split it names, with the data pipeline the model was trained with."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ..io import read_npz
from ..model import Sequential, model_from_arrays
from ..trainer import validation_split_point
from .common import EXIT_FAILURE, UsageError, check_fit, load_data
from .outputs import check_outputs, write_or_rescue


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """counts[i, j] = examples of true class i predicted as j."""
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes ** 2).reshape(
        n_classes, n_classes)


def cmd_evaluate(args) -> int:
    if args.plot:
        from ..plots import require_matplotlib

        require_matplotlib()
        check_outputs([("--plot", args.plot, True, None)] + [
            ("--plot", str(Path(args.plot) / name), False, None)
            for name in ("recall.png", "confusion.png")])
    # a checkpoint holds a model too (with its optimizer state, ignored here)
    meta, arrays = read_npz(args.model_file, ("model", "checkpoint"))
    model = model_from_arrays(meta, arrays, args.model_file)
    args.dataset = args.dataset or model.metadata.get("dataset")
    if args.dataset is None:
        raise UsageError("--dataset is required: the model file does not name its dataset")
    if args.normalize is None:
        args.normalize = model.metadata.get("normalize", "scale")
    # only the split evaluated, unless standardising needs the training set's statistics
    # and the model does not carry them (files from before they were recorded)
    stats = model.metadata.get("normalization")
    stats = stats if isinstance(stats, dict) and stats.get("method") == args.normalize else None
    split = None if args.normalize.startswith("standardize") and stats is None else \
        "test" if args.split == "test" else "train"
    data = load_data(args, model, split=split, statistics=stats)
    check_fit(model, data, f"the model in {args.model_file}")
    X, y = evaluation_split(args, model, data)
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
        from ..plots import plot_confusion, plot_recall

        out = Path(args.plot)
        title = (f"{model.metadata.get('model') or Path(args.model_file).name} on {data.name}, "
                 f"{args.split} split: accuracy {acc:.4f}")
        written, status = [], 0
        for plot, values, name in ((plot_recall, recall, "recall.png"),
                                   (plot_confusion, cm, "confusion.png")):
            where, problem = write_or_rescue(
                f"plot {name}", out / name,
                lambda to, plot=plot, values=values: plot(values, names, to, title))
            written += [str(where)] if where else []
            if problem:
                print(f"partrain evaluate: failed: {problem}", file=sys.stderr)
                status = EXIT_FAILURE
        print(f"\nplots: {', '.join(written) or 'none written'}")
        return status
    return 0


def evaluation_split(args, model: Sequential, data) -> tuple[np.ndarray, np.ndarray]:
    """--split's examples: test; train = those trained on; validation = the held-out end of
    the training set (the model records its --validation-split)."""
    if args.split == "test":
        return data.x_test, data.y_test
    fraction = model.metadata.get("validation_split") or 0.0
    at = validation_split_point(len(data.x_train), fraction)
    if args.split == "train":
        return data.x_train[:at], data.y_train[:at]
    if not fraction:
        raise UsageError(f"--split validation: {args.model_file} was trained without a "
                         "validation split (--validation-split 0, or before partrain had one)")
    return data.x_train[at:], data.y_train[at:]
