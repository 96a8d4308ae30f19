"""Tests of ``partrain.functional`` against naive loop references (``tests/naive.py``)."""

import zlib

import naive
import numpy as np
import pytest

from partrain import functional as F

RTOL64, ATOL64 = 1e-10, 1e-12
RTOL32, ATOL32 = 1e-4, 1e-5


# ----------------------------------------------------------------------------- helpers


def rng_for(*key):
    """A generator seeded deterministically from a test's parameters."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def pure(fn, *args, **kwargs):
    """Call ``fn`` and assert that it did not modify any ndarray argument."""
    before = [a.copy() if isinstance(a, np.ndarray) else None for a in args]
    out = fn(*args, **kwargs)
    for a, b in zip(args, before):
        if b is not None:
            np.testing.assert_array_equal(a, b, err_msg=f"{fn.__name__} modified an input")
    return out


def assert_close(actual, expected, name, rtol=RTOL64, atol=ATOL64):
    """Shape check plus allclose with the max abs error in the message."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    err = np.max(np.abs(actual.astype(np.float64) - expected), initial=0.0)
    np.testing.assert_allclose(
        actual, expected, rtol=rtol, atol=atol, err_msg=f"{name}: max abs err {err:.3e}"
    )


def numerical_grad(loss, x, h=1e-6):
    """Central-difference gradient of the scalar ``loss()`` w.r.t. array ``x`` (in place)."""
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        orig = x[idx]
        x[idx] = orig + h
        plus = loss()
        x[idx] = orig - h
        minus = loss()
        x[idx] = orig
        grad[idx] = (plus - minus) / (2 * h)
    return grad


def conv_inputs(rng, m, H, W, C_prev, C, f, dtype=np.float64):
    """Random A_prev, W, b for a convolution."""
    A = rng.standard_normal((m, H, W, C_prev)).astype(dtype)
    Wt = rng.standard_normal((f, f, C_prev, C)).astype(dtype)
    b = rng.standard_normal((1, 1, 1, C)).astype(dtype)
    return A, Wt, b


# ----------------------------------------------------------------------------- zero_pad


@pytest.mark.parametrize("shape", [(1, 3, 3, 1), (2, 4, 5, 3), (3, 7, 2, 2)])
@pytest.mark.parametrize("pad", [0, 1, 2, 3])
def test_zero_pad_matches_naive(shape, pad):
    """Zeros on the H and W borders only; interior, batch and channels untouched."""
    X = rng_for("pad", shape, pad).standard_normal(shape)
    out = pure(F.zero_pad, X, pad)
    assert out.shape == (shape[0], shape[1] + 2 * pad, shape[2] + 2 * pad, shape[3])
    np.testing.assert_array_equal(out, naive.zero_pad(X, pad))


# ----------------------------------------------------------------------------- convolution

# (m, H, W, C_prev, C, f, stride, pad)
CONV_CASES = [
    (1, 5, 5, 1, 1, 1, 1, 0),  # 1x1 kernel, trivial
    (3, 7, 9, 3, 4, 3, 1, 1),  # "same" conv, non-square
    (3, 7, 9, 2, 3, 3, 2, 1),  # overlap: f > stride
    (1, 7, 9, 2, 2, 2, 2, 0),  # f == stride
    (3, 8, 7, 3, 2, 2, 3, 0),  # f < stride: uncovered pixels, floor truncation
    (1, 9, 7, 1, 3, 5, 1, 2),  # 5x5 "same"
    (3, 7, 9, 2, 2, 5, 3, 2),  # 5x5, stride 3, pad 2
    (1, 6, 6, 4, 1, 1, 2, 0),  # 1x1 kernel, stride 2
    (3, 5, 8, 3, 5, 3, 3, 0),  # f == stride == 3
    (1, 4, 4, 2, 3, 3, 1, 2),  # output larger than input
    (3, 7, 9, 1, 2, 1, 3, 1),  # 1x1 kernel touching pure padding
    (1, 10, 7, 2, 2, 5, 2, 0),  # f=5, stride 2, no pad
    (3, 6, 9, 2, 3, 2, 1, 1),  # even kernel with padding
    (1, 3, 3, 2, 2, 3, 1, 0),  # kernel == input: 1x1 output
    (3, 5, 6, 2, 2, 2, 2, 2),  # pad 2, stride 2
    (1, 5, 5, 2, 1, 5, 1, 0),  # 5x5 kernel == input
]
CONV_IDS = ["m{}_{}x{}_c{}-{}_f{}_s{}_p{}".format(*c) for c in CONV_CASES]


