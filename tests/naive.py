"""Naive loop reference implementations of ``partrain.functional`` (NHWC layout).

Everything here is written with explicit Python loops over examples, pixels and channels,
computes in float64 and favours obviousness over speed. Keep test shapes small.
"""

import math

import numpy as np


def out_size(n, f, stride, pad=0):
    """Output length of a sliding window: floor((n + 2 pad - f) / stride) + 1."""
    return (n + 2 * pad - f) // stride + 1


def zero_pad(X, pad):
    """Copy ``X`` (m, H, W, C) into the centre of a zero array padded on H and W."""
    m, H, W, C = X.shape
    out = np.zeros((m, H + 2 * pad, W + 2 * pad, C))
    for i in range(m):
        for h in range(H):
            for w in range(W):
                for c in range(C):
                    out[i, h + pad, w + pad, c] = X[i, h, w, c]
    return out


def conv_forward(A_prev, W, b, stride, pad):
    """Z[i,h,w,c] = sum_{di,dj,k} A_pad[i, h*s+di, w*s+dj, k] * W[di,dj,k,c] + b[c]."""
    m, H, Wd, C_prev = A_prev.shape
    f, _, _, C = W.shape
    A_pad = zero_pad(A_prev, pad)
    n_H, n_W = out_size(H, f, stride, pad), out_size(Wd, f, stride, pad)
    Z = np.zeros((m, n_H, n_W, C))
    for i in range(m):
        for h in range(n_H):
            for w in range(n_W):
                for c in range(C):
                    acc = float(b[0, 0, 0, c])
                    for di in range(f):
                        for dj in range(f):
                            for k in range(C_prev):
                                acc += (
                                    A_pad[i, h * stride + di, w * stride + dj, k] * W[di, dj, k, c]
                                )
                    Z[i, h, w, c] = acc
    return Z


def conv_backward(dZ, A_prev, W, stride, pad):
    """Chain rule of ``conv_forward`` in loop form; returns (dA_prev, dW, db)."""
    m, H, Wd, C_prev = A_prev.shape
    f, _, _, C = W.shape
    _, n_H, n_W, _ = dZ.shape
    A_pad = zero_pad(A_prev, pad)
    dA_pad = np.zeros_like(A_pad)
    dW = np.zeros(W.shape)
    db = np.zeros((1, 1, 1, C))
    for i in range(m):
        for h in range(n_H):
            for w in range(n_W):
                for c in range(C):
                    g = dZ[i, h, w, c]
                    db[0, 0, 0, c] += g
                    for di in range(f):
                        for dj in range(f):
                            for k in range(C_prev):
                                r, s = h * stride + di, w * stride + dj
                                dA_pad[i, r, s, k] += W[di, dj, k, c] * g
                                dW[di, dj, k, c] += A_pad[i, r, s, k] * g
    dA_prev = dA_pad[:, pad : pad + H, pad : pad + Wd, :].copy()
    return dA_prev, dW, db


def first_argmax(A_prev, i, r0, s0, c, f):
    """(row, col) of the first maximum, in row-major order, of one (f, f) window."""
    best, best_pos = -math.inf, None
    for di in range(f):
        for dj in range(f):
            v = A_prev[i, r0 + di, s0 + dj, c]
            if best_pos is None or v > best:
                best, best_pos = v, (r0 + di, s0 + dj)
    return best_pos


def pool_forward(A_prev, f, stride, mode):
    """Max or average pooling without padding."""
    m, H, W, C = A_prev.shape
    n_H, n_W = out_size(H, f, stride), out_size(W, f, stride)
    A = np.zeros((m, n_H, n_W, C))
    for i in range(m):
        for h in range(n_H):
            for w in range(n_W):
                for c in range(C):
                    r0, s0 = h * stride, w * stride
                    if mode == "max":
                        r, s = first_argmax(A_prev, i, r0, s0, c, f)
                        A[i, h, w, c] = A_prev[i, r, s, c]
                    else:
                        total = 0.0
                        for di in range(f):
                            for dj in range(f):
                                total += A_prev[i, r0 + di, s0 + dj, c]
                        A[i, h, w, c] = total / (f * f)
    return A


def pool_backward(dA, A_prev, f, stride, mode):
    """Max: each window's gradient to its first maximum; average: dA / f^2 to each cell."""
    m, _, _, C = A_prev.shape
    _, n_H, n_W, _ = dA.shape
    dA_prev = np.zeros(A_prev.shape)
    for i in range(m):
        for h in range(n_H):
            for w in range(n_W):
                for c in range(C):
                    r0, s0 = h * stride, w * stride
                    g = dA[i, h, w, c]
                    if mode == "max":
                        r, s = first_argmax(A_prev, i, r0, s0, c, f)
                        dA_prev[i, r, s, c] += g
                    else:
                        for di in range(f):
                            for dj in range(f):
                                dA_prev[i, r0 + di, s0 + dj, c] += g / (f * f)
    return dA_prev


def relu(Z):
    """Elementwise max(Z, 0)."""
    out = np.zeros(Z.shape)
    for idx in np.ndindex(Z.shape):
        out[idx] = Z[idx] if Z[idx] > 0 else 0.0
    return out


def relu_backward(dA, Z):
    """dA where Z > 0, else 0 (including Z == 0)."""
    out = np.zeros(Z.shape)
    for idx in np.ndindex(Z.shape):
        out[idx] = dA[idx] if Z[idx] > 0 else 0.0
    return out


def dense_forward(A, W, b):
    """Z[i, o] = sum_j A[i, j] W[j, o] + b[o]."""
    m, n_in = A.shape
    n_out = W.shape[1]
    Z = np.zeros((m, n_out))
    for i in range(m):
        for o in range(n_out):
            Z[i, o] = b[o] + math.fsum(A[i, j] * W[j, o] for j in range(n_in))
    return Z


def dense_backward(dZ, A, W):
    """Returns (dA, dW, db) of ``dense_forward``."""
    m, n_in = A.shape
    n_out = W.shape[1]
    dA = np.zeros(A.shape)
    dW = np.zeros(W.shape)
    db = np.zeros(n_out)
    for i in range(m):
        for o in range(n_out):
            db[o] += dZ[i, o]
            for j in range(n_in):
                dA[i, j] += dZ[i, o] * W[j, o]
                dW[j, o] += A[i, j] * dZ[i, o]
    return dA, dW, db


def log_softmax_row(z):
    """Stable log-softmax of one row with exact (fsum) summation."""
    z = [float(v) for v in z]
    zmax = max(z)
    log_norm = zmax + math.log(math.fsum(math.exp(v - zmax) for v in z))
    return [v - log_norm for v in z]


def softmax(Z):
    """Row-wise softmax via ``log_softmax_row``."""
    return np.array([[math.exp(v) for v in log_softmax_row(row)] for row in Z])


def softmax_cross_entropy(logits, labels, reduction="mean"):
    """(loss, dlogits) with the sum or mean over rows."""
    m = logits.shape[0]
    losses = [-log_softmax_row(logits[i])[int(labels[i])] for i in range(m)]
    grad = softmax(logits)
    for i in range(m):
        grad[i, int(labels[i])] -= 1.0
    if reduction == "sum":
        return math.fsum(losses), grad
    return math.fsum(losses) / m, grad / m
