"""Tests of ``partrain.model.Sequential`` and the zoo networks: shapes, sums, files, errors."""

import io
import json
import os
import zipfile

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import partrain
from partrain import Context, Sequential, gradcheck, zoo
from partrain.io import FileFormatError
from partrain.layers import (
    INFERENCE,
    AvgPool2D,
    BatchNorm,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    MaxPool2D,
    ReLU,
)

TRAIN = Context(training=True, key=(5, 0, 1))


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """Tiny matrices: a single BLAS thread avoids oversubscription (about twice as fast)."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


# ----------------------------------------------------------------------------- helpers


def data(model, m=3, seed=0):
    """Random inputs of `model`'s shape and dtype plus random labels."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(m, *model.input_shape)).astype(model.dtype)
    return X, rng.integers(0, model.n_classes, size=m)


def cross_entropy_sum(logits, y):
    """Summed softmax cross-entropy, computed in float64 with an explicit logsumexp."""
    z = np.asarray(logits, dtype=np.float64)
    top = z.max(axis=1)
    lse = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
    return float(np.sum(lse - z[np.arange(len(y)), y]))


def layer_dicts(model):
    """Per layer, {'W': view, 'running_mean': view, ...} built from the public layouts."""
    dicts = {name: {} for name in model.names}
    for layout, vector in ((model.layout, model.params), (model.buffer_layout, model.buffers)):
        for row in layout:
            layer, key = row.name.split(".", 1)
            dicts[layer][key] = vector[row.start:row.stop].reshape(row.shape)
    return [dicts[name] for name in model.names]


def layer_output_shapes(model, X, ctx=INFERENCE):
    """Run the layers one by one and record each output's per-example shape."""
    shapes, a = [], X
    for i, (layer, p) in enumerate(zip(model.layers, layer_dicts(model))):
        a, _ = layer.forward(p, a, ctx, i)
        shapes.append(a.shape[1:])
    return shapes


def numeric_check(model, X, y, ctx=TRAIN, per_row=2, eps=1e-6, seed=0):
    """Independent central differences at `per_row` random entries of every layout row."""
    model = model.copy("float64")
    params = model.params.copy()
    grad = model.loss_and_grad(params, X, y, ctx).grad
    rng = np.random.default_rng(seed)
    for row in model.layout:
        for i in rng.choice(np.arange(row.start, row.stop), per_row, replace=False):
            plus, minus = params.copy(), params.copy()
            plus[i] += eps
            minus[i] -= eps
            num = (model.loss_and_grad(plus, X, y, ctx).loss
                   - model.loss_and_grad(minus, X, y, ctx).loss) / (2 * eps)
            assert abs(num - grad[i]) <= 1e-5 * max(1.0, abs(num)), (row.name, i, num, grad[i])


def all_layer_types_model(dtype="float64", seed=0):
    """One of every layer type, BatchNorm on both NHWC and dense activations."""
    layers = [Conv2D(3, 3, pad=1), BatchNorm(), ReLU(), MaxPool2D(2), Conv2D(4, 2, stride=2),
              AvgPool2D(1), Flatten(), Dense(6), BatchNorm(momentum=0.8), ReLU(), Dropout(0.3),
              Dense(3)]
    return Sequential(layers, (8, 6, 2), seed=seed, dtype=dtype)


# ----------------------------------------------------------------------------- zoo