def backward_inputs(tag: str, case: tuple) -> tuple:
    """(A, W, dZ) of a convolution case: inputs, kernel and an output gradient of its shape."""
    m, H, W, C_prev, C, f, s, p = case
    rng = rng_for(tag, case)
    A, Wt, _ = conv_inputs(rng, m, H, W, C_prev, C, f)
    dZ = rng.standard_normal((m, naive.out_size(H, f, s, p), naive.out_size(W, f, s, p), C))
    return A, Wt, dZ


@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv_forward_matches_naive(case):
    """conv_forward equals the 7-loop definition."""
    m, H, W, C_prev, C, f, s, p = case
    A, Wt, b = conv_inputs(rng_for("convf", case), m, H, W, C_prev, C, f)
    Z = pure(F.conv_forward, A, Wt, b, s, p)
    assert_close(Z, naive.conv_forward(A, Wt, b, s, p), f"conv_forward {case}")


@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv_backward_matches_naive(case):
    """conv_backward equals the loop form of the chain rule."""
    A, Wt, dZ = backward_inputs("convb", case)
    s, p = case[6:]
    dA, dW, db = pure(F.conv_backward, dZ, A, Wt, s, p)
    ref = naive.conv_backward(dZ, A, Wt, s, p)
    for name, got, want in zip(("dA_prev", "dW", "db"), (dA, dW, db), ref):
        assert_close(got, want, f"conv_backward {name} {case}")


@pytest.mark.parametrize("tile", [1, 2, 3, 7])
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_tiled_im2col_forward_and_weight_gradient_match_naive(case, tile):
    """Every im2col tiling, including tiles that do not divide the output width (ragged last
    tile) or exceed it, gives the naive forward and weight gradient."""
    m, H, W, C_prev, C, f, s, p = case
    rng = rng_for("convt", case)
    A, Wt, b = conv_inputs(rng, m, H, W, C_prev, C, f)
    Z, cols = F.conv_forward_cols(A, Wt, b, s, p, tile=tile)
    assert_close(Z, naive.conv_forward(A, Wt, b, s, p), f"tile {tile} forward {case}")
    dZ = rng.standard_normal(Z.shape)
    dW, db = F.conv_weight_grad(dZ, cols, Wt.shape, s, tile=tile)
    _, dW_ref, db_ref = naive.conv_backward(dZ, A, Wt, s, p)
    assert_close(dW, dW_ref, f"tile {tile} dW {case}")
    assert_close(db, db_ref, f"tile {tile} db {case}")


STRIDE1_CASES = [c for c in CONV_CASES if c[6] == 1] + [
    (2, 12, 11, 1, 8, 5, 1, 0),  # like mnist_cnn's conv1: one input channel, 8 filters
    (1, 10, 9, 8, 8, 5, 1, 0),  # like mnist_cnn's conv2: 8 -> 8 channels
    (2, 6, 7, 1, 3, 3, 1, 2),  # one input channel, padded
]
STRIDE1_IDS = ["m{}_{}x{}_c{}-{}_f{}_s{}_p{}".format(*c) for c in STRIDE1_CASES]


