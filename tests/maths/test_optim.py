"""Tests of ``partrain.optim``: Adam and SGD updates, state round trips, schedules."""

import json
import math
import tracemalloc

import numpy as np
import pytest

from partrain.optim import (
    SGD,
    Adam,
    ConstantLR,
    InverseTimeDecay,
    optimizer_config,
    optimizer_from_config,
    schedule_from_config,
)

# ----------------------------------------------------------------------------- helpers


def reference_adam(params, grads, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8):
    """Algorithm 1 of Kingma & Ba (eps added to sqrt(v_hat)), plain float64 loops."""
    p = np.array(params, dtype=np.float64)
    m, v = np.zeros_like(p), np.zeros_like(p)
    history = []
    for t, g in enumerate(grads, start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
        history.append(p.copy())
    return history


def reference_sgd(params, grads, lr, momentum=0.0):
    """velocity = momentum * velocity + g; p -= lr * velocity."""
    p, velocity, history = np.array(params, dtype=np.float64), 0.0, []
    for g in grads:
        velocity = momentum * velocity + g
        p = p - lr * velocity
        history.append(p.copy())
    return history


def run(optimizer, params, grads):
    """Apply `optimizer` to a copy of `params` for each gradient; return the trajectory."""
    p, history = np.array(params, copy=True), []
    for g in grads:
        optimizer.step(p, g)
        history.append(p.copy())
    return history


def random_grads(n=7, steps=6, seed=0, dtype=np.float64):
    """A few random gradients of varied scale."""
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=n) * 10.0 ** rng.uniform(-2, 1)).astype(dtype) for _ in range(steps)]


G1, G2 = np.array([0.5, -1.0]), np.array([-0.2, 0.4])


# ----------------------------------------------------------------------------- Adam


def test_adam_two_steps_by_hand():
    """lr=0.1, betas (0.9, 0.999), eps=1e-8 on params [1, -2], gradients G1 then G2."""
    adam = Adam(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8)
    p = np.array([1.0, -2.0])
    # Step 1: m = 0.1 g1 = [0.05, -0.1]; v = 0.001 g1^2 = [0.00025, 0.001];
    # m_hat = m / 0.1 = [0.5, -1]; v_hat = v / 0.001 = [0.25, 1]; sqrt(v_hat) = [0.5, 1].
    # p -= 0.1 * m_hat / (sqrt(v_hat) + 1e-8) = [0.1 * 0.5 / 0.50000001, -0.1 / 1.00000001].
    adam.step(p, G1)
    np.testing.assert_allclose(adam.state["m"], [0.05, -0.1], rtol=1e-14)
    np.testing.assert_allclose(adam.state["v"], [0.00025, 0.001], rtol=1e-14)
    np.testing.assert_allclose(p, [0.900000002, -1.900000001], rtol=0, atol=1e-12)
    # Step 2: m = 0.9 [0.05, -0.1] + 0.1 [-0.2, 0.4] = [0.025, -0.05];
    # v = 0.999 [0.00025, 0.001] + 0.001 [0.04, 0.16] = [0.00028975, 0.001159];
    # m_hat = m / (1 - 0.81) = [0.13157894737, -0.26315789474];
    # v_hat = v / (1 - 0.998001) = [0.14494747374, 0.57978989495];
    # sqrt(v_hat) = [0.38071967868, 0.76143935737];
    # step = 0.1 m_hat / (sqrt(v_hat) + 1e-8) = [0.03456058388, -0.03456058434].
    adam.step(p, G2)
    assert adam.state["step"] == 2
    np.testing.assert_allclose(adam.state["m"], [0.025, -0.05], rtol=1e-12)
    np.testing.assert_allclose(adam.state["v"], [0.00028975, 0.001159], rtol=1e-12)
    np.testing.assert_allclose(p, [0.865439418117, -1.865439416663], rtol=0, atol=1e-11)


@pytest.mark.parametrize("hyper", [{}, {"lr": 0.05, "beta1": 0.5, "beta2": 0.9, "eps": 1e-3},
                                   {"lr": 0.3, "beta1": 0.0, "beta2": 0.0}])
