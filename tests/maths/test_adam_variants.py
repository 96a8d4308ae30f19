"""Adam's tutorial variants (issue 21): no bias correction, eps inside the square root."""

from __future__ import annotations

import numpy as np
import pytest

from partrain.optim import Adam, optimizer_config, optimizer_from_config


def reference_adam(grads, params, *, lr, b1, b2, eps, bias_correction, eps_inside_sqrt):
    """The update written out in float64, one step at a time."""
    p = np.array(params, dtype=np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** t) if bias_correction else m
        v_hat = v / (1 - b2 ** t) if bias_correction else v
        denom = np.sqrt(v_hat + eps) if eps_inside_sqrt else np.sqrt(v_hat) + eps
        p = p - lr * m_hat / denom
    return p


def article_adam(grads, params, lr=0.01, beta1=0.95, beta2=0.99):
    """The tutorial's loop, as printed: v1 = beta1*v1 + (1-beta1)*df1; s1 = beta2*s1 +
    (1-beta2)*df1**2; f1 -= lr * v1/np.sqrt(s1+1e-7)."""
    f1 = np.array(params, dtype=np.float64)
    v1 = np.zeros_like(f1)
    s1 = np.zeros_like(f1)
    for df1 in grads:
        v1 = beta1 * v1 + (1 - beta1) * df1
        s1 = beta2 * s1 + (1 - beta2) * df1 ** 2
        f1 -= lr * v1 / np.sqrt(s1 + 1e-7)
    return f1


def tutorial_adam_gd(grads, params, lr=0.01, beta1=0.95, beta2=0.99):
    """The tutorial's adamGD called once per batch: v1 and s1 are np.zeros at every call."""
    f1 = np.array(params, dtype=np.float64)
    for df1 in grads:
        v1 = np.zeros(f1.shape)
        s1 = np.zeros(f1.shape)
        v1 = beta1 * v1 + (1 - beta1) * df1
        s1 = beta2 * s1 + (1 - beta2) * df1 ** 2
        f1 -= lr * v1 / np.sqrt(s1 + 1e-7)
    return f1


def _grads(n=40, size=7, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(size) * 10.0 ** rng.integers(-4, 1) for _ in range(n)]


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("eps_inside_sqrt", [True, False])
def test_each_variant_matches_the_written_out_update(bias_correction, eps_inside_sqrt):
    grads, start = _grads(), np.linspace(-1, 1, 7)
    opt = Adam(0.01, 0.95, 0.99, 1e-7, bias_correction=bias_correction,
               eps_inside_sqrt=eps_inside_sqrt)
    params = start.copy()
    for g in grads:
        opt.step(params, g)
    expected = reference_adam(grads, start, lr=0.01, b1=0.95, b2=0.99, eps=1e-7,
                              bias_correction=bias_correction, eps_inside_sqrt=eps_inside_sqrt)
    np.testing.assert_allclose(params, expected, rtol=1e-12, atol=1e-15)


def test_the_article_variant_is_the_articles_loop():
    grads, start = _grads(seed=1), np.linspace(-1, 1, 7)
    opt = Adam(0.01, 0.95, 0.99, 1e-7, bias_correction=False, eps_inside_sqrt=True)
    params = start.copy()
    for g in grads:
        opt.step(params, g)
    np.testing.assert_allclose(params, article_adam(grads, start), rtol=1e-12, atol=1e-15)


def test_moments_restarted_at_every_step_are_the_tutorials_adam_gd():
    grads, start = _grads(seed=5), np.linspace(-1, 1, 7)
    opt = Adam(0.01, 0.95, 0.99, 1e-7, bias_correction=False, eps_inside_sqrt=True,
               keep_moments=False)
    params = start.copy()
    for g in grads:
        opt.step(params, g)
    np.testing.assert_allclose(params, tutorial_adam_gd(grads, start), rtol=1e-12, atol=1e-15)
    assert not np.allclose(params, article_adam(grads, start))


def test_the_variants_differ_from_the_default():
    grads, start = _grads(seed=2), np.zeros(7)
    finals = []
    for kwargs in ({}, {"bias_correction": False}, {"eps_inside_sqrt": True},
                   {"keep_moments": False}):
        params = start.copy()
        opt = Adam(0.01, eps=1e-3, **kwargs)
        for g in grads[:3]:
            opt.step(params, g)
        finals.append(params)
    assert not any(np.allclose(finals[0], other) for other in finals[1:])


def test_explicit_defaults_are_bit_identical_to_the_default_adam():
    grads = [g.astype(np.float32) for g in _grads(seed=3)]
    a, b = np.ones(7, np.float32), np.ones(7, np.float32)
    default = Adam()
    explicit = Adam(bias_correction=True, eps_inside_sqrt=False, keep_moments=True)
    for g in grads:
        default.step(a, g)
        explicit.step(b, g)
    assert a.tobytes() == b.tobytes()
    assert optimizer_config(default) == {"name": "adam", "lr": 1e-3, "beta1": 0.9,
                                         "beta2": 0.999, "eps": 1e-8}


def test_variant_round_trips_through_its_config_and_state():
    opt = Adam(0.01, 0.95, 0.99, 1e-7, bias_correction=False, eps_inside_sqrt=True,
               keep_moments=False)
    grads, params = _grads(seed=4), np.zeros(7)
    for g in grads[:5]:
        opt.step(params, g)
    clone = optimizer_from_config(optimizer_config(opt))
    clone.load_state_dict(opt.state_dict(), n_params=7)
    assert clone.bias_correction is False and clone.eps_inside_sqrt is True
    assert clone.keep_moments is False
    other = params.copy()
    for g in grads[5:]:
        opt.step(params, g)
        clone.step(other, g)
    assert params.tobytes() == other.tobytes()


@pytest.mark.parametrize("kwargs", [{"bias_correction": "no"}, {"eps_inside_sqrt": 1},
                                    {"keep_moments": None}])
def test_flags_must_be_booleans(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Adam(**kwargs)