@pytest.mark.parametrize("tile", [None, 1, 2, 3, 4, 7])
@pytest.mark.parametrize("case", STRIDE1_CASES, ids=STRIDE1_IDS)
def test_row_by_row_weight_gradient_matches_naive(case, tile):
    """conv_weight_grad_rows (width-only im2col, one band per kernel row, batched over
    examples) gives the naive dW and db for every tiling, ragged last tiles and padding."""
    A, Wt, dZ = backward_inputs("convrows", case)
    s, p = case[6:]
    dW, db = pure(F.conv_weight_grad_rows, dZ, A, Wt.shape, p, tile=tile)
    _, dW_ref, db_ref = naive.conv_backward(dZ, A, Wt, s, p)
    assert_close(dW, dW_ref, f"rows dW tile {tile} {case}")
    assert_close(db, db_ref, f"rows db tile {tile} {case}")


@pytest.mark.parametrize("case", STRIDE1_CASES, ids=STRIDE1_IDS)
def test_stride1_input_gradient_matches_naive(case):
    """conv_input_grad of stride-1 convolutions (kernel row by kernel row) on odd shapes."""
    A, Wt, dZ = backward_inputs("convig", case)
    s, p = case[6:]
    dA = pure(F.conv_input_grad, dZ, Wt, A.shape, s, p)
    assert_close(dA, naive.conv_backward(dZ, A, Wt, s, p)[0], f"stride-1 dA {case}")


def test_conv_layer_float32_matches_float64():
    """The Conv2D layer's float32 path (forward im2col, row-by-row weight gradient, stride-1
    input gradient) stays within float32 rounding of the float64 naive loops."""
    rng = rng_for("conv32")
    A, Wt, b = conv_inputs(rng, 3, 12, 11, 3, 8, 5)
    dZ = rng.standard_normal((3, 8, 7, 8))
    A32, W32, b32, dZ32 = (x.astype(np.float32) for x in (A, Wt, b, dZ))
    Z = F.conv_forward(A32, W32, b32, 1, 0)
    dW, db = F.conv_weight_grad_rows(dZ32, A32, W32.shape, 0)
    dA = F.conv_input_grad(dZ32, W32, A32.shape, 1, 0)
    dA_ref, dW_ref, db_ref = naive.conv_backward(dZ, A, Wt, 1, 0)
    for name, got, want in (("Z", Z, naive.conv_forward(A, Wt, b, 1, 0)), ("dW", dW, dW_ref),
                            ("db", db, db_ref), ("dA", dA, dA_ref)):
        assert got.dtype == np.float32, name
        assert_close(got, want, f"float32 {name}", rtol=RTOL32, atol=1e-4)


@pytest.mark.parametrize("n_W, f, stride, n_C, expected", [
    (20, 5, 1, 8, 4),  # mnist_cnn conv2: 4 columns of 8 channels -> a 32-wide matmul
    (20, 5, 1, 64, 1),  # wide layers keep the classic im2col
    (3, 5, 1, 8, 3),  # never more than the output width
    (33, 3, 2, 10, 3),  # stride 2: the band's zeros cost more, so fewer columns than 4
])
def test_tile_width_rule(n_W, f, stride, n_C, expected):
    assert F.tile_width(n_W, f, stride, n_C) == expected


