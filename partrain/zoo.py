"""The reference networks of the classic tutorials, by name."""

from __future__ import annotations

from .layers import BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU
from .model import Sequential

# The reference set-ups by network: dataset, epochs, batch size, learning rate (and decay), as
# the tutorials train them; `partrain train` and the training scripts start from these.
TRAINING_DEFAULTS = {
    "digits-cnn": {"dataset": "digits", "epochs": 10, "batch_size": 32, "lr": 3e-3},
    "signs-cnn": {"dataset": "signs", "epochs": 20, "batch_size": 64, "lr": 1e-3},
    "mnist-cnn": {"dataset": "mnist", "epochs": 2, "batch_size": 32, "lr": 1e-3},
    "mlp": {"dataset": "mnist", "epochs": 10, "batch_size": 64, "lr": 1e-3, "lr_decay": 0.01},
}


def signs_cnn(seed: int = 0, dtype="float32", n_classes: int = 6) -> Sequential:
    """SIGNS hand signs, 64x64x3 -> 6 classes (or `n_classes`).

    Conv 3x3, 10 filters, stride 2, pad 2 -> 33x33x10; ReLU; MaxPool f=2 stride 1 -> 32x32x10;
    Flatten 10240; Dense 6.
    """
    layers = [Conv2D(10, 3, stride=2, pad=2), ReLU(), MaxPool2D(2, stride=1), Flatten(),
              Dense(n_classes)]
    return Sequential(layers, (64, 64, 3), seed=seed, dtype=dtype)


def mnist_cnn(seed: int = 0, dtype="float32", n_classes: int = 10, conv_init: str = "he",
              dense_init: str = "he") -> Sequential:
    """MNIST digits, 28x28x1 -> 10 classes (or `n_classes`).

    Conv 5x5 8 -> 24x24x8; ReLU; Conv 5x5 8 -> 20x20x8; ReLU; MaxPool 2 stride 2 -> 10x10x8;
    Flatten 800; Dense 128; ReLU; Dense 10. Weights are drawn as `conv_init` and `dense_init`
    say (`layers.WEIGHT_INITS`); the tutorial's own are ``conv_init="array"`` and
    ``dense_init="small"``.
    """
    layers = [Conv2D(8, 5, init=conv_init), ReLU(), Conv2D(8, 5, init=conv_init), ReLU(),
              MaxPool2D(2, stride=2), Flatten(), Dense(128, init=dense_init), ReLU(),
              Dense(n_classes, init=dense_init)]
    return Sequential(layers, (28, 28, 1), seed=seed, dtype=dtype)


def mlp(dims: tuple[int, ...] = (784, 100, 100, 10), dropout: float = 0.0,
        batchnorm: bool = False, input_shape: tuple[int, ...] | None = None, seed: int = 0,
        dtype="float32") -> Sequential:
    """Fully connected network dims[0] -> ... -> dims[-1]: ReLU hidden layers, linear output.

    Each hidden layer is Dense [-> BatchNorm] -> ReLU [-> Dropout]. `input_shape` defaults to
    (dims[0],); give e.g. (28, 28, 1) to feed images, which are flattened first.
    """
    if len(dims) < 2:
        raise ValueError(f"`dims` must list at least input and output sizes, got {dims!r}.")
    layers = [Flatten()]
    for units in dims[1:-1]:
        layers.append(Dense(units))
        if batchnorm:
            layers.append(BatchNorm())
        layers.append(ReLU())
        if dropout:
            layers.append(Dropout(dropout))
    layers.append(Dense(dims[-1]))
    shape = (dims[0],) if input_shape is None else tuple(input_shape)
    model = Sequential(layers, shape, seed=seed, dtype=dtype)
    if model.layers[1].input_shape != (dims[0],):
        raise ValueError(f"`input_shape` {shape} does not flatten to dims[0] = {dims[0]}.")
    return model


def digits_cnn(seed: int = 0, dtype="float32", n_classes: int = 10) -> Sequential:
    """scikit-learn's 8x8 digits -> 10 classes (or `n_classes`).

    Conv 3x3, 16 filters, pad 1 -> 8x8x16; ReLU; MaxPool 2 stride 2 -> 4x4x16; Flatten 256;
    Dense 10.
    """
    layers = [Conv2D(16, 3, pad=1), ReLU(), MaxPool2D(2, stride=2), Flatten(), Dense(n_classes)]
    return Sequential(layers, (8, 8, 1), seed=seed, dtype=dtype)


MODELS = {"signs-cnn": signs_cnn, "mnist-cnn": mnist_cnn, "mlp": mlp, "digits-cnn": digits_cnn}


def get(name: str, **kwargs) -> Sequential:
    """Build a reference network by its CLI name ('mnist-cnn' or 'mnist_cnn')."""
    key = name.replace("_", "-")
    if key not in MODELS:
        raise ValueError(f"Invalid model: {name!r}, expected one of {sorted(MODELS)}.")
    return MODELS[key](**kwargs)