def test_adam_matches_reference(hyper):
    """Trajectory equals the loop re-implementation, for several hyperparameters."""
    params = np.random.default_rng(1).normal(size=7)
    grads = random_grads()
    for got, expected in zip(run(Adam(**hyper), params, grads),
                             reference_adam(params, grads, **hyper)):
        np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-15)


def torch_trajectory(make_torch_optimizer, params, grads):
    """Trajectory of a torch optimizer in float64 fed the given gradients."""
    torch = pytest.importorskip("torch")
    p = torch.tensor(params, dtype=torch.float64, requires_grad=True)
    optimizer = make_torch_optimizer(torch, [p])
    history = []
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        optimizer.step()
        history.append(p.detach().numpy().copy())
    return history


@pytest.mark.parametrize("lr, betas, eps", [(1e-3, (0.9, 0.999), 1e-8), (0.1, (0.8, 0.95), 1e-6)])
def test_adam_matches_torch(lr, betas, eps):
    """Same trajectory as torch.optim.Adam over 6 random steps, float64."""
    params, grads = np.random.default_rng(2).normal(size=7), random_grads(seed=3)
    expected = torch_trajectory(
        lambda torch, ps: torch.optim.Adam(ps, lr=lr, betas=betas, eps=eps), params, grads)
    got = run(Adam(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps), params, grads)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("make", [lambda: Adam(lr=0.01), lambda: SGD(lr=0.1, momentum=0.9),
                                  lambda: SGD(lr=0.1)])
def test_float32_in_place_without_new_arrays(make):
    """float32 stays float32; params updated in place; state arrays are reused, not reallocated."""
    optimizer = make()
    p = np.ones(1000, dtype=np.float32)
    grads = random_grads(n=1000, steps=4, dtype=np.float32)
    optimizer.step(p, grads[0])
    ids = {name: id(value) for name, value in optimizer.state.items()
           if isinstance(value, np.ndarray)}
    p_id = id(p)
    for g in grads[1:]:
        optimizer.step(p, g)
    assert id(p) == p_id and p.dtype == np.float32
    for name, array_id in ids.items():
        assert id(optimizer.state[name]) == array_id
        assert optimizer.state[name].dtype == np.float32


@pytest.mark.parametrize("make", [lambda: Adam(lr=0.01), lambda: SGD(lr=0.1, momentum=0.9)])
def test_step_allocates_no_full_size_temporaries(make):
    """After the first step, a step allocates far less than one params-sized array."""
    optimizer = make()
    p = np.ones(500_000, dtype=np.float32)
    g = np.full_like(p, 0.5)
    optimizer.step(p, g)
    tracemalloc.start()
    try:
        for _ in range(3):
            optimizer.step(p, g)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < p.nbytes // 4