ZOO = {
    "signs_cnn": {
        "make": zoo.signs_cnn,
        "shapes": [(33, 33, 10), (33, 33, 10), (32, 32, 10), (10240,), (6,)],
        "layout": {"conv1.W": (3, 3, 3, 10), "conv1.b": (1, 1, 1, 10), "dense1.W": (10240, 6),
                   "dense1.b": (6,)},
        "n_params": 3 * 3 * 3 * 10 + 10 + 32 * 32 * 10 * 6 + 6,
    },
    "mnist_cnn": {
        "make": zoo.mnist_cnn,
        "shapes": [(24, 24, 8), (24, 24, 8), (20, 20, 8), (20, 20, 8), (10, 10, 8), (800,),
                   (128,), (128,), (10,)],
        "layout": {"conv1.W": (5, 5, 1, 8), "conv1.b": (1, 1, 1, 8), "conv2.W": (5, 5, 8, 8),
                   "conv2.b": (1, 1, 1, 8), "dense1.W": (800, 128), "dense1.b": (128,),
                   "dense2.W": (128, 10), "dense2.b": (10,)},
        "n_params": 5 * 5 * 1 * 8 + 8 + 5 * 5 * 8 * 8 + 8 + 800 * 128 + 128 + 128 * 10 + 10,
    },
    "mlp": {
        "make": zoo.mlp,
        "shapes": [(784,), (100,), (100,), (100,), (100,), (10,)],
        "layout": {"dense1.W": (784, 100), "dense1.b": (100,), "dense2.W": (100, 100),
                   "dense2.b": (100,), "dense3.W": (100, 10), "dense3.b": (10,)},
        "n_params": 784 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10,
    },
    "digits_cnn": {
        "make": zoo.digits_cnn,
        "shapes": [(8, 8, 16), (8, 8, 16), (4, 4, 16), (256,), (10,)],
        "layout": {"conv1.W": (3, 3, 1, 16), "conv1.b": (1, 1, 1, 16), "dense1.W": (256, 10),
                   "dense1.b": (10,)},
        "n_params": 3 * 3 * 1 * 16 + 16 + 4 * 4 * 16 * 10 + 10,
    },
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_shapes_and_layout(name):
    """Layer output shapes as documented; layout rows contiguous with the expected shapes."""
    spec = ZOO[name]
    model = spec["make"](dtype="float64")
    X, _ = data(model, m=2)
    assert layer_output_shapes(model, X) == spec["shapes"]
    assert model.output_shape == spec["shapes"][-1]
    assert model.n_params == spec["n_params"] == model.params.size
    assert {row.name: row.shape for row in model.layout} == spec["layout"]
    stop = 0
    for row in model.layout:
        assert row.start == stop and row.stop - row.start == np.prod(row.shape)
        stop = row.stop
    assert stop == model.n_params
    assert model.buffers.size == 0


def test_zoo_get_by_cli_name():
    """zoo.get accepts dashed and underscored names and rejects unknown ones."""
    assert zoo.get("digits-cnn").n_params == zoo.get("digits_cnn").n_params
    with pytest.raises(ValueError, match="model"):
        zoo.get("resnet")


@pytest.mark.parametrize("name, n_params, m, seed", [
    ("signs_cnn", 16, 2, 0), ("mnist_cnn", 24, 2, 0), ("mnist_cnn", 24, 3, 1), ("mlp", 60, 3, 0),
    ("mlp", 60, 2, 1), ("digits_cnn", 600, 3, 0), ("digits_cnn", 400, 2, 1),
])
def test_zoo_gradients(name, n_params, m, seed):
    """gradcheck (subset for big models) plus per-row independent central differences."""
    model = ZOO[name]["make"](seed=seed, dtype="float64")
    X, y = data(model, m=m, seed=seed)
    assert gradcheck(model, X, y, n_params=n_params, seed=seed).rel_diff < 1e-6
    numeric_check(model, X, y, per_row=1, seed=seed)


def test_gradcheck_samples_every_parameter_array(monkeypatch):
    """min(size, n_params) entries of EACH array are checked and reported, so a wrong bias
    gradient is found and named (the old sampling drew n_params entries over the whole
    vector: on mnist_cnn's 105k it almost never reached conv1.b's 8)."""
    model = zoo.mnist_cnn(seed=0, dtype="float64")
    X, y = data(model, m=2, seed=0)
    result = gradcheck(model, X, y, n_params=3)
    sizes = {row.name: row.stop - row.start for row in model.layout}
    assert result.checked == {name: (min(3, size), size) for name, size in sizes.items()}
    assert list(result.per_param) == list(sizes) and result.n_checked == 3 * len(sizes)
    assert result.passed()

    original = Sequential.loss_and_grad
    (bias,) = [row for row in model.layout if row.name == "conv1.b"]

    def wrong_bias_gradient(self, params, X, y, ctx=None, **kwargs):
        out = original(self, params, X, y, ctx, **kwargs)
        out.grad[bias.start:bias.stop] *= 1.01
        return out

    monkeypatch.setattr(Sequential, "loss_and_grad", wrong_bias_gradient)
    bad = gradcheck(model, X, y, n_params=3)
    assert not bad.passed() and max(bad.per_param, key=bad.per_param.get) == "conv1.b"
    assert bad.per_param["conv1.W"] < 1e-6


@pytest.mark.parametrize("dropout, batchnorm", [(0.3, False), (0.0, True), (0.4, True)])
@pytest.mark.parametrize("ctx", [TRAIN, INFERENCE], ids=["training", "inference"])
def test_mlp_dropout_batchnorm_gradients(dropout, batchnorm, ctx):
    """mlp variants, image input, training (fixed dropout key) and inference."""
    model = zoo.mlp((12, 10, 8, 4), dropout=dropout, batchnorm=batchnorm, input_shape=(2, 3, 2),
                    dtype="float64")
    if batchnorm:
        rng = np.random.default_rng(3)
        model.buffers[...] = rng.uniform(0.5, 1.5, size=model.buffers.size)
    X, y = data(model, m=5)
    assert gradcheck(model, X, y, ctx=ctx).rel_diff < 1e-6
    numeric_check(model, X, y, ctx=ctx)


def test_mlp_architecture_and_errors():
    """Hidden layers are Dense [BatchNorm] ReLU [Dropout]; bad dims/input_shape raise."""
    model = zoo.mlp((6, 5, 4, 3), dropout=0.2, batchnorm=True)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["Flatten", "Dense", "BatchNorm", "ReLU", "Dropout", "Dense", "BatchNorm",
                     "ReLU", "Dropout", "Dense"]
    assert model.n_params == (6 * 5 + 5 + 2 * 5) + (5 * 4 + 4 + 2 * 4) + (4 * 3 + 3)
    assert model.buffers.size == 2 * 5 + 2 * 4
    with pytest.raises(ValueError, match="dims"):
        zoo.mlp((10,))
    with pytest.raises(ValueError, match="input_shape"):
        zoo.mlp((10, 5, 3), input_shape=(4, 3, 1))


def test_all_layer_types_gradients():
    """A model holding every layer type passes gradcheck in training and inference."""
    model = all_layer_types_model()
    model.buffers[...] = np.random.default_rng(2).uniform(0.5, 1.5, size=model.buffers.size)
    X, y = data(model, m=4)
    for ctx in (TRAIN, INFERENCE):
        assert gradcheck(model, X, y, ctx=ctx).rel_diff < 1e-6


# ----------------------------------------------------------------------------- loss_and_grad


def assert_batch_is_sum(model, X, y, ctx, rtol):
    """loss, grad and n_correct of the batch = sums of the per-example calls."""
    whole = model.loss_and_grad(model.params, X, y, ctx)
    parts = [model.loss_and_grad(model.params, X[i:i + 1], y[i:i + 1], ctx) for i in range(len(X))]
    np.testing.assert_allclose(whole.loss, sum(p.loss for p in parts), rtol=rtol)
    total = np.sum([p.grad.astype(np.float64) for p in parts], axis=0)
    np.testing.assert_allclose(whole.grad, total, rtol=rtol, atol=rtol * np.abs(total).max())
    assert whole.n_correct == sum(p.n_correct for p in parts)


@pytest.mark.parametrize("make, dtype, rtol, ctx", [
    (zoo.digits_cnn, "float64", 1e-10, TRAIN),
    (zoo.mnist_cnn, "float64", 1e-10, TRAIN),
    (zoo.digits_cnn, "float32", 1e-5, TRAIN),
    (lambda **kw: zoo.mlp((20, 16, 8, 4), batchnorm=True, **kw), "float64", 1e-10, INFERENCE),
    (lambda **kw: zoo.mlp((20, 16, 8, 4), batchnorm=True, **kw), "float32", 1e-5, INFERENCE),
])
def test_batch_loss_and_grad_is_sum_of_examples(make, dtype, rtol, ctx):
    """Sums, not means: chunks of a batch simply add up."""
    model = make(dtype=dtype)
    X, y = data(model, m=5)
    assert_batch_is_sum(model, X, y, ctx, rtol)


@pytest.mark.parametrize("make", [zoo.digits_cnn, lambda **kw: zoo.mlp((20, 9, 4), **kw)])
def test_loss_and_n_correct_match_logits(make):
    """loss = summed cross-entropy of the forward logits; n_correct = argmax hits."""
    model = make(dtype="float64")
    X, _ = data(model, m=12)
    logits = model.forward(X)
    # Labels: half equal to the argmax, half something else, so n_correct is non-trivial.
    y = logits.argmax(axis=1)
    y[::2] = (y[::2] + 1) % model.n_classes
    result = model.loss_and_grad(model.params, X, y, TRAIN)
    assert result.n_correct == int(np.sum(logits.argmax(axis=1) == y)) == 6
    np.testing.assert_allclose(result.loss, cross_entropy_sum(logits, y), rtol=1e-12)
    assert isinstance(result.loss, float) and isinstance(result.n_correct, int)


def test_mlp_logits_by_hand():
    """Forward of a small mlp equals X @ W1 + b1 -> ReLU -> @ W2 + b2 computed here."""
    model = zoo.mlp((5, 7, 3), dtype="float64")
    rng = np.random.default_rng(0)
    named = model.named_params()
    named["dense1.b"][...] = rng.normal(size=7)
    named["dense2.b"][...] = rng.normal(size=3)
    X, y = data(model, m=4)
    hidden = np.maximum(X @ named["dense1.W"] + named["dense1.b"], 0)
    logits = hidden @ named["dense2.W"] + named["dense2.b"]
    np.testing.assert_allclose(model.forward(X), logits, rtol=1e-12)
    result = model.loss_and_grad(model.params, X, y)
    np.testing.assert_allclose(result.loss, cross_entropy_sum(logits, y), rtol=1e-12)
    # dL/db2 = sum over examples of softmax - onehot.
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(4), y] -= 1
    np.testing.assert_allclose(model.named_params(result.grad)["dense2.b"], p.sum(axis=0))
    np.testing.assert_allclose(model.named_params(result.grad)["dense2.W"], hidden.T @ p)