@pytest.mark.parametrize("case", [(2, 5, 4, 2, 3, 3, 2, 1), (1, 4, 5, 1, 2, 2, 3, 0)])
def test_conv_backward_numerical_gradient(case):
    """conv_backward equals central differences of L = sum(conv_forward * G)."""
    m, H, W, C_prev, C, f, s, p = case
    rng = rng_for("convnum", case)
    A, Wt, b = conv_inputs(rng, m, H, W, C_prev, C, f)
    G = rng.standard_normal((m, naive.out_size(H, f, s, p), naive.out_size(W, f, s, p), C))

    def loss():
        return float(np.sum(F.conv_forward(A, Wt, b, s, p) * G))

    dA, dW, db = F.conv_backward(G, A, Wt, s, p)
    for name, got, x in (("dA_prev", dA, A), ("dW", dW, Wt), ("db", db, b)):
        assert_close(got, numerical_grad(loss, x), f"numerical {name}", rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- pooling

# (m, H, W, C, f, stride)
POOL_CASES = [
    (1, 4, 4, 1, 2, 2),
    (3, 5, 7, 2, 2, 1),  # overlap
    (3, 7, 9, 3, 3, 2),  # overlap, non-square
    (1, 8, 7, 2, 2, 3),  # f < stride: uncovered pixels
    (3, 6, 6, 1, 3, 3),
    (1, 7, 5, 2, 1, 1),  # identity window
    (3, 9, 6, 2, 4, 2),
    (1, 5, 5, 1, 5, 1),  # window == whole image
    (3, 6, 8, 2, 3, 1),  # heavy overlap
    (2, 5, 7, 3, 2, 2),  # windows side by side, a row and a column left over
]
POOL_IDS = ["m{}_{}x{}_c{}_f{}_s{}".format(*c) for c in POOL_CASES]
MODES = ["max", "average"]


def pool_case_data(tag, case, mode, kind="normal"):
    """Random (A_prev, dA) for a pooling case; ``kind`` selects the input distribution."""
    m, H, W, C, f, s = case
    rng = rng_for(tag, case, mode, kind)
    shape = (m, H, W, C)
    if kind == "normal":
        A = rng.standard_normal(shape)
    elif kind == "zeros":
        A = np.zeros(shape)
    elif kind == "relu":
        A = np.maximum(rng.standard_normal(shape), 0.0)
    else:  # "ints": many repeated maxima
        A = rng.integers(0, 3, size=shape).astype(np.float64)
    dA = rng.standard_normal((m, naive.out_size(H, f, s), naive.out_size(W, f, s), C))
    return A, dA


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", POOL_CASES, ids=POOL_IDS)
def test_pool_forward_matches_naive(case, mode):
    """pool_forward equals explicit window loops."""
    A, _ = pool_case_data("poolf", case, mode)
    f, s = case[4], case[5]
    out = pure(F.pool_forward, A, f, s, mode=mode)
    assert_close(out, naive.pool_forward(A, f, s, mode), f"pool_forward {mode} {case}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", POOL_CASES, ids=POOL_IDS)
def test_pool_backward_matches_naive(case, mode):
    """pool_backward equals explicit window loops (accumulating overlaps)."""
    A, dA = pool_case_data("poolb", case, mode)
    f, s = case[4], case[5]
    got = pure(F.pool_backward, dA, A, f, s, mode)
    assert_close(got, naive.pool_backward(dA, A, f, s, mode), f"pool_backward {mode} {case}")


@pytest.mark.parametrize("kind", ["zeros", "relu", "ints"])
@pytest.mark.parametrize("case", POOL_CASES, ids=POOL_IDS)
def test_max_pool_backward_ties_go_to_first_max(case, kind):
    """With tied maxima each window's gradient lands once, on its first maximum."""
    A, dA = pool_case_data("poolties", case, "max", kind)
    f, s = case[4], case[5]
    got = pure(F.pool_backward, dA, A, f, s, "max")
    np.testing.assert_allclose(
        got.sum(),
        dA.sum(),
        rtol=1e-10,
        atol=1e-10,
        err_msg=f"gradient mass not conserved ({kind}, {case})",
    )
    assert_close(got, naive.pool_backward(dA, A, f, s, "max"), f"max ties {kind} {case}")


def test_max_pool_backward_tie_hand_example():
    """A window of four equal values sends its gradient to the top-left element only."""
    A = np.full((1, 2, 2, 1), 5.0)
    dA = np.full((1, 1, 1, 1), 3.0)
    got = F.pool_backward(dA, A, 2, 2, "max")
    np.testing.assert_array_equal(got[0, :, :, 0], [[3.0, 0.0], [0.0, 0.0]])
    A2 = np.array([1.0, 5.0, 5.0, 2.0]).reshape(1, 2, 2, 1)
    got2 = F.pool_backward(dA, A2, 2, 2, "max")
    np.testing.assert_array_equal(got2[0, :, :, 0], [[0.0, 3.0], [0.0, 0.0]])


@pytest.mark.parametrize("mode", MODES)
def test_pool_backward_leaves_uncovered_pixels_zero(mode):
    """f=2 < stride=3 on 8x7: rows 2, 5 and columns 2, 5, 6 lie in no window -> zero gradient."""
    A, dA = pool_case_data("poolgap", (1, 8, 7, 2, 2, 3), mode)
    got = F.pool_backward(dA, A, 2, 3, mode)
    assert got.shape == A.shape
    for r in (2, 5):
        assert not got[:, r].any(), f"row {r} should be uncovered"
    for c in (2, 5, 6):
        assert not got[:, :, c].any(), f"column {c} should be uncovered"
    covered = np.ix_([0, 1, 3, 4, 6, 7], [0, 1, 3, 4])
    assert np.count_nonzero(got[0][covered]) > 0


@pytest.mark.parametrize("mode", MODES)
def test_pool_backward_numerical_gradient(mode):
    """pool_backward equals central differences of L = sum(pool_forward * G)."""
    A, G = pool_case_data("poolnum", (2, 5, 6, 2, 3, 2), mode)

    def loss():
        return float(np.sum(F.pool_forward(A, 3, 2, mode=mode) * G))

    got = F.pool_backward(G, A, 3, 2, mode)
    assert_close(got, numerical_grad(loss, A), f"numerical pool {mode}", rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- strided inputs


def strided_view(kind, rng, shape):
    """A non-contiguous (m, H, W, C) view of random data: NCHW transpose, flip or step."""
    m, H, W, C = shape
    if kind == "nchw_transpose":
        return rng.standard_normal((m, C, H, W)).transpose(0, 2, 3, 1)
    if kind == "flipped":
        return rng.standard_normal(shape)[:, ::-1, :, ::-1]
    return rng.standard_normal((m, 2 * H, W, 2 * C))[:, ::2, :, 1::2]  # "stepped"


@pytest.mark.parametrize("kind", ["nchw_transpose", "flipped", "stepped"])
def test_non_contiguous_inputs(kind):
    """Conv and pooling give the naive result on non-contiguous input views."""
    rng = rng_for("strided", kind)
    A = strided_view(kind, rng, (2, 7, 6, 3))
    assert not A.flags.c_contiguous
    _, Wt, b = conv_inputs(rng, 1, 1, 1, 3, 2, 3)
    for s, p in ((1, 1), (2, 0)):
        Z = F.conv_forward(A, Wt, b, s, p)
        assert_close(Z, naive.conv_forward(A, Wt, b, s, p), f"conv_forward {kind} s{s} p{p}")
        dZ = np.asfortranarray(rng.standard_normal(Z.shape))  # not C-contiguous either
        got = F.conv_backward(dZ, A, Wt, s, p)
        for name, g, w in zip(("dA", "dW", "db"), got, naive.conv_backward(dZ, A, Wt, s, p)):
            assert_close(g, w, f"conv_backward {name} {kind} s{s} p{p}")
    for mode in MODES:
        out = F.pool_forward(A, 3, 2, mode)
        assert_close(out, naive.pool_forward(A, 3, 2, mode), f"pool_forward {mode} {kind}")
        dA = rng.standard_normal(out.shape)[:, ::-1]
        got = F.pool_backward(dA, A, 3, 2, mode)
        assert_close(got, naive.pool_backward(dA, A, 3, 2, mode), f"pool_backward {mode} {kind}")


# ----------------------------------------------------------------------------- relu / dense


def relu_inputs(shape, seed):
    """Random Z with exact zeros mixed in, and a random upstream gradient."""
    rng = rng_for("relu", shape, seed)
    Z = rng.standard_normal(shape)
    Z[rng.random(shape) < 0.2] = 0.0
    return Z, rng.standard_normal(shape)


@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 4, 2)])
def test_relu_and_backward_match_naive(shape):
    """relu = max(Z, 0); relu_backward passes dA only where Z > 0 (zero at Z == 0)."""
    Z, dA = relu_inputs(shape, 0)
    np.testing.assert_array_equal(pure(F.relu, Z), naive.relu(Z))
    got = pure(F.relu_backward, dA, Z)
    np.testing.assert_array_equal(got, naive.relu_backward(dA, Z))
    assert not got[Z == 0].any()


