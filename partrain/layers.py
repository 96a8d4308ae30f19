"""Layers: small specs (parameter shapes, init) whose forward/backward call `functional`.

A layer holds configuration only. Its parameters live in the model's flat vector and come in
as a dict of views (`p["W"]`); gradients go out by writing into views of the flat gradient
(`g["W"]`). Forward returns `(output, cache)` and backward takes that cache back, so a layer
never keeps per-call state and one instance serves any number of concurrent evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import functional as F
from .checks import positive_int


@dataclass(frozen=True)
class ParamSpec:
    """One named array of a layer: its shape and how to initialise it."""

    name: str
    shape: tuple[int, ...]
    init: str  # one of WEIGHT_INITS, "zeros" or "ones"
    fan_in: int = 0


# How Conv2D and Dense may draw their weights W (biases start at 0), all normal with mean 0:
WEIGHT_INITS = {
    "he": "std sqrt(2 / fan_in), He et al. 2015 (the default)",
    "lecun": "std sqrt(1 / fan_in), LeCun et al. 1998",
    "array": "std 1 / sqrt(W.size), the NumPy CNN tutorial's initializeFilter",
    "small": "std 0.01, the NumPy CNN tutorial's initializeWeight",
}


@dataclass(frozen=True)
class Context:
    """How a pass runs: `training` switches dropout and batch statistics on; `key` seeds it.

    Every random draw is made from `key` plus the layer's index, never from global state, so a
    caller decides exactly what randomness depends on, e.g. (seed, epoch, step, chunk).
    """

    training: bool = True
    key: tuple[int, ...] = ()

    def rng(self, stream: int) -> np.random.Generator:
        """A generator that depends only on (key, stream)."""
        return np.random.default_rng(np.random.SeedSequence(list(self.key) + [stream]))


INFERENCE = Context(training=False)


def _weight_init(init: Any) -> str:
    if init not in WEIGHT_INITS:
        raise ValueError(f"Invalid init: {init!r}, expected one of {sorted(WEIGHT_INITS)}.")
    return init


def _init_config(init: str) -> dict:
    """A weight init as config: nothing for the default, so older model files read the same."""
    return {} if init == "he" else {"init": init}


class Layer:
    """Base class: a parameter-free identity. Subclasses override what they need."""

    short_name = "layer"  # prefix of the layer's name in a model: conv1, dense2, ...

    def build(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Check the per-example input shape, remember it, return the output shape."""
        self.input_shape = tuple(input_shape)
        return self.input_shape

    def param_specs(self) -> tuple[ParamSpec, ...]:
        return ()

    def buffer_specs(self) -> tuple[ParamSpec, ...]:
        """Non-trainable arrays (batch-norm running statistics)."""
        return ()

    def forward(self, p: dict, x: np.ndarray, ctx: Context, index: int) -> tuple[np.ndarray, Any]:
        return x, None

    def backward(self, p: dict, cache: Any, dy: np.ndarray, g: dict, need_dx: bool):
        """Write parameter gradients into the views `g`; return dL/dx if `need_dx`."""
        return dy

    def config(self) -> dict:
        """JSON-ready constructor arguments; `type(self)(**config)` rebuilds the layer."""
        return {}

    def activation_pattern(self, cache: Any) -> np.ndarray | None:
        """The discrete choices a forward pass made, per example (leading axis m): which
        units a ReLU let through, which input each max-pool window took. None for a layer
        that is smooth in its input and parameters. `gradcheck` compares these between its
        +eps and -eps evaluations to tell a kink from a wrong gradient; a custom layer with
        a kink (a branch on its input) should return its branch choices here."""
        return None

    def forward_flops(self) -> int:
        """Multiply-add FLOPs of one example's forward pass (matmuls only)."""
        return 0

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class Conv2D(Layer):
    """2-D convolution of NHWC input, square kernel, zero padding. See: torch.nn.Conv2d."""

    short_name = "conv"

    def __init__(self, filters: int, kernel_size: int, stride: int = 1, pad: int = 0,
                 init: str = "he"):
        self.filters = positive_int("filters", filters)
        self.kernel_size = positive_int("kernel_size", kernel_size)
        self.stride = positive_int("stride", stride)
        self.pad = positive_int("pad", pad, minimum=0)
        self.init = _weight_init(init)  # how W is drawn: one of WEIGHT_INITS

    def build(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"Conv2D expects (H, W, C) inputs, got shape {tuple(input_shape)}.")
        self.input_shape = tuple(input_shape)
        f = self.kernel_size
        self.output_shape = F.conv_output_shape(input_shape, f, self.stride, self.pad,
                                                self.filters)
        return self.output_shape

    def forward_flops(self):
        n_H, n_W, n_C = self.output_shape
        return 2 * n_H * n_W * n_C * self.kernel_size ** 2 * self.input_shape[2]

    def param_specs(self):
        f, c_in = self.kernel_size, self.input_shape[2]
        # He et al. 2015 (the default): std sqrt(2 / fan_in) keeps activations' variance
        # through ReLUs.
        return (
            ParamSpec("W", (f, f, c_in, self.filters), self.init, fan_in=f * f * c_in),
            ParamSpec("b", (1, 1, 1, self.filters), "zeros"),
        )

    def forward(self, p, x, ctx, index):
        Z, cols = F.conv_forward_cols(x, p["W"], p["b"], self.stride, self.pad)
        # Stride 1: the weight gradient works from x row by row (conv_weight_grad_rows), so
        # the im2col matrix (f x bigger than x) is dropped here rather than kept for backward.
        return Z, (x, None if self.stride == 1 else cols)

    def backward(self, p, cache, dy, g, need_dx):
        x, cols = cache
        if cols is None:
            dW, db = F.conv_weight_grad_rows(dy, x, p["W"].shape, self.pad)
        else:
            dW, db = F.conv_weight_grad(dy, cols, p["W"].shape, self.stride)
        g["W"][...] = dW
        g["b"][...] = db
        if need_dx:
            return F.conv_input_grad(dy, p["W"], x.shape, self.stride, self.pad)
        return None

    def config(self):
        return {"filters": self.filters, "kernel_size": self.kernel_size,
                "stride": self.stride, "pad": self.pad, **_init_config(self.init)}

    def __repr__(self):
        c_in = getattr(self, "input_shape", (None,) * 3)[2]
        c_in = "?" if c_in is None else c_in
        return (f"Conv2D({c_in}→{self.filters}, k{self.kernel_size}, "
                f"s{self.stride}, p{self.pad})")