def test_loss_and_grad_is_pure_and_uses_given_params():
    """params/X/y/buffers untouched; the params argument (not model.params) is used."""
    model = all_layer_types_model()
    X, y = data(model, m=4)
    copies = [a.copy() for a in (model.params, model.buffers, X, y)]
    other = model.params * 1.5
    first = model.loss_and_grad(other, X, y, TRAIN)
    for now, before in zip((model.params, model.buffers, X, y), copies):
        np.testing.assert_array_equal(now, before)
    own = model.loss_and_grad(model.params, X, y, TRAIN)
    assert first.loss != own.loss
    swapped = model.copy()
    swapped.params[...] = other
    assert swapped.loss_and_grad(swapped.params, X, y, TRAIN).loss == first.loss


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_grad_out_written_in_place(dtype):
    """grad_out (pre-filled with garbage) receives the gradient and is returned."""
    model = all_layer_types_model(dtype=dtype)
    X, y = data(model, m=4)
    expected = model.loss_and_grad(model.params, X, y, TRAIN).grad
    out = np.full(model.n_params, np.nan, dtype=dtype)
    result = model.loss_and_grad(model.params, X, y, TRAIN, grad_out=out)
    assert result.grad is out
    np.testing.assert_array_equal(out, expected)


# ----------------------------------------------------------------------------- dtype


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dtype_everywhere(dtype):
    """params, buffers, grad, stats, logits, probabilities all in the chosen dtype."""
    model = all_layer_types_model(dtype=dtype)
    X, y = data(model, m=4)
    X64 = X.astype(np.float64)
    result = model.loss_and_grad(model.params, X64, y, TRAIN)
    for array in (model.params, model.buffers, result.grad, result.stats, model.forward(X),
                  model.predict_proba(X64)):
        assert array.dtype == np.dtype(dtype)
    assert model.predict(X64).dtype.kind == "i"
    assert model.copy(dtype="float64").params.dtype == np.float64


