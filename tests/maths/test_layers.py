"""Tests of ``partrain.layers`` through small models: gradients, init, dropout, batch norm."""

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from partrain import Context, Sequential, gradcheck
from partrain.layers import (
    AvgPool2D,
    BatchNorm,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    MaxPool2D,
    ReLU,
)

TOL = 1e-6
TRAIN = Context(training=True, key=(7, 1))
INFER = Context(training=False)


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """Tiny matrices: a single BLAS thread avoids oversubscription (about twice as fast)."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


# ----------------------------------------------------------------------------- helpers


def model64(layers, input_shape, seed=0):
    """A float64 Sequential."""
    return Sequential(layers, input_shape, seed=seed, dtype="float64")


def batch(model, m=3, seed=0, loc=0.0, scale=1.0):
    """Random continuous inputs (no ReLU kinks or max ties) and random labels for `model`."""
    rng = np.random.default_rng(seed)
    X = rng.normal(loc, scale, size=(m, *model.input_shape))
    return X, rng.integers(0, model.n_classes, size=m)


def randomize_bn(model, seed=1):
    """Give every BatchNorm's gamma/beta and running statistics non-trivial random values."""
    rng = np.random.default_rng(seed)
    named = model.named_params()
    for name, view in named.items():
        if name.endswith(".gamma"):
            view[...] = rng.uniform(0.5, 1.5, size=view.shape)
        elif name.endswith(".beta"):
            view[...] = rng.normal(0.0, 0.5, size=view.shape)
    for row in model.buffer_layout:
        view = model.buffers[row.start:row.stop]
        if row.name.endswith("running_mean"):
            view[...] = rng.normal(0.0, 0.5, size=view.shape)
        else:
            view[...] = rng.uniform(0.5, 2.0, size=view.shape)


def buffer(model, name, vector=None):
    """View of the buffer row `name` (e.g. 'bn1.running_mean') of `vector` (default buffers)."""
    vector = model.buffers if vector is None else vector
    (row,) = [r for r in model.buffer_layout if r.name == name]
    return vector[row.start:row.stop].reshape(row.shape)


def assert_gradcheck(model, X, y, ctx=TRAIN, n_params=None):
    """Overall and per-row (where the gradient is not ~0) relative differences below TOL."""
    result = gradcheck(model, X, y, ctx=ctx, n_params=n_params)
    assert result.rel_diff < TOL, result.per_param
    grad = model.copy("float64").loss_and_grad(model.params.astype(np.float64), X, y, ctx).grad
    scale = np.linalg.norm(grad)
    assert scale > 0, "degenerate test: zero gradient"
    for row in model.layout:
        if row.name in result.per_param and np.linalg.norm(grad[row.start:row.stop]) > 1e-3 * scale:
            assert result.per_param[row.name] < 10 * TOL, (row.name, result.per_param)
    return result


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("stride, pad, f", [(1, 0, 3), (1, 1, 3), (1, 2, 2), (2, 0, 3),
                                            (2, 1, 3), (2, 2, 2), (3, 1, 2)])
def test_conv2d_gradcheck(stride, pad, f):
    """Conv2D as a non-first layer (so its input gradient matters) on a non-square input."""
    model = model64([Conv2D(2, 2, pad=1), Conv2D(3, f, stride=stride, pad=pad), Flatten(),
                     Dense(3)], (7, 5, 2))
    X, y = batch(model)
    assert_gradcheck(model, X, y)


@pytest.mark.parametrize("pool", [MaxPool2D, AvgPool2D])
@pytest.mark.parametrize("f, stride", [(2, 1), (2, 2), (3, 2), (3, 1)])
def test_pool_gradcheck(pool, f, stride):
    """Pooling right after a conv (continuous values: no ties) on a non-square input."""
    model = model64([Conv2D(2, 2), pool(f, stride=stride), Flatten(), Dense(3)], (8, 7, 2))
    X, y = batch(model)
    assert_gradcheck(model, X, y)


def test_dense_relu_flatten_gradcheck():
    """Dense/ReLU stack fed by Flatten of an image."""
    model = model64([Flatten(), Dense(6), ReLU(), Dense(5), ReLU(), Dense(3)], (2, 3, 2))
    X, y = batch(model, m=4)
    assert_gradcheck(model, X, y)