class ReLU(Layer):
    """max(x, 0). See: torch.nn.ReLU."""

    short_name = "relu"

    def forward(self, p, x, ctx, index):
        y = F.relu(x)
        return y, y  # y > 0 exactly where x > 0: the output is the mask backward needs

    def backward(self, p, cache, dy, g, need_dx):
        return F.relu_backward(dy, cache) if need_dx else None

    def activation_pattern(self, cache):
        return cache > 0  # the units let through


class _Pool2D(Layer):
    """Shared code of max and average pooling (no padding)."""

    short_name = "pool"

    mode = "max"

    def __init__(self, pool_size: int, stride: int | None = None):
        self.pool_size = positive_int("pool_size", pool_size)
        self.stride = self.pool_size if stride is None else positive_int("stride", stride)

    def build(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(
                f"{type(self).__name__} expects (H, W, C) inputs, got {tuple(input_shape)}."
            )
        self.input_shape = tuple(input_shape)
        return F.conv_output_shape(input_shape, self.pool_size, self.stride, 0, input_shape[2])

    def forward(self, p, x, ctx, index):
        y = F.pool_forward(x, self.pool_size, self.stride, self.mode)
        return y, (x, y)

    def backward(self, p, cache, dy, g, need_dx):
        if not need_dx:
            return None
        x, y = cache
        return F.pool_backward(dy, x, self.pool_size, self.stride, self.mode, A=y)

    def activation_pattern(self, cache):
        if self.mode != "max":
            return None
        x, y = cache  # the inputs that receive each window's gradient: its first maximum
        return F.pool_backward(np.ones_like(y), x, self.pool_size, self.stride, "max", A=y)

    def config(self):
        return {"pool_size": self.pool_size, "stride": self.stride}


class MaxPool2D(_Pool2D):
    """Max pooling; the gradient goes to each window's first maximum. See: torch.nn.MaxPool2d."""

    short_name = "maxpool"

    mode = "max"


class AvgPool2D(_Pool2D):
    """Average pooling. See: torch.nn.AvgPool2d."""

    short_name = "avgpool"

    mode = "average"


class Flatten(Layer):
    """(m, H, W, C) -> (m, H*W*C) in C order (NHWC). See: torch.nn.Flatten."""

    short_name = "flatten"

    def build(self, input_shape):
        self.input_shape = tuple(input_shape)
        return (int(np.prod(input_shape)),)

    def forward(self, p, x, ctx, index):
        return x.reshape(x.shape[0], -1), x.shape

    def backward(self, p, cache, dy, g, need_dx):
        return dy.reshape(cache) if need_dx else None


class Dense(Layer):
    """Fully connected layer x @ W + b, W (n_in, n_out). See: torch.nn.Linear."""

    short_name = "dense"

    def __init__(self, units: int, init: str = "he"):
        self.units = positive_int("units", units)
        self.init = _weight_init(init)  # how W is drawn: one of WEIGHT_INITS

    def build(self, input_shape):
        if len(input_shape) != 1:
            raise ValueError(
                f"Dense expects flat (n_features,) inputs, got {tuple(input_shape)}; "
                "put a Flatten() before it."
            )
        self.input_shape = tuple(input_shape)
        return (self.units,)

    def forward_flops(self):
        return 2 * self.input_shape[0] * self.units

    def param_specs(self):
        n_in = self.input_shape[0]
        # He et al. 2015 initialisation by default, as for Conv2D.
        return (
            ParamSpec("W", (n_in, self.units), self.init, fan_in=n_in),
            ParamSpec("b", (self.units,), "zeros"),
        )

    def forward(self, p, x, ctx, index):
        return F.dense_forward(x, p["W"], p["b"]), x

    def backward(self, p, cache, dy, g, need_dx):
        return F.dense_backward(dy, cache, p["W"], g["W"], g["b"], need_dA=need_dx)[0]

    def config(self):
        return {"units": self.units, **_init_config(self.init)}

    def __repr__(self):
        n_in = getattr(self, "input_shape", ("?",))[0]
        return f"Dense({n_in}→{self.units})"


class Dropout(Layer):
    """Inverted dropout: zero a `rate` fraction in training and scale the rest by 1/(1-rate).

    Identity at inference. The mask comes from the pass's key. See: torch.nn.Dropout.
    """

    short_name = "dropout"

    def __init__(self, rate: float):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"`rate` must be in [0, 1), got {rate!r}.")
        self.rate = float(rate)

    def forward(self, p, x, ctx, index):
        if not ctx.training or self.rate == 0.0:
            return x, None
        keep = ctx.rng(index).random(x.shape, dtype=x.dtype) >= self.rate
        scale = x.dtype.type(1.0 / (1.0 - self.rate))
        mask = keep * scale
        return x * mask, mask

    def backward(self, p, cache, dy, g, need_dx):
        if not need_dx:
            return None
        return dy if cache is None else dy * cache

    def config(self):
        return {"rate": self.rate}