def test_default_dtype_is_float32_and_bad_dtype_rejected():
    """float32 by default; float16/int raise ValueError naming dtype."""
    assert zoo.digits_cnn().params.dtype == np.float32
    assert zoo.digits_cnn(dtype=np.float64).params.dtype == np.float64
    for bad in ("float16", "int32", "banana"):
        with pytest.raises(ValueError, match="dtype"):
            zoo.digits_cnn(dtype=bad)


def test_integer_inputs_are_cast():
    """Integer pixels are accepted and cast to the model's dtype."""
    model = zoo.digits_cnn(dtype="float64")
    X = np.random.default_rng(0).integers(0, 16, size=(3, 8, 8, 1))
    np.testing.assert_array_equal(model.predict_proba(X), model.predict_proba(X.astype(float)))


# ----------------------------------------------------------------------------- inference API


def inference_models():
    """A conv net and a batch-norm mlp with non-trivial running statistics, float64."""
    mlp = zoo.mlp((12, 10, 5), batchnorm=True, dropout=0.5, dtype="float64")
    mlp.buffers[...] = np.random.default_rng(1).uniform(0.5, 1.5, size=mlp.buffers.size)
    return [zoo.digits_cnn(dtype="float64"), mlp]


@pytest.mark.parametrize("index", [0, 1])
def test_predict_batched_equals_unbatched(index):
    """batch_size=1, 3 and 1000 agree; predict = argmax of predict_proba; rows sum to 1."""
    model = inference_models()[index]
    X, _ = data(model, m=7)
    probs = [model.predict_proba(X, batch_size=b) for b in (1, 3, 1000)]
    for p in probs[1:]:
        np.testing.assert_allclose(p, probs[0], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(probs[0].sum(axis=1), 1.0, rtol=1e-12)
    for b in (1, 3, 1000):
        np.testing.assert_array_equal(model.predict(X, batch_size=b), probs[0].argmax(axis=1))
    logits = model.forward(X)
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(probs[0], expected / expected.sum(axis=1, keepdims=True))


@pytest.mark.parametrize("index", [0, 1])
def test_evaluate_matches_predict_proba(index):
    """evaluate = (mean -log p[y], mean argmax hits) computed here, for any batch size."""
    model = inference_models()[index]
    X, _ = data(model, m=9)
    probs = model.predict_proba(X)
    y = probs.argmax(axis=1)
    y[:4] = (y[:4] + 1) % model.n_classes
    loss = -np.mean(np.log(probs[np.arange(9), y]))
    for b in (1, 4, 1000):
        got_loss, accuracy = model.evaluate(X, y, batch_size=b)
        np.testing.assert_allclose(got_loss, loss, rtol=1e-10)
        assert accuracy == pytest.approx(5 / 9)


def test_inference_api_errors():
    """Empty evaluation and non-positive batch sizes raise ValueError."""
    model = zoo.digits_cnn()
    X, y = data(model, m=2)
    with pytest.raises(ValueError, match="at least one"):
        model.evaluate(X[:0], y[:0])
    for call in (model.predict, model.predict_proba):
        with pytest.raises(ValueError, match="batch_size"):
            call(X, batch_size=0)


# ----------------------------------------------------------------------------- files


def trained_bn_model():
    """A batch-norm model whose running statistics have been folded a few times."""
    model = all_layer_types_model(dtype="float32", seed=4)
    for step in range(3):
        X, y = data(model, m=6, seed=step)
        result = model.loss_and_grad(model.params, X, y, Context(True, (step,)))
        model.fold_batch_stats(result.stats)
    assert not np.allclose(model.buffers, Sequential(model.layers, model.input_shape).buffers)
    return model


@pytest.mark.parametrize("make", [trained_bn_model, zoo.digits_cnn,
                                  lambda: zoo.mlp((6, 4, 3), dtype="float64")])
def test_save_load_round_trip(tmp_path, make):
    """Identical params, buffers, dtype, architecture and predictions."""
    model = make()
    path = tmp_path / "model.npz"
    model.save(path)
    loaded = partrain.load(path)
    assert loaded.config() == model.config()
    assert loaded.params.dtype == model.params.dtype
    np.testing.assert_array_equal(loaded.params, model.params)
    np.testing.assert_array_equal(loaded.buffers, model.buffers)
    X, _ = data(model, m=5)
    np.testing.assert_array_equal(loaded.predict_proba(X), model.predict_proba(X))
    assert partrain.load(str(path)).n_params == model.n_params


def test_saved_file_is_a_plain_npz(tmp_path):
    """A zip readable with np.load(allow_pickle=False) holding params and buffers."""
    model = trained_bn_model()
    path = tmp_path / "m.npz"
    model.save(path)
    assert zipfile.is_zipfile(path)
    with np.load(path, allow_pickle=False) as data_:
        assert {"params", "buffers"} <= set(data_.files)
        np.testing.assert_array_equal(data_["params"], model.params)
        np.testing.assert_array_equal(data_["buffers"], model.buffers)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    """Overwrites leave one file; a crash mid-write keeps the old file and no temp file."""
    path = tmp_path / "sub" / "model.npz"
    old = zoo.digits_cnn(seed=0)
    old.save(path)
    zoo.digits_cnn(seed=1).save(path)
    old.save(path)
    assert os.listdir(path.parent) == ["model.npz"]

    def crash(f, **arrays):
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        zoo.digits_cnn(seed=2).save(path)
    monkeypatch.undo()
    assert os.listdir(path.parent) == ["model.npz"]
    np.testing.assert_array_equal(partrain.load(path).params, old.params)


def test_saved_file_permissions_follow_umask(tmp_path):
    """The saved file gets the same permissions as any newly created file (not mkstemp's 0600)."""
    reference = tmp_path / "reference"
    reference.write_bytes(b"")
    path = tmp_path / "model.npz"
    zoo.digits_cnn().save(path)
    assert oct(path.stat().st_mode & 0o777) == oct(reference.stat().st_mode & 0o777)


def resave(path, raw, **changes):
    """Write the arrays of the model file bytes `raw` to `path`, with some arrays replaced."""
    tmp = path.with_name("source.npz")
    tmp.write_bytes(raw)
    with np.load(tmp, allow_pickle=False) as d:
        arrays = {name: d[name] for name in d.files}
    tmp.unlink()
    arrays.update(changes)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def write_bad_file(path, kind):
    """Write a file of the given kind of wrongness at `path`."""
    good = path.with_name("good.npz")
    zoo.digits_cnn().save(good)
    raw = good.read_bytes()
    good.unlink()
    rng = np.random.default_rng(0)
    writers = {
        "truncated-half": lambda: path.write_bytes(raw[: len(raw) // 2]),
        "truncated-end": lambda: path.write_bytes(raw[:-1]),
        "truncated-start": lambda: path.write_bytes(raw[:10]),
        "empty": lambda: path.write_bytes(b""),
        "random": lambda: path.write_bytes(rng.bytes(3000)),
        "text": lambda: path.write_text("params = [1, 2, 3]\n"),
        "other-npz": lambda: np.savez(path, weights=np.ones(3)),
        "npy": lambda: path.write_bytes(npy_bytes(np.ones(3))),
        "meta-not-object": lambda: resave(path, raw, __meta__=np.array("[1, 2]")),
        "wrong-kind": lambda: resave(path, raw, __meta__=np.array('{"kind": "checkpoint", '
                                                                   '"version": 1}')),
        "wrong-version": lambda: resave(path, raw, __meta__=np.array('{"kind": "model", '
                                                                      '"version": 99}')),
        "wrong-sizes": lambda: resave(path, raw, params=np.ones(5, dtype=np.float32)),
    }
    writers[kind]()


def npy_bytes(array):
    """The bytes of a plain .npy file holding `array`."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


BAD_FILES = ["truncated-half", "truncated-end", "truncated-start", "empty", "random", "text",
             "other-npz", "npy", "meta-not-object", "wrong-kind", "wrong-version", "wrong-sizes"]


@pytest.mark.parametrize("kind", BAD_FILES)
def test_load_bad_file_gives_clear_error(tmp_path, kind):
    """FileFormatError (a ValueError) whose message names the path."""
    path = tmp_path / f"{kind}.npz"
    write_bad_file(path, kind)
    with pytest.raises(FileFormatError) as info:
        partrain.load(path)
    assert isinstance(info.value, ValueError)
    assert str(path) in str(info.value)


def test_load_missing_file(tmp_path):
    """FileNotFoundError naming the path."""
    path = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        partrain.load(path)


# ----------------------------------------------------------------------------- input checks


def bad_calls():
    """(id, call(model, X, y), match) for invalid inputs of loss_and_grad and friends."""
    return [
        ("rank", lambda m, X, y: m.loss_and_grad(m.params, X[0], y), "shape"),
        ("rank-high", lambda m, X, y: m.loss_and_grad(m.params, X[None], y), "shape"),
        ("shape", lambda m, X, y: m.loss_and_grad(m.params, X[:, :7], y), "shape"),
        ("channels", lambda m, X, y: m.predict(np.concatenate([X, X], axis=3)), "shape"),
        ("flat", lambda m, X, y: m.predict(X.reshape(len(X), -1)), "shape"),
        ("label-high", lambda m, X, y: m.loss_and_grad(m.params, X, np.r_[y[:-1], 10]), "class"),
        ("label-neg", lambda m, X, y: m.evaluate(X, np.r_[y[:-1], -1]), "class"),
        ("float-labels", lambda m, X, y: m.loss_and_grad(m.params, X, y.astype(float)),
         "integer"),
        ("frac-labels", lambda m, X, y: m.loss_and_grad(m.params, X, y + 0.5), "integer"),
        ("bool-labels", lambda m, X, y: m.loss_and_grad(m.params, X, y > 4), "integer"),
        ("str-labels", lambda m, X, y: m.loss_and_grad(m.params, X, y.astype(str)), "integer"),
        ("column-labels", lambda m, X, y: m.loss_and_grad(m.params, X, y[:, None]), "one-hot"),
        ("3d-labels", lambda m, X, y: m.loss_and_grad(m.params, X, y[:, None, None]), "shape"),
        ("nan", lambda m, X, y: m.loss_and_grad(m.params, np.where(X > 1, np.nan, X), y), "NaN"),
        ("inf", lambda m, X, y: m.predict(np.where(X > 1, np.inf, X)), "infinite"),
        ("length", lambda m, X, y: m.loss_and_grad(m.params, X, y[:-1]), "same length"),
        ("params-short", lambda m, X, y: m.loss_and_grad(m.params[:-1], X, y), "params"),
        ("params-2d", lambda m, X, y: m.loss_and_grad(m.params[None], X, y), "params"),
        ("params-list", lambda m, X, y: m.loss_and_grad(list(m.params), X, y), "params"),
        ("strings", lambda m, X, y: m.predict(X.astype(str)), "numbers"),
    ]


@pytest.mark.parametrize("call, match", [c[1:] for c in bad_calls()],
                         ids=[c[0] for c in bad_calls()])
def test_invalid_inputs_raise_clear_errors(call, match):
    """ValueError with a message naming what is wrong."""
    model = zoo.digits_cnn()
    X, y = data(model, m=4)
    with pytest.raises(ValueError, match=match):
        call(model, X, y)


@pytest.mark.parametrize("m", [4, 10])
def test_accepted_label_forms_give_the_same_loss(m):
    """(m,) ints, a list, a (1, m) row and one-hot (m, K) rows are equivalent (also m == K)."""
    model = zoo.digits_cnn(dtype="float64")
    X, y = data(model, m=m)
    expected = model.loss_and_grad(model.params, X, y, TRAIN).loss
    onehot = np.eye(model.n_classes, dtype=int)[y]
    for labels in (list(y), y.reshape(1, -1), onehot, onehot.astype(float), y.astype(np.uint8)):
        assert model.loss_and_grad(model.params, X, labels, TRAIN).loss == expected
    loss, _ = model.evaluate(X, y.reshape(1, -1))
    np.testing.assert_allclose(loss * m, expected, rtol=1e-12)


def test_bad_one_hot_rows_rejected():
    """One-hot rows with two ones or non-binary values raise."""
    model = zoo.digits_cnn()
    X, y = data(model, m=3)
    twos = np.eye(10)[y]
    twos[0, (y[0] + 1) % 10] = 1
    for bad in (twos, 0.5 * np.eye(10)[y]):
        with pytest.raises(ValueError, match="one-hot"):
            model.loss_and_grad(model.params, X, bad)


# ----------------------------------------------------------------------------- config


CONFIG_MODELS = [zoo.signs_cnn, zoo.mnist_cnn, zoo.digits_cnn, all_layer_types_model,
                 lambda: zoo.mlp((6, 5, 3), dropout=0.25, batchnorm=True, dtype="float64",
                                 seed=9)]


@pytest.mark.parametrize("make", CONFIG_MODELS)
def test_config_round_trip(make):
    """config -> JSON -> from_config rebuilds the same architecture and init."""
    model = make()
    text = json.dumps(model.config())
    clone = Sequential.from_config(json.loads(text))
    assert clone.config() == model.config()
    assert [type(a) for a in clone.layers] == [type(b) for b in model.layers]
    assert [layer.config() for layer in clone.layers] == [layer.config() for layer in model.layers]
    assert clone.layout == model.layout and clone.buffer_layout == model.buffer_layout
    assert clone.input_shape == model.input_shape and clone.dtype == model.dtype
    np.testing.assert_array_equal(clone.params, model.params)


def test_copy_is_independent():
    """copy() shares nothing with the original."""
    model = trained_bn_model()
    clone = model.copy()
    np.testing.assert_array_equal(clone.buffers, model.buffers)
    clone.params += 1
    clone.buffers += 1
    assert not np.shares_memory(clone.params, model.params)
    assert not np.allclose(clone.params, model.params)
    assert not np.allclose(clone.buffers, model.buffers)


@pytest.mark.parametrize("config, match", [
    ({"input_shape": [4], "layers": [{"type": "Lstm", "units": 3}]}, "layer type"),
    ({"input_shape": [4], "layers": [{"type": "Dense"}]}, "config"),
    ({"input_shape": [4], "layers": [{"type": "Dense", "units": 3, "bias": False}]}, "config"),
    ({"layers": [{"type": "Dense", "units": 3}]}, "config"),
    ({"input_shape": [4], "layers": [{"type": "Dense", "units": 0}]}, "units"),
    ({"input_shape": [4], "layers": []}, "layers"),
])
def test_from_config_errors(config, match):
    """Invalid configs raise ValueError."""
    with pytest.raises(ValueError, match=match):
        Sequential.from_config(config)


def test_named_params_are_views():
    """named_params/unpack return views: writing through them changes the flat vector."""
    model = zoo.digits_cnn()
    named = model.named_params()
    named["dense1.b"][...] = 7.0
    row = next(r for r in model.layout if r.name == "dense1.b")
    np.testing.assert_array_equal(model.params[row.start:row.stop], 7.0)
    assert np.shares_memory(model.unpack(model.params)[-1]["W"], model.params)