def test_adam_float32_close_to_float64():
    """A float32 run tracks the float64 reference closely."""
    params = np.random.default_rng(4).normal(size=7)
    grads = random_grads(seed=5)
    got = run(Adam(lr=0.01), params.astype(np.float32), [g.astype(np.float32) for g in grads])
    np.testing.assert_allclose(got, reference_adam(params, grads, lr=0.01), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- state


@pytest.mark.parametrize("make", [lambda: Adam(lr=0.01), lambda: SGD(lr=0.05, momentum=0.5)])
def test_state_dict_returns_copies(make):
    """Mutating a state_dict does not change the optimizer."""
    optimizer = make()
    p = np.zeros(5)
    optimizer.step(p, np.ones(5))
    state = optimizer.state_dict()
    snapshot = {k: np.copy(v) for k, v in state.items()}
    for value in state.values():
        if isinstance(value, np.ndarray):
            value += 100.0
    for name, value in optimizer.state.items():
        np.testing.assert_array_equal(value, snapshot[name])


@pytest.mark.parametrize("make", [lambda: Adam(lr=0.01), lambda: SGD(lr=0.05, momentum=0.5)])
def test_load_state_dict_copies(make):
    """Mutating the source after load does not change the optimizer."""
    source = make()
    p = np.zeros(5)
    source.step(p, np.ones(5))
    state = source.state_dict()
    target = make()
    target.load_state_dict(state)
    before = target.state_dict()
    for value in state.values():
        if isinstance(value, np.ndarray):
            value *= -3.0
    for name, value in target.state.items():
        np.testing.assert_array_equal(value, before[name])


@pytest.mark.parametrize("make", [lambda: Adam(lr=0.02), lambda: SGD(lr=0.05, momentum=0.7),
                                  lambda: SGD(lr=0.05)])
def test_state_round_trip_through_npz(tmp_path, make):
    """state_dict -> np.savez -> np.load(allow_pickle=False) -> a twin that continues the same."""
    grads = random_grads(n=6, steps=6, seed=8)
    original, p = make(), np.random.default_rng(9).normal(size=6)
    for g in grads[:3]:
        original.step(p, g)
    path = tmp_path / "opt.npz"
    np.savez(path, **original.state_dict())
    twin = make()
    with np.load(path, allow_pickle=False) as data:
        twin.load_state_dict(dict(data), n_params=6)
    assert twin.state["step"] == 3 and isinstance(twin.state["step"], int)
    p_twin = p.copy()
    for g in grads[3:]:
        original.step(p, g)
        twin.step(p_twin, g)
    np.testing.assert_array_equal(p_twin, p)


def test_resumed_adam_equals_uninterrupted_reference():
    """Adam stopped after 2 steps and resumed in a new object matches 6 reference steps."""
    params, grads = np.random.default_rng(6).normal(size=7), random_grads(seed=7)
    first, p = Adam(lr=0.01), params.copy()
    for g in grads[:2]:
        first.step(p, g)
    second = Adam(lr=0.01)
    second.load_state_dict(first.state_dict())
    for g in grads[2:]:
        second.step(p, g)
    np.testing.assert_allclose(p, reference_adam(params, grads, lr=0.01)[-1], rtol=1e-13)


def test_state_size_mismatch_names_both_sizes():
    """n_params mismatch at load and params mismatch at step both name the two sizes."""
    adam = Adam()
    adam.step(np.zeros(5), np.ones(5))
    state = adam.state_dict()
    with pytest.raises(ValueError, match=r"5.*8|8.*5"):
        Adam().load_state_dict(state, n_params=8)
    other = Adam()
    other.load_state_dict(state)
    with pytest.raises(ValueError, match=r"5.*8|8.*5"):
        other.step(np.zeros(8), np.ones(8))


def test_grad_shape_mismatch_and_bad_state():
    """A gradient of the wrong shape, or a state missing arrays, raise ValueError."""
    with pytest.raises(ValueError, match="grad"):
        Adam().step(np.zeros(4), np.ones(3))
    with pytest.raises(ValueError, match="step"):
        Adam().load_state_dict({"m": np.zeros(3), "v": np.zeros(3)})
    with pytest.raises(ValueError, match="'v'|v"):
        Adam().load_state_dict({"step": 1, "m": np.zeros(3)})


# ----------------------------------------------------------------------------- SGD


def test_sgd_by_hand():
    """lr=0.1 on [1, -2] with G1 then G2, without and with momentum 0.9."""
    plain, p = SGD(lr=0.1), np.array([1.0, -2.0])
    plain.step(p, G1)  # [1 - 0.05, -2 + 0.1]
    np.testing.assert_allclose(p, [0.95, -1.9], rtol=1e-15)
    plain.step(p, G2)  # [0.95 + 0.02, -1.9 - 0.04]
    np.testing.assert_allclose(p, [0.97, -1.94], rtol=1e-15)

    heavy, p = SGD(lr=0.1, momentum=0.9), np.array([1.0, -2.0])
    heavy.step(p, G1)  # velocity = G1 = [0.5, -1]
    np.testing.assert_allclose(p, [0.95, -1.9], rtol=1e-15)
    heavy.step(p, G2)  # velocity = 0.9 [0.5, -1] + [-0.2, 0.4] = [0.25, -0.5]
    np.testing.assert_allclose(heavy.state["velocity"], [0.25, -0.5], rtol=1e-15)
    np.testing.assert_allclose(p, [0.925, -1.85], rtol=1e-15)


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_sgd_matches_reference(momentum):
    """Trajectory equals the loop re-implementation."""
    params, grads = np.random.default_rng(10).normal(size=7), random_grads(seed=11)
    got = run(SGD(lr=0.03, momentum=momentum), params, grads)
    np.testing.assert_allclose(got, reference_sgd(params, grads, 0.03, momentum), rtol=1e-14)


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_sgd_matches_torch(momentum):
    """Same trajectory as torch.optim.SGD over 6 random steps, float64."""
    params, grads = np.random.default_rng(10).normal(size=7), random_grads(seed=11)
    got = run(SGD(lr=0.03, momentum=momentum), params, grads)
    expected = torch_trajectory(
        lambda torch, ps: torch.optim.SGD(ps, lr=0.03, momentum=momentum), params, grads)
    np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-15)