def test_conv_relu_pool_gradcheck():
    """A conv -> ReLU -> pool -> conv chain (ReLU and pool input gradients both needed)."""
    model = model64([Conv2D(3, 3, pad=1), ReLU(), MaxPool2D(2), Conv2D(2, 2), ReLU(), Flatten(),
                     Dense(3)], (6, 8, 1))
    X, y = batch(model)
    assert_gradcheck(model, X, y)


def test_dropout_gradcheck_with_fixed_key():
    """Dropout in training: the keyed mask is identical across evaluations."""
    model = model64([Dense(8), ReLU(), Dropout(0.4), Dense(3)], (5,))
    X, y = batch(model, m=4)
    first = model.loss_and_grad(model.params, X, y, TRAIN)
    again = model.loss_and_grad(model.params, X, y, TRAIN)
    assert first.loss == again.loss
    np.testing.assert_array_equal(first.grad, again.grad)
    assert_gradcheck(model, X, y, ctx=TRAIN)


@pytest.mark.parametrize("ctx", [TRAIN, INFER], ids=["training", "inference"])
@pytest.mark.parametrize("kind", ["dense", "nhwc", "first"])
def test_batchnorm_gradcheck(kind, ctx):
    """BatchNorm on dense and NHWC input, as a hidden or first layer, both modes."""
    if kind == "dense":
        model = model64([Dense(6), BatchNorm(), ReLU(), Dense(3)], (4,))
    elif kind == "nhwc":
        model = model64([Conv2D(3, 2), BatchNorm(), ReLU(), Flatten(), Dense(3)], (4, 5, 2))
    else:
        model = model64([BatchNorm(), Flatten(), Dense(3)], (3, 4, 2))
    randomize_bn(model)
    X, y = batch(model, m=5, loc=0.5, scale=2.0)
    assert_gradcheck(model, X, y, ctx=ctx)


# ----------------------------------------------------------------------------- He initialisation


def he_model(seed=0, dtype="float32"):
    """A model with one large Conv2D (fan_in 400) and one large Dense (fan_in 2304)."""
    return Sequential([Conv2D(64, 5), ReLU(), Flatten(), Dense(64)], (10, 10, 16), seed=seed,
                      dtype=dtype)


@pytest.mark.parametrize("name, fan_in", [("conv1.W", 5 * 5 * 16), ("dense1.W", 6 * 6 * 64)])
def test_he_init_std(name, fan_in):
    """std(W) = sqrt(2 / fan_in) within 3 %, mean ~0."""
    W = he_model().named_params()[name].astype(np.float64)
    expected = np.sqrt(2.0 / fan_in)
    assert abs(W.std() / expected - 1) < 0.03
    assert abs(W.mean()) < 0.05 * expected


def test_he_init_biases_zero_and_dtype():
    """Biases start at zero; params have the model's dtype."""
    for dtype in ("float32", "float64"):
        model = he_model(dtype=dtype)
        assert model.params.dtype == np.dtype(dtype)
        named = model.named_params()
        assert not named["conv1.b"].any() and not named["dense1.b"].any()


def test_he_init_seeding():
    """Same seed -> identical params, different seed -> different."""
    np.testing.assert_array_equal(he_model(seed=3).params, he_model(seed=3).params)
    a, b = he_model(seed=3).named_params(), he_model(seed=4).named_params()
    for name in ("conv1.W", "dense1.W"):
        assert not np.allclose(a[name], b[name])


def test_batchnorm_init():
    """gamma = 1, beta = 0, running mean 0, running var 1."""
    model = Sequential([Dense(4), BatchNorm(), Dense(2)], (3,))
    named = model.named_params()
    np.testing.assert_array_equal(named["bn1.gamma"], np.ones(4))
    np.testing.assert_array_equal(named["bn1.beta"], np.zeros(4))
    np.testing.assert_array_equal(buffer(model, "bn1.running_mean"), np.zeros(4))
    np.testing.assert_array_equal(buffer(model, "bn1.running_var"), np.ones(4))


# ----------------------------------------------------------------------------- dropout


