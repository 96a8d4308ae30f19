"""gradcheck tells a kink from a bug: entries whose +eps / -eps evaluations move a ReLU or a
max-pool window across its kink are counted apart and left out of the ratios; a wrong
gradient still fails. The README's own line on real MNIST images passes."""


import numpy as np
import pytest
from conftest import SHARED_DATA, assert_ok, run_partrain

from partrain import Sequential, gradcheck, zoo
from partrain.layers import Dense, ReLU, register_layer

MNIST = SHARED_DATA


def kinked_mlp() -> Sequential:
    """Dense(1 -> 2) -> ReLU -> Dense(2): unit 0 computes 0 * x + 0, exactly at its ReLU's
    kink for every input, so the steps of dense1.W[0, 0] and dense1.b[0] (and only those)
    straddle it; unit 1 computes x + 0.5 > 0, far from its kink."""
    model = Sequential([Dense(2), ReLU(), Dense(2)], input_shape=(1,), dtype="float64")
    named = model.named_params()
    named["dense1.W"][...] = [[0.0, 1.0]]
    named["dense1.b"][...] = [0.0, 0.5]
    named["dense2.W"][...] = [[0.7, -0.3], [0.2, 0.9]]
    return model


def test_a_known_straddle_is_reported_as_a_kink():
    X, y = np.array([[0.3], [0.8], [0.1]]), np.array([0, 1, 1])
    result = gradcheck(kinked_mlp(), X, y)
    assert result.kinks == {"dense1.W": 1, "dense1.b": 1, "dense2.W": 0, "dense2.b": 0}
    assert result.n_kinks == 2 and result.kink_examples == (0, 1, 2)
    assert result.checked["dense1.W"] == (1, 2) and result.n_checked == 2 * 3 - 2 + 4
    assert result.passed(), result.per_param
    # the straddled differences are what gradcheck used to compare: half the one-sided slope
    # against the analytic 0 (ReLU'(0) = 0), a relative difference of 1
    unit0 = kinked_mlp().layout[1]  # dense1.b
    model = kinked_mlp()
    params = model.params.copy()
    params[unit0.start] = 1e-7
    plus = model.loss_and_grad(params, X, y).loss
    params[unit0.start] = -1e-7
    minus = model.loss_and_grad(params, X, y).loss
    assert model.loss_and_grad(model.params, X, y).grad[unit0.start] == 0.0
    assert abs((plus - minus) / 2e-7) > 1e-2


def mnist_images(n: int = 2):
    from partrain.data import load_dataset

    if not (MNIST / "mnist" / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"the MNIST test files are not in {MNIST / 'mnist'}")
    data = load_dataset("mnist", MNIST, split="test", download=False)
    return data.x_test[:n], data.y_test[:n]


def test_readme_gradcheck_on_real_mnist_images_passes():
    """The README's line: zero biases and blank pixels put conv1 and conv2 pre-activations
    exactly at 0, so every bias entry straddles a kink (it reported conv1.b 0.19 and FAIL)."""
    X, y = mnist_images()
    model = zoo.mnist_cnn(seed=0)
    result = gradcheck(model.copy("float64"), X[:2], y[:2], n_params=100)
    assert result.passed(), (result.per_param, result.kinks)
    assert result.kinks["conv1.b"] > 0 and result.kink_examples == (0, 1)
    assert result.checked["conv1.W"][0] > 0 and result.per_param["conv1.W"] < 1e-6


@register_layer
class SteepReLU(ReLU):
    """A ReLU whose backward is 10% too steep: a gradient bug that kinks must not hide."""

    short_name = "steeprelu"

    def backward(self, p, cache, dy, g, need_dx):
        return 1.1 * super().backward(p, cache, dy, g, need_dx) if need_dx else None


def test_a_wrong_gradient_still_fails_among_kinks():
    X, y = mnist_images()
    good = zoo.mnist_cnn(seed=0, dtype="float64")
    layers = [SteepReLU() if isinstance(layer, ReLU) and i == 1 else layer
              for i, layer in enumerate(good.layers)]
    assert isinstance(layers[1], SteepReLU)
    bad = Sequential(layers, good.input_shape, seed=0, dtype="float64")
    result = gradcheck(bad, X, y, n_params=30)
    assert result.n_kinks > 0  # (kinks are present, and left out)
    assert not result.passed() and result.per_param["conv1.W"] > 1e-3, result.per_param


def test_cli_gradcheck_prints_the_kinks(tmp_path):
    kinked_mlp().save(tmp_path / "kinked.npz")
    proc = run_partrain("gradcheck", "kinked.npz", "--examples", "3", cwd=tmp_path)
    assert_ok(proc)
    assert "2 entries left out" in proc.stdout and "kink" in proc.stdout, proc.stdout
    assert "(1 of 2; 1 at a kink)" in proc.stdout and "PASS" in proc.stdout, proc.stdout
