"""Weight initialisers of Conv2D and Dense (issue 21: the NumPy CNN tutorial's own draws)."""

from __future__ import annotations

import numpy as np
import pytest

from partrain import zoo
from partrain.layers import WEIGHT_INITS, Conv2D, Dense, Flatten
from partrain.model import Sequential


def _w(model: Sequential, name: str) -> np.ndarray:
    row = next(r for r in model.layout if r.name == name)
    return model.params[row.start:row.stop]


@pytest.mark.parametrize(("init", "conv_std", "dense_std"), [
    ("he", np.sqrt(2 / (5 * 5 * 3)), np.sqrt(2 / 64)),
    ("lecun", np.sqrt(1 / (5 * 5 * 3)), np.sqrt(1 / 64)),
    ("array", 1 / np.sqrt(5 * 5 * 3 * 64), 1 / np.sqrt(64 * 300)),  # all of W's entries
    ("small", 0.01, 0.01),
])
def test_each_init_draws_with_its_std(init, conv_std, dense_std):
    model = Sequential([Conv2D(64, 5, init=init), Flatten(), Dense(300, init=init)],
                       (5, 5, 3), seed=1, dtype="float64")  # 4,800 and 19,200 draws
    for name, std in (("conv1.W", conv_std), ("dense1.W", dense_std)):
        w = _w(model, name)
        assert abs(w.std() / std - 1) < 0.04 and abs(w.mean()) < 0.06 * std
    assert not _w(model, "conv1.b").any() and not _w(model, "dense1.b").any()


def test_default_config_is_unchanged_and_an_init_round_trips():
    assert zoo.mnist_cnn().config()["layers"][0] == {"type": "Conv2D", "filters": 8,
                                                     "kernel_size": 5, "stride": 1, "pad": 0}
    model = zoo.mnist_cnn(seed=3, conv_init="array", dense_init="small")
    clone = Sequential.from_config(model.config())
    assert clone.params.tobytes() == model.params.tobytes()
    assert [getattr(layer, "init", None) for layer in clone.layers] == \
        ["array", None, "array", None, None, None, "small", None, "small"]


def test_the_tutorial_init_is_the_tutorials_std():
    """initializeFilter: std 1/sqrt(prod((8, 1, 5, 5))) and 1/sqrt(prod((8, 8, 5, 5)));
    initializeWeight: standard normal x 0.01."""
    model = zoo.mnist_cnn(seed=0, dtype="float64", conv_init="array", dense_init="small")
    assert abs(_w(model, "conv1.W").std() * np.sqrt(200) - 1) < 0.15  # 200 draws
    assert abs(_w(model, "conv2.W").std() * np.sqrt(1600) - 1) < 0.06
    assert abs(_w(model, "dense1.W").std() / 0.01 - 1) < 0.01


@pytest.mark.parametrize("layer", [lambda: Conv2D(8, 5, init="xavier"),
                                   lambda: Dense(3, init=None)])
def test_an_unknown_init_is_refused(layer):
    with pytest.raises(ValueError, match=f"Invalid init.*{sorted(WEIGHT_INITS)}".replace("[", r"\[")
                       .replace("]", r"\]")):
        layer()