@pytest.mark.parametrize("shape", [(0, 3), (5,), (), (3, 0, 2)])
def test_relu_edge_shapes(shape):
    """Scalars, vectors and empty arrays take the plain path and keep shape and dtype."""
    Z = rng_for("reluedge", shape).standard_normal(shape).astype(np.float32)
    got = F.relu(Z)
    assert got.shape == Z.shape and got.dtype == Z.dtype
    np.testing.assert_array_equal(got, np.maximum(Z, 0))


@pytest.mark.parametrize("m,n_in,n_out", [(1, 1, 1), (4, 3, 5), (7, 6, 2)])
def test_dense_forward_backward_match_naive(m, n_in, n_out):
    """dense_forward / dense_backward equal explicit sums."""
    rng = rng_for("dense", m, n_in, n_out)
    A = rng.standard_normal((m, n_in))
    W = rng.standard_normal((n_in, n_out))
    b = rng.standard_normal(n_out)
    dZ = rng.standard_normal((m, n_out))
    assert_close(pure(F.dense_forward, A, W, b), naive.dense_forward(A, W, b), "dense_forward")
    got = pure(F.dense_backward, dZ, A, W)
    for name, g, want in zip(("dA", "dW", "db"), got, naive.dense_backward(dZ, A, W)):
        assert_close(g, want, f"dense_backward {name}")