class BatchNorm(Layer):
    """Batch normalisation, per feature (dense input) or per channel (NHWC input).

    Training normalises with the statistics of the examples it is given (in partrain: one
    chunk, a "ghost batch") and reports them; the model folds them into the running
    mean/variance buffers, which inference uses. See: torch.nn.BatchNorm1d / BatchNorm2d.
    """

    short_name = "bn"

    def __init__(self, momentum: float = 0.9, eps: float = 1e-5):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1), got {momentum!r}.")
        if eps <= 0:
            raise ValueError(f"`eps` must be > 0, got {eps!r}.")
        self.momentum = float(momentum)
        self.eps = float(eps)

    def build(self, input_shape):
        if len(input_shape) not in (1, 3):
            raise ValueError(
                f"BatchNorm expects (n_features,) or (H, W, C) inputs, got {tuple(input_shape)}."
            )
        self.input_shape = tuple(input_shape)
        return self.input_shape

    def param_specs(self):
        c = self.input_shape[-1]
        return (ParamSpec("gamma", (c,), "ones"), ParamSpec("beta", (c,), "zeros"))

    def buffer_specs(self):
        c = self.input_shape[-1]
        return (ParamSpec("running_mean", (c,), "zeros"), ParamSpec("running_var", (c,), "ones"))

    def forward(self, p, x, ctx, index):
        axes = tuple(range(x.ndim - 1))
        if ctx.training:
            mean = x.mean(axis=axes)
            var = x.var(axis=axes)
        else:
            mean, var = p["running_mean"], p["running_var"]
        inv_std = 1.0 / np.sqrt(var + x.dtype.type(self.eps))
        x_hat = (x - mean) * inv_std
        return x_hat * p["gamma"] + p["beta"], (x_hat, inv_std, mean, var, ctx.training)

    def backward(self, p, cache, dy, g, need_dx):
        x_hat, inv_std, _, _, training = cache
        axes = tuple(range(dy.ndim - 1))
        g["gamma"][...] = (dy * x_hat).sum(axis=axes)
        g["beta"][...] = dy.sum(axis=axes)
        if not need_dx:
            return None
        dx_hat = dy * p["gamma"]
        if not training:
            return dx_hat * inv_std  # fixed running statistics: a per-channel affine map
        n = dy.size // dy.shape[-1]
        # d/dx of (x - mean) / std when mean and std depend on x too (the three-term formula).
        return (inv_std / n) * (
            n * dx_hat - dx_hat.sum(axis=axes) - x_hat * (dx_hat * x_hat).sum(axis=axes)
        )

    def batch_stats(self, cache) -> dict[str, np.ndarray]:
        """This pass's batch mean and (unbiased) variance, named like the buffers."""
        x_hat, _, mean, var, _ = cache
        n = x_hat.size // x_hat.shape[-1]
        return {"running_mean": mean, "running_var": var * (n / max(n - 1, 1))}

    def fold_stats(self, buffers: dict, stats: dict) -> None:
        """running = momentum * running + (1 - momentum) * batch statistic, in place."""
        for name, running in buffers.items():
            running *= self.momentum
            running += (1.0 - self.momentum) * stats[name]

    def config(self):
        return {"momentum": self.momentum, "eps": self.eps}


LAYER_TYPES: dict[str, type[Layer]] = {
    cls.__name__: cls
    for cls in (Conv2D, ReLU, MaxPool2D, AvgPool2D, Flatten, Dense, Dropout, BatchNorm)
}


def register_layer(cls: type[Layer]) -> type[Layer]:
    """Class decorator: make a custom layer rebuildable from configs (files and workers).

    Worker processes import the module that defines the class, so define custom layers in an
    importable module (not in `__main__` of an interactive session).
    """
    if not (isinstance(cls, type) and issubclass(cls, Layer)):
        raise ValueError(f"`cls` must be a Layer subclass, got {cls!r}.")
    LAYER_TYPES[cls.__name__] = cls
    return cls