def dropout_mask(layers, n=50, m=4, key=(1, 2), scale=1.0, dtype="float32"):
    """Forward `scale * ones` through a dropout model in training: the scaled mask."""
    model = Sequential(layers, (n,), dtype=dtype)
    return model.forward(np.full((m, n), scale, dtype=dtype), ctx=Context(True, key))


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5])
def test_dropout_statistics(rate):
    """About `rate` zeros; kept values scaled by exactly 1/(1-rate); the mean is preserved."""
    out = dropout_mask([Dropout(rate)], n=500, m=200, dtype="float64")
    zeros = np.mean(out == 0)
    assert abs(zeros - rate) < 0.01
    np.testing.assert_allclose(out[out != 0], 1.0 / (1.0 - rate), rtol=1e-12)
    assert abs(out.mean() - 1.0) < 0.015


def test_dropout_identity_at_inference():
    """Identity in inference, whatever the key."""
    model = Sequential([Dropout(0.5)], (20,), dtype="float64")
    X = np.random.default_rng(0).normal(size=(6, 20))
    np.testing.assert_array_equal(model.forward(X), X)
    np.testing.assert_array_equal(model.forward(X, ctx=Context(training=False, key=(3,))), X)


def test_dropout_rate_zero_is_identity_in_training():
    """rate=0 never drops."""
    np.testing.assert_array_equal(dropout_mask([Dropout(0.0)]), np.ones((4, 50)))


def test_dropout_mask_depends_on_key_and_index_only():
    """Same (key, index) -> same mask in any model; other key or index -> another mask."""
    at0 = dropout_mask([Dropout(0.5)])
    at1 = dropout_mask([Flatten(), Dropout(0.5)])
    np.testing.assert_array_equal(at0, dropout_mask([Dropout(0.5)]))
    np.testing.assert_array_equal(at1, dropout_mask([ReLU(), Dropout(0.5)]))
    assert not np.array_equal(at0, at1)
    assert not np.array_equal(at0, dropout_mask([Dropout(0.5)], key=(1, 3)))
    # Not the data: scaling the input scales the output with the same mask.
    np.testing.assert_allclose(dropout_mask([Dropout(0.5)], scale=3.0), 3.0 * at0)
    # Not the global RNG state.
    np.random.seed(123)
    np.testing.assert_array_equal(at0, dropout_mask([Dropout(0.5)]))


def test_two_dropout_layers_draw_different_masks():
    """Two dropout layers in one model use their own indices."""
    model = Sequential([Dropout(0.5), Dropout(0.5)], (200,), dtype="float64")
    out = model.forward(np.ones((3, 200)), ctx=TRAIN)
    first = dropout_mask([Dropout(0.5)], n=200, m=3, key=TRAIN.key, dtype="float64")
    second = dropout_mask([ReLU(), Dropout(0.5)], n=200, m=3, key=TRAIN.key, dtype="float64")
    np.testing.assert_allclose(out, first * second)


def test_dropout_loss_depends_on_key():
    """Different keys give different masks, hence different losses."""
    model = model64([Dense(20), ReLU(), Dropout(0.5), Dense(3)], (5,))
    X, y = batch(model, m=8)
    a = model.loss_and_grad(model.params, X, y, Context(True, (0,))).loss
    b = model.loss_and_grad(model.params, X, y, Context(True, (1,))).loss
    assert a != b


# ----------------------------------------------------------------------------- batch norm


@pytest.mark.parametrize("input_shape", [(5,), (3, 4, 2)])
def test_batchnorm_training_normalises(input_shape):
    """With gamma=1, beta=0 each channel has mean 0 and variance var/(var+eps)."""
    model = Sequential([BatchNorm(eps=1e-3), Flatten()], input_shape, dtype="float64")
    X = np.random.default_rng(0).normal(3.0, 2.0, size=(16, *input_shape))
    out = model.forward(X, ctx=TRAIN).reshape(-1, input_shape[-1])
    flat = X.reshape(-1, input_shape[-1])
    np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-12)
    var = flat.var(axis=0)
    np.testing.assert_allclose(out.var(axis=0), var / (var + 1e-3), rtol=1e-10)