# ----------------------------------------------------------------------------- softmax / loss


@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])
def test_softmax_matches_reference(scale):
    """Moderate logits: equals an exact-summation reference and rows sum to 1."""
    Z = rng_for("softmax", scale).standard_normal((6, 5)) * scale
    got = pure(F.softmax, Z)
    assert_close(got, naive.softmax(Z), f"softmax scale={scale}", rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-12)


def test_softmax_extreme_logits_finite():
    """Logits of +-1e4 (and 800, where unshifted exp overflows) stay finite and exact."""
    Z = np.array([[1e4, -1e4], [-1e4, 1e4], [1e4, 1e4], [800.0, 799.0]])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        got = F.softmax(Z)
    assert np.all(np.isfinite(got))
    e = 1.0 / (1.0 + np.exp(-1.0))
    expected = [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [e, 1.0 - e]]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)


def test_softmax_shift_invariant():
    """softmax(Z + c) == softmax(Z) for a per-row constant c."""
    rng = rng_for("shift")
    Z = rng.standard_normal((4, 6))
    c = rng.uniform(-500, 500, size=(4, 1))
    np.testing.assert_allclose(F.softmax(Z + c), F.softmax(Z), rtol=1e-9, atol=1e-12)


def ce_inputs(m, K, scale=2.0):
    """Random logits and integer labels."""
    rng = rng_for("ce", m, K, scale)
    return rng.standard_normal((m, K)) * scale, rng.integers(0, K, size=m)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("m,K", [(1, 2), (5, 3), (8, 10)])
