"""Sequential: a network as a pure function of one flat parameter vector."""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import numpy as np

from . import functional as F
from .io import FileFormatError, check_fits_memory, read_npz, write_npz
from .layers import INFERENCE, LAYER_TYPES, WEIGHT_INITS, Context, Layer, ParamSpec

DTYPES = ("float32", "float64")


class LayoutRow(NamedTuple):
    """Where one named array lives in a flat vector: `vector[start:stop].reshape(shape)`."""

    name: str
    start: int
    stop: int
    shape: tuple[int, ...]


class LossGrad(NamedTuple):
    """Result of `Sequential.loss_and_grad`: SUMS over the examples given, not means."""

    loss: float  # summed cross-entropy
    grad: np.ndarray  # flat, summed gradient, same length and dtype as params
    n_correct: int  # examples whose argmax logit equals the label
    stats: np.ndarray | None  # batch statistics laid out like `buffers` (None without any)


def check_dtype(dtype) -> np.dtype:
    """Return `dtype` as a NumPy float32/float64 dtype or raise a clear error."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in DTYPES:
        raise ValueError(f"`dtype` must be one of {list(DTYPES)}, got {dtype!r}.")
    return dt


def as_class_ids(y, n_classes: int, n_examples: int | None = None,
                 name: str = "y") -> np.ndarray:
    """Labels as int64 class ids of shape (m,).

    Accepts (m,) integers, a (1, m) row of integers, or one-hot rows (m, n_classes); rejects
    anything else, floats with fractions, and ids outside [0, n_classes). `n_examples`, when
    known, settles whether a (1, n_classes) array is a row of ids or one one-hot row.
    """
    y = np.asarray(y)
    one_hot_row = y.shape == (1, n_classes) and n_examples in (None, 1)
    if y.ndim == 2 and y.shape[0] == 1 and not one_hot_row:
        y = y.reshape(-1)
    elif y.ndim == 2:
        if y.shape[1] != n_classes or not np.isin(y, (0, 1)).all() or (y.sum(axis=1) != 1).any():
            raise ValueError(
                f"`{name}` of shape {y.shape} is neither a (1, m) row of class ids nor one-hot "
                f"rows (m, {n_classes}) with a single 1 each."
            )
        return y.argmax(axis=1).astype(np.int64)
    if y.ndim != 1:
        raise ValueError(f"`{name}` must be class ids of shape (m,), got shape {y.shape}.")
    if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        raise ValueError(
            f"`{name}` must be integer class ids, got dtype {y.dtype}; "
            f"convert with {name}.astype(int) if the values are ids."
        )
    if y.dtype.kind not in "iu":
        raise ValueError(f"`{name}` must be integer class ids, got dtype {y.dtype}.")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        bad = y[(y < 0) | (y >= n_classes)][0]
        raise ValueError(
            f"`{name}` must hold class ids in [0, {n_classes - 1}], got {bad} "
            f"(labels range from {y.min()} to {y.max()})."
        )
    return y.astype(np.int64, copy=False)


class Sequential:
    """A stack of layers whose trainable parameters form ONE contiguous flat vector.

    Parameters
    ----------
    layers : list of Layer
    input_shape : tuple of int
        Shape of one example, e.g. (28, 28, 1) for NHWC images or (784,) for vectors.
    seed : int
        Seed of the He initialisation.
    dtype : "float32" (default) or "float64"

    Every shape is inferred at construction. `params` holds all trainable values and each
    layer's arrays are views of it (`named_params()`); `buffers` likewise holds non-trainable
    state (batch-norm running statistics).

    Examples
    --------
    >>> from partrain.layers import Dense, Flatten, ReLU
    >>> model = Sequential([Flatten(), Dense(16), ReLU(), Dense(3)], input_shape=(4,), seed=0)
    >>> model.n_params
    131
    """

    def __init__(self, layers: list[Layer], input_shape: tuple[int, ...], *, seed: int = 0,
                 dtype="float32"):
        self.dtype = check_dtype(dtype)
        self.seed = int(seed)
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("`layers` must hold at least one layer, got an empty list.")
        self.input_shape = tuple(int(d) for d in input_shape)
        if not self.input_shape or min(self.input_shape) < 1:
            raise ValueError(f"`input_shape` must be positive integers, got {input_shape!r}.")
        self.names = self._name_layers()
        shape = self.input_shape
        check_fits_memory(f"One example of shape {shape}", shape, self.dtype)
        for name, layer in zip(self.names, self.layers):
            try:
                shape = layer.build(shape)
            except ValueError as exc:
                raise ValueError(f"Layer '{name}' ({layer!r}): {exc}") from None
            check_fits_memory(f"Layer '{name}''s output for one example {shape}", shape,
                              self.dtype)
        self.output_shape = shape
        if len(shape) != 1:
            raise ValueError(f"The last layer must output class scores (K,), got {shape}.")
        self.n_classes = shape[0]
        # before anything is allocated (a file's config may claim any shape)
        n_values = sum(math.prod(map(int, spec.shape)) for layer in self.layers
                       for spec in (*layer.param_specs(), *layer.buffer_specs()))
        check_fits_memory("The parameters and buffers", (n_values,), self.dtype)
        self.layout, self._param_slots = self._lay_out(lambda layer: layer.param_specs())
        self.buffer_layout, self._buffer_slots = self._lay_out(lambda layer: layer.buffer_specs())
        self.params = self._initial(self.layout, np.random.default_rng(self.seed))
        self.buffers = self._initial(self.buffer_layout, None)
        self.metadata: dict = {}  # JSON-ready notes saved with the model (e.g. preprocessing)
        self._first_trainable = next(
            (i for i, slots in enumerate(self._param_slots) if slots), len(self.layers))

    # ------------------------------------------------------------------ layout

    def _name_layers(self) -> list[str]:
        counts: dict[str, int] = {}
        names = []
        for layer in self.layers:
            kind = layer.short_name
            counts[kind] = counts.get(kind, 0) + 1
            names.append(f"{kind}{counts[kind]}")
        return names

    def _lay_out(self, specs_of) -> tuple[list[LayoutRow], list[list[tuple[str, LayoutRow]]]]:
        """Rows (name, start, stop, shape) of a flat vector, plus each layer's (key, row)s."""
        rows, per_layer, offset = [], [], 0
        for name, layer in zip(self.names, self.layers):
            slots = []
            for spec in specs_of(layer):
                size = int(np.prod(spec.shape))
                row = LayoutRow(f"{name}.{spec.name}", offset, offset + size, spec.shape)
                rows.append(row)
                slots.append((spec.name, row, spec))
                offset += size
            per_layer.append(slots)
        return rows, per_layer

    def _initial(self, layout: list[LayoutRow], rng) -> np.ndarray:
        vector = np.zeros(layout[-1].stop if layout else 0, dtype=self.dtype)
        for slots in (self._param_slots if rng is not None else self._buffer_slots):
            for _, row, spec in slots:
                vector[row.start:row.stop] = self._init_values(spec, rng)
        return vector

    @staticmethod
    def _init_values(spec: ParamSpec, rng) -> np.ndarray | float:
        size = int(np.prod(spec.shape))
        if spec.init == "he":  # He et al. 2015: normal with std sqrt(2 / fan_in)
            return rng.normal(0.0, np.sqrt(2.0 / spec.fan_in), size=size)
        if spec.init in WEIGHT_INITS:  # the other normal draws (see layers.WEIGHT_INITS)
            std = {"lecun": np.sqrt(1.0 / spec.fan_in), "array": 1.0 / np.sqrt(size),
                   "small": 0.01}[spec.init]
            return rng.normal(0.0, std, size=size)
        return 1.0 if spec.init == "ones" else 0.0

    @property
    def n_params(self) -> int:
        return self.params.size

    def flops_per_example(self) -> int:
        """Approximate FLOPs of one example's training pass: forward matmuls x 3 (fwd + bwd)."""
        return 3 * sum(layer.forward_flops() for layer in self.layers)

    def _views(self, vector: np.ndarray, slots_per_layer) -> list[dict[str, np.ndarray]]:
        return [{key: vector[row.start:row.stop].reshape(row.shape) for key, row, _ in slots}
                for slots in slots_per_layer]

    def unpack(self, params: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Per layer, a dict of reshaped VIEWS of `params` (no copies)."""
        return self._views(params, self._param_slots)

    def named_params(self, params: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """{'conv1.W': view, ...} of `params` (default: the model's own)."""
        vector = self.params if params is None else params
        return {row.name: vector[row.start:row.stop].reshape(row.shape) for row in self.layout}

    # ------------------------------------------------------------------ checks

    def check_X(self, X, name: str = "X") -> np.ndarray:
        """X as an array of this model's dtype and input shape, finite, or a clear error."""
        X = np.asarray(X)
        if X.ndim != len(self.input_shape) + 1 or X.shape[1:] != self.input_shape:
            raise ValueError(
                f"`{name}` must have shape (m, {', '.join(map(str, self.input_shape))}) for this "
                f"model, got {X.shape}."
            )
        if X.dtype.kind not in "fiub":
            raise ValueError(f"`{name}` must hold numbers, got dtype {X.dtype}.")
        X = X.astype(self.dtype, copy=False)
        if not np.isfinite(X).all():
            raise ValueError(f"`{name}` contains NaN or infinite values.")
        return X

    def check_Xy(self, X, y, names: tuple[str, str] = ("X", "y")) -> tuple[np.ndarray, np.ndarray]:
        """Validated (X, class ids) of equal length; `names` label them in error messages."""
        X = self.check_X(X, names[0])
        y = as_class_ids(y, self.n_classes, len(X), names[1])
        if len(y) != len(X):
            raise ValueError(f"`{names[0]}` and `{names[1]}` must have the same length, got "
                             f"{len(X)} and {len(y)}.")
        return X, y

    def _check_vector(self, params: np.ndarray) -> None:
        if not isinstance(params, np.ndarray) or params.shape != (self.n_params,):
            raise ValueError(
                f"`params` must be a flat array of {self.n_params} values, got shape "
                f"{np.shape(params)}."
            )

    # ------------------------------------------------------------------ the pure function

    def loss_and_grad(self, params: np.ndarray, X, y, ctx: Context | None = None, *,
                      grad_out: np.ndarray | None = None) -> LossGrad:
        """Loss and flat gradient of the examples (X, y): returns SUMS over them, not means.

        Sums make the gradients of disjoint chunks of a batch simply add up. `params` is not
        modified. `ctx` selects training (default) or inference and keys the random draws
        (dropout); `grad_out`, if given, receives the gradient (no allocation).
        """
        self._check_vector(params)
        X, y = self.check_Xy(X, y)
        return self.loss_and_grad_unchecked(params, X, y, ctx or Context(), grad_out)

    def loss_and_grad_unchecked(self, params, X, y, ctx, grad_out=None) -> LossGrad:
        """`loss_and_grad` for inputs already validated (the trainer's hot path)."""
        grad = np.zeros_like(params) if grad_out is None else grad_out
        p_views, g_views = self.unpack(params), self.unpack(grad)
        b_views = self._views(self.buffers, self._buffer_slots)
        caches, a = [], X
        for i, layer in enumerate(self.layers):
            a, cache = layer.forward({**p_views[i], **b_views[i]}, a, ctx, i)
            caches.append(cache)
        loss, dz = F.softmax_cross_entropy(a, y, reduction="sum", check=False)
        n_correct = int((a.argmax(axis=1) == y).sum())
        # Backpropagate down to the first layer with parameters; below it only the input
        # would receive gradients, which nobody needs (e.g. the Flatten of an MLP).
        for i in range(len(self.layers) - 1, self._first_trainable - 1, -1):
            need_dx = i > self._first_trainable
            dz = self.layers[i].backward(p_views[i], caches[i], dz, g_views[i], need_dx)
        stats = None
        if ctx.training and self.buffers.size:
            stats = np.empty_like(self.buffers)
            for i, s_views in enumerate(self._views(stats, self._buffer_slots)):
                if s_views:
                    batch = self.layers[i].batch_stats(caches[i])
                    for key, view in s_views.items():
                        view[...] = batch[key]
        return LossGrad(float(loss), grad, n_correct, stats)

    def fold_batch_stats(self, stats: np.ndarray) -> None:
        """Fold batch statistics (laid out like `buffers`) into the running buffers in place."""
        b_views = self._views(self.buffers, self._buffer_slots)
        s_views = self._views(stats, self._buffer_slots)
        for layer, b, s in zip(self.layers, b_views, s_views):
            if b:
                layer.fold_stats(b, s)

    # ------------------------------------------------------------------ inference

    def forward(self, X, params: np.ndarray | None = None, ctx: Context = INFERENCE) -> np.ndarray:
        """Logits (m, K) of already validated X, inference mode by default."""
        logits = X
        for out, _, _ in self._forward_layers(X, params, ctx):
            logits = out
        return logits

    def activation_patterns(self, X, params: np.ndarray, ctx: Context) -> np.ndarray:
        """Per example, every layer's `activation_pattern` of a forward pass at `params`,
        flattened into one row (m, k): which ReLUs were active, which input won each max
        pool. Two evaluations whose rows differ lie on two sides of a kink."""
        patterns = [pattern.reshape(len(X), -1) for _, layer, cache in
                    self._forward_layers(X, params, ctx)
                    if (pattern := layer.activation_pattern(cache)) is not None]
        return np.concatenate(patterns, axis=1) if patterns else np.zeros((len(X), 0))

    def _forward_layers(self, X, params: np.ndarray | None, ctx: Context):
        """Yield (output, layer, cache) of each layer in turn."""
        params = self.params if params is None else params
        p_views, b_views = self.unpack(params), self._views(self.buffers, self._buffer_slots)
        a = X
        for i, layer in enumerate(self.layers):
            a, cache = layer.forward({**p_views[i], **b_views[i]}, a, ctx, i)
            yield a, layer, cache

    def _batched_logits(self, X, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        for start in range(0, len(X), batch_size):
            yield start, self.forward(X[start:start + batch_size])

    def predict_proba(self, X, batch_size: int = 256) -> np.ndarray:
        """Class probabilities (m, K), computed in batches to bound memory."""
        X = self.check_X(X)
        out = np.empty((len(X), self.n_classes), dtype=self.dtype)
        for start, logits in self._batched_logits(X, batch_size):
            out[start:start + len(logits)] = F.softmax(logits)
        return out

    def predict(self, X, batch_size: int = 256) -> np.ndarray:
        """Predicted class ids (m,)."""
        X = self.check_X(X)
        out = np.empty(len(X), dtype=np.int64)
        for start, logits in self._batched_logits(X, batch_size):
            out[start:start + len(logits)] = logits.argmax(axis=1)
        return out

    def evaluate(self, X, y, batch_size: int = 256) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) over (X, y) in inference mode."""
        X, y = self.check_Xy(X, y)
        if len(X) == 0:
            raise ValueError("`X` must hold at least one example to evaluate, got 0.")
        loss, correct = 0.0, 0
        for start, logits in self._batched_logits(X, batch_size):
            labels = y[start:start + len(logits)]
            loss += float(F.softmax_cross_entropy(logits, labels, reduction="sum")[0])
            correct += int((logits.argmax(axis=1) == labels).sum())
        return loss / len(X), correct / len(X)

    # ------------------------------------------------------------------ config, copies, files

    def config(self) -> dict:
        """JSON-ready architecture: enough to rebuild the model without user code."""
        return {
            "input_shape": list(self.input_shape),
            "dtype": self.dtype.name,
            "seed": self.seed,
            "layers": [{"type": type(layer).__name__, **layer.config()} for layer in self.layers],
        }

    @classmethod
    def from_config(cls, config: dict) -> Sequential:
        """Rebuild an (initialised) model from `config()` output."""
        try:
            layers = []
            for spec in config["layers"]:
                spec = dict(spec)
                layer_type = spec.pop("type")
                if layer_type not in LAYER_TYPES:
                    raise ValueError(
                        f"Invalid layer type: {layer_type!r}, expected one of "
                        f"{sorted(LAYER_TYPES)}."
                    )
                layers.append(LAYER_TYPES[layer_type](**spec))
            return cls(layers, tuple(config["input_shape"]), seed=config.get("seed", 0),
                       dtype=config.get("dtype", "float32"))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"Invalid model config ({type(exc).__name__}: {exc}).") from None

    def copy(self, dtype=None) -> Sequential:
        """An independent model with the same architecture and values, optionally cast."""
        config = self.config()
        if dtype is not None:
            config["dtype"] = check_dtype(dtype).name
        clone = Sequential.from_config(config)
        clone.params[...] = self.params
        clone.buffers[...] = self.buffers
        clone.metadata = dict(self.metadata)
        return clone

    def set_state(self, params: np.ndarray, buffers: np.ndarray, source: str = "state") -> None:
        """Copy params and buffers in, after checking their sizes against the architecture."""
        for what, new, own in (("params", params, self.params), ("buffers", buffers, self.buffers)):
            if np.shape(new) != own.shape:
                raise ValueError(
                    f"{source}: `{what}` has shape {np.shape(new)}, but this architecture needs "
                    f"{own.shape}."
                )
            own[...] = new

    def save(self, path: str | os.PathLike) -> None:
        """Write the model (architecture as JSON, params, buffers) to one `.npz`, atomically."""
        write_npz(path, "model", {"config": self.config(), "metadata": self.metadata},
                  {"params": self.params, "buffers": self.buffers})

    def __repr__(self) -> str:
        lines = [f"Sequential(input {self.input_shape}, {self.n_params:,} params, {self.dtype})"]
        lines += [f"  {name}: {layer!r}" for name, layer in zip(self.names, self.layers)]
        return "\n".join(lines)


def model_from_arrays(meta: dict, arrays: dict, path: str) -> Sequential:
    """Rebuild a model from a saved file's metadata and arrays (models and checkpoints)."""
    try:
        model = Sequential.from_config(meta["config"])
        model.set_state(arrays["params"], arrays["buffers"], source=f"'{path}'")
        model.metadata = dict(meta.get("metadata", {}))
    except (KeyError, ValueError) as exc:
        raise FileFormatError(f"'{path}' does not hold a valid partrain model: {exc}") from None
    return model


def load(path: str | os.PathLike) -> Sequential:
    """Load a model written by `Sequential.save` (no pickle involved)."""
    meta, arrays = read_npz(path, "model")
    return model_from_arrays(meta, arrays, str(path))