def test_batch_stats_dense():
    """Stats returned by loss_and_grad = mean and var(ddof=1) of the Dense output."""
    model = model64([Dense(4), BatchNorm(), ReLU(), Dense(3)], (6,))
    X, y = batch(model, m=7)
    named = model.named_params()
    h = X @ named["dense1.W"] + named["dense1.b"]
    stats = model.loss_and_grad(model.params, X, y, TRAIN).stats
    assert stats.shape == model.buffers.shape and stats.dtype == model.buffers.dtype
    np.testing.assert_allclose(buffer(model, "bn1.running_mean", stats), h.mean(axis=0))
    np.testing.assert_allclose(buffer(model, "bn1.running_var", stats), h.var(axis=0, ddof=1))


def test_batch_stats_nhwc_and_two_layers():
    """Per-channel stats over (m, H, W); a second BatchNorm has its own slots."""
    model = model64([BatchNorm(), Flatten(), Dense(5), BatchNorm(), Dense(3)], (3, 4, 2))
    X, y = batch(model, m=6, loc=1.0, scale=3.0)
    stats = model.loss_and_grad(model.params, X, y, TRAIN).stats
    flat = X.reshape(-1, 2)
    np.testing.assert_allclose(buffer(model, "bn1.running_mean", stats), flat.mean(axis=0))
    np.testing.assert_allclose(buffer(model, "bn1.running_var", stats), flat.var(axis=0, ddof=1))
    named = model.named_params()
    x_hat = (flat - flat.mean(axis=0)) / np.sqrt(flat.var(axis=0) + 1e-5)
    h = x_hat.reshape(6, -1) @ named["dense1.W"] + named["dense1.b"]
    np.testing.assert_allclose(buffer(model, "bn2.running_mean", stats), h.mean(axis=0))
    np.testing.assert_allclose(buffer(model, "bn2.running_var", stats), h.var(axis=0, ddof=1))


def test_no_stats_in_inference_or_without_batchnorm():
    """stats is None in inference and for models without buffers."""
    model = model64([Dense(4), BatchNorm(), Dense(3)], (6,))
    X, y = batch(model)
    assert model.loss_and_grad(model.params, X, y, INFER).stats is None
    plain = model64([Dense(3)], (6,))
    assert plain.loss_and_grad(plain.params, X, y, TRAIN).stats is None


def test_loss_and_grad_leaves_buffers_alone():
    """Training passes report stats but never touch the running buffers."""
    model = model64([Dense(4), BatchNorm(), Dense(3)], (6,))
    randomize_bn(model)
    before = model.buffers.copy()
    X, y = batch(model)
    model.loss_and_grad(model.params, X, y, TRAIN)
    np.testing.assert_array_equal(model.buffers, before)


@pytest.mark.parametrize("momentum", [0.9, 0.5, 0.0])
def test_fold_batch_stats(momentum):
    """running = momentum * running + (1 - momentum) * stat; params untouched."""
    model = model64([Dense(4), BatchNorm(momentum=momentum), Dense(3)], (6,))
    randomize_bn(model)
    X, y = batch(model, m=5)
    stats = model.loss_and_grad(model.params, X, y, TRAIN).stats
    old, params = model.buffers.copy(), model.params.copy()
    model.fold_batch_stats(stats)
    np.testing.assert_allclose(model.buffers, momentum * old + (1 - momentum) * stats)
    np.testing.assert_array_equal(model.params, params)


@pytest.mark.parametrize("input_shape", [(5,), (3, 4, 2)])
def test_batchnorm_inference_uses_running_stats(input_shape):
    """gamma (x - running_mean) / sqrt(running_var + eps) + beta, per channel."""
    model = Sequential([BatchNorm(eps=1e-3), Flatten()], input_shape, dtype="float64")
    randomize_bn(model)
    X = np.random.default_rng(0).normal(size=(4, *input_shape))
    named = model.named_params()
    mean, var = buffer(model, "bn1.running_mean"), buffer(model, "bn1.running_var")
    expected = named["bn1.gamma"] * (X - mean) / np.sqrt(var + 1e-3) + named["bn1.beta"]
    np.testing.assert_allclose(model.forward(X), expected.reshape(4, -1), rtol=1e-12)
    # A single example is fine at inference and independent of the rest of the batch.
    np.testing.assert_allclose(model.forward(X[:1]), expected[:1].reshape(1, -1), rtol=1e-12)