def test_softmax_cross_entropy_matches_reference(m, K, reduction):
    """Loss = -log softmax[label] (mean or sum); dlogits = softmax - onehot (/ m for mean)."""
    logits, labels = ce_inputs(m, K)
    loss, grad = pure(F.softmax_cross_entropy, logits, labels, reduction=reduction)
    want_loss, want_grad = naive.softmax_cross_entropy(logits, labels, reduction)
    assert np.ndim(loss) == 0
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-12)
    assert_close(grad, want_grad, f"dlogits {reduction}", rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_softmax_cross_entropy_unchecked_is_identical(reduction):
    """check=False (labels validated by the caller) computes exactly the same thing."""
    logits, labels = ce_inputs(6, 4)
    loss, grad = F.softmax_cross_entropy(logits, labels, reduction=reduction)
    loss_u, grad_u = F.softmax_cross_entropy(logits, labels, reduction=reduction, check=False)
    assert float(loss) == float(loss_u)
    np.testing.assert_array_equal(grad, grad_u)


def test_softmax_cross_entropy_default_is_mean():
    """The default reduction is the mean."""
    logits, labels = ce_inputs(5, 4)
    loss, grad = F.softmax_cross_entropy(logits, labels)
    loss_m, grad_m = F.softmax_cross_entropy(logits, labels, reduction="mean")
    assert float(loss) == float(loss_m)
    np.testing.assert_array_equal(grad, grad_m)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_softmax_cross_entropy_numerical_gradient(reduction):
    """dlogits equals central differences of the loss."""
    logits, labels = ce_inputs(4, 5)

    def loss():
        return float(F.softmax_cross_entropy(logits, labels, reduction=reduction)[0])

    _, grad = F.softmax_cross_entropy(logits, labels, reduction=reduction)
    assert_close(grad, numerical_grad(loss, logits), "numerical dlogits", rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    "label,want_loss,want_grad",
    [(0, 0.0, [0.0, 0.0]), (1, 2e4, [1.0, -1.0])],
)
def test_softmax_cross_entropy_extreme_logits(label, want_loss, want_grad, dtype):
    """Logits [1e4, -1e4]: finite loss 0 (label 0) or 2e4 (label 1), exact gradient."""
    logits = np.array([[1e4, -1e4]], dtype=dtype)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss, grad = F.softmax_cross_entropy(logits, np.array([label]))
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad, [want_grad], rtol=0, atol=1e-6)


