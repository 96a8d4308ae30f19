"""An independent reference trainer, written from docs/design.md ("Training semantics") alone.

Nothing here calls `Trainer`, the engines (`partrain.parallel`, `partrain.dask_engine`) or
`partrain.optim`: the epoch order, the batches, the chunks and their random keys, the ordered
sum of chunk gradients, the mean over the real batch, Adam / SGD and the batch-norm fold are all
written out below. The only partrain code used is the model itself (`model.loss_and_grad`, the
pure function of one chunk, and `model.buffer_layout` to find each batch-norm layer's buffers)
and `partrain.Context`. `tests/training/test_reference.py` checks `Trainer.fit` against it bit
for bit.

Also: identity layers that record what the trainer feeds a model (for the direct tests of the
properties), registered so that worker processes could rebuild them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from partrain import Context
from partrain.layers import BatchNorm, Layer, register_layer

SHUFFLE_STREAM, STEP_STREAM = 0, 1  # the documented first element of every random key


# ----------------------------------------------------------------------------- the semantics


def epoch_order(seed: int, epoch: int, n: int, shuffle: bool = True) -> np.ndarray:
    """The order in which epoch `epoch` visits the n examples."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, SHUFFLE_STREAM, epoch]).permutation(n)


def batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Consecutive slices of `batch_size` positions of the order; the last may be shorter."""
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def chunks(batch: np.ndarray, chunk_size: int) -> list[np.ndarray]:
    """The batch cut at positions 0, C, 2C, ...; the last chunk may be shorter."""
    return [batch[start:start + chunk_size] for start in range(0, len(batch), chunk_size)]


def chunk_context(seed: int, epoch: int, step: int, chunk: int) -> Context:
    """Every random draw of chunk `chunk` of step `step` of epoch `epoch` comes from this."""
    return Context(training=True, key=(seed, STEP_STREAM, epoch, step, chunk))


def flush_subnormals(values: np.ndarray) -> np.ndarray:
    """Every 16th step, the optimizer state's values of magnitude below the dtype's smallest
    normal number (subnormals) become 0."""
    return np.where(np.abs(values) < np.finfo(values.dtype).tiny, 0, values).astype(values.dtype)


class HandAdam:
    """Kingma & Ba, Algorithm 1, with bias correction and eps added to sqrt(v_hat).

    The bias corrections are applied as scalar factors (computed in float64, rounded to the
    parameters' dtype when they meet an array): sqrt(v_hat) = sqrt(v) * (1 / sqrt(1 - b2^t))
    and the step is (m / (sqrt(v_hat) + eps)) * (lr / (1 - b1^t)) = lr m_hat / (sqrt(v_hat) + eps).
    """

    def __init__(self, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.t, self.m, self.v = 0, None, None

    def step(self, params: np.ndarray, g: np.ndarray, lr: float) -> np.ndarray:
        if self.m is None:
            self.m, self.v = np.zeros_like(params), np.zeros_like(params)
        self.t += 1
        b1, b2, t = self.beta1, self.beta2, self.t
        self.m = b1 * self.m + (1 - b1) * g
        self.v = b2 * self.v + (1 - b2) * g**2
        sqrt_v_hat = np.sqrt(self.v) * (1 / math.sqrt(1 - b2**t))
        params = params - (self.m / (sqrt_v_hat + self.eps)) * (lr / (1 - b1**t))
        if t % 16 == 0:
            self.m, self.v = flush_subnormals(self.m), flush_subnormals(self.v)
        return params

    def state(self) -> dict:
        return {"step": self.t, "m": self.m, "v": self.v}


class HandSGD:
    """Heavy-ball momentum: velocity = momentum velocity + g; params -= lr velocity."""

    def __init__(self, lr: float, momentum: float = 0.0):
        self.lr, self.momentum = lr, momentum
        self.t, self.velocity = 0, None

    def step(self, params: np.ndarray, g: np.ndarray, lr: float) -> np.ndarray:
        if self.velocity is None:
            self.velocity = np.zeros_like(params)
        self.t += 1
        self.velocity = self.momentum * self.velocity + g
        params = params - lr * self.velocity
        if self.t % 16 == 0:
            self.velocity = flush_subnormals(self.velocity)
        return params

    def state(self) -> dict:
        if not self.momentum:  # plain SGD keeps no velocity
            return {"step": self.t}
        return {"step": self.t, "velocity": self.velocity}


@dataclass
class ReferenceRun:
    """The state a reference run leaves behind."""

    params: np.ndarray
    buffers: np.ndarray
    optimizer: HandAdam | HandSGD
    history: dict = field(default_factory=lambda: {"loss": [], "accuracy": [], "lr": []})


def tree_sum(grads: list) -> np.ndarray:
    """T(0, W) of the README: pairwise over aligned power-of-two blocks of chunk indices."""
    def node(first: int, width: int):
        if width == 1:
            return grads[first]
        half = width // 2
        if first + half >= len(grads):
            return node(first, half)
        return node(first, half) + node(first + half, half)

    width = 1
    while width < len(grads):
        width *= 2
    return node(0, width)


def fold_batch_norm(model, buffers: np.ndarray, batch_stats: np.ndarray) -> np.ndarray:
    """running = momentum * running + (1 - momentum) * batch statistic, per BatchNorm layer."""
    buffers = buffers.copy()
    layers = dict(zip(model.names, model.layers))
    for row in model.buffer_layout:  # rows like ("bn1.running_mean", start, stop, shape)
        layer = layers[row.name.split(".")[0]]
        assert isinstance(layer, BatchNorm)
        window = slice(row.start, row.stop)
        buffers[window] = layer.momentum * buffers[window] + \
            (1 - layer.momentum) * batch_stats[window]
    return buffers


def reference_fit(model, X, y, *, epochs: int, batch_size: int, chunk_size: int, seed: int,
                  optimizer: HandAdam | HandSGD, lr_decay: float = 0.0, shuffle: bool = True,
                  run: ReferenceRun | None = None) -> ReferenceRun:
    """Train `epochs` epochs from `model`'s initial values (or continue `run`)."""
    if run is None:
        run = ReferenceRun(model.params.copy(), model.buffers.copy(), optimizer)
    dtype = model.params.dtype.type
    n = len(X)
    for epoch in range(len(run.history["loss"]), len(run.history["loss"]) + epochs):
        lr = optimizer.lr / (1 + lr_decay * epoch)
        loss, correct = 0.0, 0
        for step, batch in enumerate(batches(epoch_order(seed, epoch, n, shuffle), batch_size)):
            grads, stats = [], []
            for k, idx in enumerate(chunks(batch, chunk_size)):
                result = model.loss_and_grad(run.params, X[idx], y[idx],
                                             chunk_context(seed, epoch, step, k))
                grads.append(result.grad)
                stats.append((len(idx), result.stats))
                loss += result.loss
                correct += result.n_correct
            g = tree_sum(grads)
            g = g * dtype(1 / len(batch))  # the mean over THIS batch's examples
            run.params = optimizer.step(run.params, g, lr)
            if run.buffers.size:
                batch_stats = 0
                for n_k, s_k in stats:  # chunk statistics weighted by chunk length
                    batch_stats = batch_stats + (dtype(n_k) / dtype(len(batch))) * s_k
                run.buffers = fold_batch_norm(model, run.buffers, batch_stats)
        run.history["loss"].append(loss / n)
        run.history["accuracy"].append(correct / n)
        run.history["lr"].append(lr)
    return run


# ----------------------------------------------------------------------------- probes


RECORDS: list = []  # (layer name, ctx.key, copy of the input); only in the process computing


@register_layer
class Record(Layer):
    """Identity that appends (its tag, the pass's key, a copy of its input) to RECORDS."""

    short_name = "record"

    def __init__(self, tag: str):
        self.tag = str(tag)

    def forward(self, p, x, ctx, index):
        if ctx.training:
            RECORDS.append((self.tag, ctx.key, x.copy()))
        return x, None

    def config(self):
        return {"tag": self.tag}
