"""Training runs the trainer and callback tests compare: named configurations, a run's
final state, and the undisturbed n_jobs=1 reference of each (cached)."""

import functools
import os
from typing import NamedTuple

import numpy as np
from conftest import make_data
from faulty_layers import shm_segments

from partrain import Trainer, zoo

CONFIGS = {  # model, examples, batch size, chunk size (None: the default)
    "cnn": (zoo.digits_cnn, 160, 64, 16),
    "mlp": (lambda: zoo.mlp(dims=(64, 32, 10)), 160, 32, 8),
    "mlp_dropout": (lambda: zoo.mlp(dims=(64, 32, 10), dropout=0.3), 160, 32, 8),
    "ragged": (lambda: zoo.mlp(dims=(64, 32, 10), dropout=0.3), 230, 50, 8),
    "batchnorm": (lambda: zoo.mlp(dims=(64, 32, 10), batchnorm=True, dropout=0.2), 160, 40, 10),
}


def setup(config, seed=0):
    """(model, X, y, validation pair, trainer kwargs) of a named configuration."""
    make_model, n, batch_size, chunk_size = CONFIGS[config]
    model = make_model()
    X, y = make_data(model, n, seed=1)
    kwargs = {"batch_size": batch_size, "chunk_size": chunk_size, "seed": seed,
              "progress": False}
    return model, X, y, make_data(model, 40, seed=2), kwargs


class Result(NamedTuple):
    """What a training run leaves behind."""

    params: np.ndarray
    buffers: np.ndarray
    history: dict
    n_workers: int


def train(config, n_jobs=1, epochs=2, seed=0, callbacks=(), **options) -> Result:
    """Train a fresh model of `config` with validation data; return its final state."""
    model, X, y, validation, kwargs = setup(config, seed)
    initial = model.params.copy()
    segments = shm_segments(os.getpid())
    with Trainer(model, n_jobs=n_jobs, **kwargs, **options) as trainer:
        trainer.fit(X, y, epochs=epochs, validation_data=validation, callbacks=callbacks)
        n_workers = len(trainer.engine.worker_pids())
        in_training = model.params.copy()
    assert trainer.model is model
    assert shm_segments(os.getpid()) <= segments
    np.testing.assert_array_equal(model.params, in_training)  # close() keeps the values
    assert not np.array_equal(model.params, initial)
    return Result(model.params.copy(), model.buffers.copy(), trainer.history.history, n_workers)


@functools.cache
def reference(config, epochs=2) -> Result:
    """The undisturbed n_jobs=1 run of `config` (cached: tests must not modify it)."""
    return train(config, n_jobs=1, epochs=epochs)


def assert_same_run(got: Result, expected: Result):
    """Bit-identical parameters, buffers and per-epoch metrics."""
    np.testing.assert_array_equal(got.params, expected.params)
    np.testing.assert_array_equal(got.buffers, expected.buffers)
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr"):
        assert got.history[key] == expected.history[key], key