def test_softmax_cross_entropy_extreme_logits_batch():
    """Mean and sum over a batch of extreme rows."""
    logits = np.array([[1e4, -1e4], [1e4, -1e4], [1e4, 1e4]])
    labels = np.array([0, 1, 0])
    loss_sum, grad_sum = F.softmax_cross_entropy(logits, labels, reduction="sum")
    loss_mean, grad_mean = F.softmax_cross_entropy(logits, labels, reduction="mean")
    np.testing.assert_allclose(loss_sum, 2e4 + np.log(2.0), rtol=1e-12)
    np.testing.assert_allclose(loss_mean, (2e4 + np.log(2.0)) / 3, rtol=1e-12)
    want = np.array([[0.0, 0.0], [1.0, -1.0], [-0.5, 0.5]])
    np.testing.assert_allclose(grad_sum, want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(grad_mean, want / 3, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- dtypes


def dtype_inputs(dtype):
    """Named random inputs of one dtype for ``DTYPE_CASES``."""
    rng = rng_for("dtype")
    shapes = {
        "A": (2, 6, 7, 2),
        "W": (3, 3, 2, 3),
        "b": (1, 1, 1, 3),
        "dZ": (2, 3, 4, 3),  # conv f=3, stride 2, pad 1 -> 3x4
        "dP": (2, 3, 3, 2),  # pool f=2, stride 2 -> 3x3
        "X": (5, 4),
        "Wd": (4, 3),
        "bd": (3,),
        "dD": (5, 3),
    }
    x = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    x["labels"] = rng.integers(0, 3, size=5)
    return x


# name -> lambda(module, inputs) -> list of outputs; module is F or the naive reference.
DTYPE_CASES = {
    "zero_pad": lambda M, x: [M.zero_pad(x["A"], 2)],
    "conv_forward": lambda M, x: [M.conv_forward(x["A"], x["W"], x["b"], 2, 1)],
    "conv_backward": lambda M, x: list(M.conv_backward(x["dZ"], x["A"], x["W"], 2, 1)),
    "pool_forward_max": lambda M, x: [M.pool_forward(x["A"], 2, 2, "max")],
    "pool_forward_average": lambda M, x: [M.pool_forward(x["A"], 2, 2, "average")],
    "pool_backward_max": lambda M, x: [M.pool_backward(x["dP"], x["A"], 2, 2, "max")],
    "pool_backward_average": lambda M, x: [M.pool_backward(x["dP"], x["A"], 2, 2, "average")],
    "relu": lambda M, x: [M.relu(x["X"])],
    "relu_backward": lambda M, x: [M.relu_backward(x["X"], x["X"][::-1])],
    "dense_forward": lambda M, x: [M.dense_forward(x["X"], x["Wd"], x["bd"])],
    "dense_backward": lambda M, x: list(M.dense_backward(x["dD"], x["X"], x["Wd"])),
    "softmax": lambda M, x: [M.softmax(x["X"])],
    "softmax_cross_entropy": lambda M, x: [M.softmax_cross_entropy(x["X"], x["labels"])[1]],
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(DTYPE_CASES))
def test_output_dtype_follows_input(name, dtype):
    """float32 in -> float32 out (float64 -> float64), values close to the reference."""
    x = dtype_inputs(dtype)
    x64 = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in x.items()}
    rtol, atol = (RTOL32, ATOL32) if dtype == np.float32 else (RTOL64, ATOL64)
    got, want = DTYPE_CASES[name](F, x), DTYPE_CASES[name](naive, x64)
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == dtype, f"{name} output {k}: dtype {g.dtype}, expected {dtype}"
        assert_close(g, w, f"{name} output {k}", rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_cross_entropy_loss_dtype(dtype):
    """The scalar loss follows the logits dtype too."""
    logits, labels = ce_inputs(4, 3)
    loss, _ = F.softmax_cross_entropy(logits.astype(dtype), labels)
    assert np.asarray(loss).dtype == dtype


# ----------------------------------------------------------------------------- errors

KERNEL_MSG = r"(?i)kernel|filter|window|large|exceed|size|small"
RANK_MSG = r"(?i)rank|dim|shape|4"


@pytest.mark.parametrize("mode", ["median", "MAX", "avg"])
def test_pool_unknown_mode_raises(mode):
    """An unknown pooling mode is a ValueError naming the mode."""
    A = np.zeros((1, 4, 4, 1))
    with pytest.raises(ValueError, match=mode):
        F.pool_forward(A, 2, 2, mode=mode)
    with pytest.raises(ValueError, match=mode):
        F.pool_backward(np.zeros((1, 2, 2, 1)), A, 2, 2, mode)


@pytest.mark.parametrize("H,W,f,pad", [(3, 3, 5, 0), (5, 2, 3, 0), (2, 6, 5, 1), (1, 1, 4, 1)])
def test_conv_kernel_larger_than_padded_input_raises(H, W, f, pad):
    """f > H + 2 pad (or W + 2 pad) is a ValueError."""
    A, Wt, b = conv_inputs(rng_for("err"), 1, H, W, 1, 1, f)
    with pytest.raises(ValueError, match=KERNEL_MSG):
        F.conv_forward(A, Wt, b, 1, pad)


@pytest.mark.parametrize("H,W,f", [(3, 3, 4), (5, 2, 3), (2, 6, 3)])
def test_pool_kernel_larger_than_input_raises(H, W, f):
    """f > H (or W) for pooling is a ValueError."""
    for mode in MODES:
        with pytest.raises(ValueError, match=KERNEL_MSG):
            F.pool_forward(np.zeros((1, H, W, 1)), f, 1, mode=mode)


def test_conv_kernel_equal_to_padded_input_is_fine():
    """Boundary: f == H + 2 pad gives a 1x1 output, no error."""
    A, Wt, b = conv_inputs(rng_for("edge"), 2, 3, 3, 1, 2, 5)
    assert F.conv_forward(A, Wt, b, 1, 1).shape == (2, 1, 1, 2)


RANK_CALLS = {
    "zero_pad": lambda X: F.zero_pad(X, 1),
    "conv_forward": lambda X: F.conv_forward(
        X, np.ones((1, 1, 1, 1)), np.zeros((1, 1, 1, 1)), 1, 0
    ),
    "pool_forward": lambda X: F.pool_forward(X, 1, 1, mode="max"),
}


@pytest.mark.parametrize("fn", list(RANK_CALLS))
@pytest.mark.parametrize("shape", [(4, 4, 1), (4, 4), (1, 1, 4, 4, 1)])
def test_wrong_rank_raises(fn, shape):
    """Non-4-D inputs to zero_pad, conv_forward and pool_forward are a ValueError."""
    with pytest.raises(ValueError, match=RANK_MSG):
        RANK_CALLS[fn](np.zeros(shape))