# ----------------------------------------------------------------------------- convergence


def quadratic(n=10, seed=0):
    """(gradient function, minimiser, largest curvature) of 0.5 x'Ax - b'x, A SPD."""
    rng = np.random.default_rng(seed)
    Q = rng.normal(size=(n, n))
    A = Q @ Q.T / n + 0.5 * np.eye(n)
    b = rng.normal(size=n)
    return (lambda x: A @ x - b), np.linalg.solve(A, b), np.linalg.eigvalsh(A).max()


def rosenbrock_grad(x):
    """Gradient of (1 - a)^2 + 100 (b - a^2)^2, minimum at (1, 1)."""
    a, b = x
    return np.array([-2 * (1 - a) - 400 * a * (b - a * a), 200 * (b - a * a)])


def steps_to_converge(optimizer, grad, x0, target, tol, max_steps):
    """Number of steps until ||x - target|| < tol (fails after max_steps)."""
    x = np.array(x0, dtype=np.float64)
    for step in range(1, max_steps + 1):
        optimizer.step(x, grad(x))
        if np.linalg.norm(x - target) < tol:
            return step
    pytest.fail(f"{optimizer!r} did not converge in {max_steps} steps: x = {x}")


def test_quadratic_convergence():
    """Adam, SGD and SGD with momentum reach the minimiser of a quadratic to 1e-6."""
    grad, x_star, curvature = quadratic()
    for optimizer, budget in ((Adam(lr=0.05), 1000), (SGD(lr=1 / curvature), 300),
                              (SGD(lr=0.5 / curvature, momentum=0.9), 1000)):
        steps_to_converge(optimizer, grad, np.zeros(10), x_star, 1e-6, budget)


def test_rosenbrock_convergence():
    """Adam and SGD with momentum reach (1, 1) from (-1.2, 1) to 1e-3."""
    for optimizer, budget in ((Adam(lr=0.02), 6000), (SGD(lr=2e-4, momentum=0.9), 12000)):
        steps_to_converge(optimizer, rosenbrock_grad, [-1.2, 1.0], np.ones(2), 1e-3, budget)


# ----------------------------------------------------------------------------- schedules, config


@pytest.mark.parametrize("decay", [0.0, 0.1, 2.5])
def test_inverse_time_decay(decay):
    """lr / (1 + decay * epoch) for several epochs."""
    schedule = InverseTimeDecay(decay)
    for epoch in (0, 1, 2, 7, 100):
        assert schedule(0.3, epoch) == pytest.approx(0.3 / (1 + decay * epoch), rel=1e-15)


def test_constant_lr():
    """The base rate at every epoch."""
    for epoch in (0, 1, 50):
        assert ConstantLR()(0.02, epoch) == 0.02


@pytest.mark.parametrize("schedule", [ConstantLR(), InverseTimeDecay(0.25)])
def test_schedule_config_round_trip(schedule):
    """config -> JSON -> schedule_from_config gives the same rates."""
    clone = schedule_from_config(json.loads(json.dumps(schedule.config())))
    assert type(clone) is type(schedule)
    for epoch in range(5):
        assert clone(0.1, epoch) == schedule(0.1, epoch)


