"""What the commands share: usage errors and exit statuses, option defaults, loading the
dataset a command names, the reference network for it, the Dask scheduler address."""

from __future__ import annotations

import contextlib
import re
import signal
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .. import zoo
from ..data import DataWarning, load_dataset
from ..model import Sequential

EXIT_USAGE, EXIT_FAILURE = 2, 1
EXIT_CLOSED_PIPE = 128 + signal.SIGPIPE  # what a shell reports for a tool killed by SIGPIPE


class UsageError(Exception):
    """A bad option or combination: reported in one line, exit status 2."""


def given(value, default):
    """`value` unless the option was not given (None); 0 counts as given."""
    return default if value is None else value


def dataset_options(args, model: Sequential | None) -> dict:
    """Options of --dataset: those recorded with `model`, else what the model needs (synthetic
    data take the model's input shape and class count)."""
    meta = {} if model is None else model.metadata
    recorded = meta.get("dataset_options")
    if isinstance(recorded, dict) and meta.get("dataset") == dataset_name(args.dataset):
        return {k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()}
    if args.dataset == "synthetic" and model is not None:
        return {"shape": model.input_shape, "n_classes": model.n_classes}
    return {}


def load_data(args, model: Sequential | None, options: dict | None = None,
               split: str | None = None, statistics: dict | None = None):
    """The dataset named by --dataset, normalised by --normalize (with the standardize
    `statistics` if given), with `options`; only `split` ("train" or "test") if given. What
    the loader noticed goes to stderr as notes."""
    options = dataset_options(args, model) if options is None else options
    with warnings_as_notes(DataWarning):
        return load_dataset(args.dataset, args.data_dir, normalize=args.normalize, split=split,
                            statistics=statistics, **options)


def dataset_name(name: str) -> str:
    """--dataset as recorded: an npz path made absolute, so that evaluate finds it anywhere."""
    return "npz:" + str(Path(name[4:]).resolve()) if name.startswith("npz:") else name


def build_model(name: str, dataset, seed: int, dropout: float, batchnorm: bool) -> Sequential:
    """A zoo network for `dataset`; the MLP adapts to its image size and class count."""
    if name == "mlp":
        n_in = int(np.prod(dataset.input_shape))
        return zoo.mlp(dims=(n_in, 100, 100, dataset.n_classes), dropout=dropout,
                       batchnorm=batchnorm, input_shape=dataset.input_shape, seed=seed)
    if dropout or batchnorm:
        raise UsageError("--dropout and --batchnorm apply to --model mlp only")
    model = zoo.get(name, seed=seed)
    check_fit(model, dataset, f"--model {name}")
    return model


def check_fit(model: Sequential, dataset, what: str) -> None:
    if model.input_shape != dataset.input_shape or model.n_classes != dataset.n_classes:
        raise UsageError(
            f"{what} takes {'x'.join(map(str, model.input_shape))} inputs and "
            f"{model.n_classes} classes, but dataset {dataset.name!r} has "
            f"{'x'.join(map(str, dataset.input_shape))} images and {dataset.n_classes} classes"
        )


_ADDRESS = re.compile(r"(?:(?:tcp|tls|ws|wss|ucx)://)?(?:\[[0-9A-Fa-f:.]+\]|[\w.-]+):(\d{1,5})")


def scheduler_address(args) -> str | None:
    """--scheduler, checked against --backend and for the form of an address, so that a typo
    fails at once instead of inside Dask."""
    if args.scheduler is not None and args.backend != "dask":
        raise UsageError("--scheduler needs --backend dask")
    if args.scheduler is not None:
        match = _ADDRESS.fullmatch(args.scheduler)
        if match is None or not 0 < int(match[1]) < 65536:
            raise UsageError(f"--scheduler must be a Dask scheduler address such as "
                             f"tcp://HOST:8786, got {args.scheduler!r}")
        if "://" in args.scheduler and not args.scheduler.startswith("tcp://"):
            raise UsageError(f"--scheduler takes tcp:// addresses only, got {args.scheduler!r} "
                             "(TLS needs security settings: pass a distributed.Client to "
                             "Trainer(scheduler=...) in Python)")
    return args.scheduler


@contextlib.contextmanager
def warnings_as_notes(category: type[Warning]) -> Iterator[None]:
    """Within the block, every warning of `category` (all of them, even repeats) is printed
    on stderr as one `note: ...` line when the block ends; other warnings are shown as usual."""
    with warnings.catch_warnings(record=True) as noticed:
        warnings.simplefilter("always", category)
        yield
    for warning in noticed:
        if issubclass(warning.category, category):
            print(f"note: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename,
                                 warning.lineno)