def test_batchnorm_float32_stays_float32():
    """Training and inference outputs and stats of a float32 BatchNorm model are float32."""
    model = Sequential([BatchNorm(), Flatten(), Dense(3)], (3, 4, 2))
    X = np.random.default_rng(0).normal(size=(5, 3, 4, 2))
    assert model.forward(X.astype(np.float32), ctx=TRAIN).dtype == np.float32
    assert model.forward(X.astype(np.float32)).dtype == np.float32
    result = model.loss_and_grad(model.params, X, np.zeros(5, dtype=int), TRAIN)
    assert result.grad.dtype == np.float32 and result.stats.dtype == np.float32


# ----------------------------------------------------------------------------- shape inference


@pytest.mark.parametrize("layers, input_shape, words", [
    ([Conv2D(4, 3), Dense(3)], (8, 8, 1), ["dense1", "Flatten"]),
    ([Conv2D(4, 7), Flatten(), Dense(2)], (5, 5, 1), ["conv1", "7"]),
    ([Conv2D(2, 3), Conv2D(4, 7, pad=1), Flatten(), Dense(2)], (6, 6, 1), ["conv2"]),
    ([Conv2D(4, 3), Flatten(), Dense(2)], (8, 2, 1), ["conv1", "width"]),
    ([MaxPool2D(4), Flatten(), Dense(2)], (3, 3, 1), ["maxpool1"]),
    ([Conv2D(2, 3), AvgPool2D(3, stride=1), Flatten(), Dense(2)], (4, 6, 1), ["avgpool1"]),
    ([Flatten(), Dense(4), Conv2D(2, 1)], (4,), ["conv1"]),
    ([Flatten(), Dense(4), MaxPool2D(2)], (4,), ["maxpool1"]),
    ([Conv2D(2, 3)], (5, 5, 1), ["last layer"]),
])
def test_shape_errors_name_the_layer(layers, input_shape, words):
    """Impossible architectures raise ValueError naming the failing layer."""
    with pytest.raises(ValueError) as info:
        Sequential(layers, input_shape)
    for word in words:
        assert word in str(info.value)


def test_padding_can_make_a_kernel_fit():
    """A kernel larger than the input but not than the padded input is fine."""
    model = Sequential([Conv2D(2, 5, pad=1), Flatten(), Dense(2)], (3, 3, 1))
    assert model.layers[1].input_shape == (1, 1, 2)


@pytest.mark.parametrize("make, word", [
    (lambda: Conv2D(0, 3), "filters"),
    (lambda: Conv2D(2, 0), "kernel_size"),
    (lambda: Conv2D(2, 3, stride=0), "stride"),
    (lambda: Conv2D(2, 3, pad=-1), "pad"),
    (lambda: Conv2D(2.5, 3), "filters"),
    (lambda: Dense(0), "units"),
    (lambda: MaxPool2D(0), "pool_size"),
    (lambda: AvgPool2D(2, stride=0), "stride"),
    (lambda: Dropout(1.0), "rate"),
    (lambda: Dropout(-0.1), "rate"),
    (lambda: BatchNorm(momentum=1.0), "momentum"),
    (lambda: BatchNorm(eps=0.0), "eps"),
])
def test_bad_layer_arguments(make, word):
    """Invalid constructor arguments raise ValueError naming the argument."""
    with pytest.raises(ValueError, match=word):
        make()


# ----------------------------------------------------------------------------- reprs


def test_layer_reprs():
    """Built layers show their in/out sizes; others their arguments."""
    model = Sequential([Conv2D(8, 3, stride=2, pad=1), ReLU(), MaxPool2D(2), Flatten(),
                        Dense(10), Dropout(0.25), BatchNorm()], (9, 9, 3))
    conv, _, pool, _, dense, drop, bn = (repr(layer) for layer in model.layers)
    # 9x9 -> conv k3 s2 p1 -> 5x5x8 -> pool 2 -> 2x2x8 = 32 features.
    assert conv.startswith("Conv2D") and "3→8" in conv
    assert dense.startswith("Dense") and "32→10" in dense
    assert "MaxPool2D" in pool and "2" in pool
    assert "Dropout" in drop and "0.25" in drop
    assert "BatchNorm" in bn
    assert "?" in repr(Conv2D(4, 3)) and "Dense" in repr(Dense(5))
    text = repr(model)
    for name in model.names:
        assert name in text