def test_schedule_from_config_defaults_and_errors():
    """None means constant; an unknown name or a negative decay raise ValueError."""
    assert isinstance(schedule_from_config(None), ConstantLR)
    with pytest.raises(ValueError, match="schedule"):
        schedule_from_config({"name": "cosine"})
    with pytest.raises(ValueError, match="decay"):
        InverseTimeDecay(-0.1)
    with pytest.raises(ValueError, match="decay"):
        InverseTimeDecay(math.inf)


@pytest.mark.parametrize("optimizer", [Adam(lr=0.01, beta1=0.8, beta2=0.99, eps=1e-7),
                                       SGD(lr=0.2, momentum=0.5), SGD(lr=0.2)])
def test_optimizer_config_round_trip(optimizer):
    """optimizer_config -> JSON -> optimizer_from_config rebuilds the same hyperparameters."""
    config = json.loads(json.dumps(optimizer_config(optimizer)))
    clone = optimizer_from_config(config)
    assert type(clone) is type(optimizer) and clone.hyperparams() == optimizer.hyperparams()
    with pytest.raises(ValueError, match="optimizer"):
        optimizer_from_config({"name": "rmsprop"})


@pytest.mark.parametrize("make, word", [
    (lambda: Adam(lr=0), "lr"),
    (lambda: Adam(lr=-1e-3), "lr"),
    (lambda: Adam(lr=math.nan), "lr"),
    (lambda: Adam(lr=math.inf), "lr"),
    (lambda: Adam(beta1=1.0), "beta1"),
    (lambda: Adam(beta1=-0.1), "beta1"),
    (lambda: Adam(beta2=1.0), "beta2"),
    (lambda: Adam(beta2=1.5), "beta2"),
    (lambda: Adam(eps=0.0), "eps"),
    (lambda: Adam(eps=-1e-8), "eps"),
    (lambda: SGD(lr=0.0), "lr"),
    (lambda: SGD(momentum=-0.1), "momentum"),
    (lambda: SGD(momentum=1.0), "momentum"),
])
def test_bad_hyperparameters(make, word):
    """ValueError naming the argument."""
    with pytest.raises(ValueError, match=word):
        make()


@pytest.mark.parametrize("lr", [np.float32(0.01), np.float64(0.01), np.int64(1), 1])
def test_numpy_scalar_learning_rates_accepted(lr):
    """Any finite positive real scalar is a valid lr, including NumPy scalars."""
    assert Adam(lr=lr).lr == pytest.approx(float(lr))
    assert SGD(lr=lr).lr == pytest.approx(float(lr))


@pytest.mark.parametrize("make, name", [(lambda: Adam(lr=0.01), "m"), (lambda: Adam(lr=0.01), "v"),
                                        (lambda: SGD(lr=0.1, momentum=0.9), "velocity")])
def test_subnormal_state_is_flushed_every_16th_step(make, name):
    """A state value that is subnormal after the update becomes 0 at steps 16, 32, ...; at
    the other steps and for normal values, the state is what the formulas give."""
    tiny = np.finfo(np.float32).tiny
    optimizer = make()
    p = np.ones(4, dtype=np.float32)
    zero = np.zeros_like(p)
    optimizer.step(p, zero)
    start = np.array([tiny / 2, -tiny / 4, 4 * tiny, 1e-3], dtype=np.float32)
    decay = {"m": 0.9, "v": 0.999, "velocity": 0.9}[name]
    expected = start.copy()
    optimizer.state[name][...] = start
    for step in range(2, 17):
        optimizer.step(p, zero)
        expected = expected * np.float32(decay)  # a zero gradient adds nothing
        if step < 16:
            np.testing.assert_array_equal(optimizer.state[name], expected)
    flushed = np.where(np.abs(expected) < tiny, np.float32(0), expected)
    assert flushed[0] == flushed[1] == 0 and flushed[3] != 0
    np.testing.assert_array_equal(optimizer.state[name], flushed)
    assert optimizer.state["step"] == 16
