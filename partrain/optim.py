"""Optimizers over flat vectors (Adam, SGD) and learning-rate schedules.

An optimizer's state is a dict of plain data (ints and flat NumPy arrays in the params'
dtype), kept only by the master process; `state_dict()` / `load_state_dict()` round-trip it
through `.npz` checkpoints.
"""

from __future__ import annotations

import inspect
import math
import numbers

import numpy as np

from .checks import finite_number

# Every this many steps the optimizer state's subnormal values become 0 (see
# `Optimizer._flush_subnormals`).
FLUSH_SUBNORMALS_EVERY = 16


class Optimizer:
    """Common plumbing: lazy state allocation, size checks, state_dict round trip."""

    state_arrays: tuple[str, ...] = ()

    def __init__(self, lr: float):
        self.lr = finite_number("lr", lr)
        self.state: dict = {"step": 0}

    def _ensure_state(self, params: np.ndarray, grad: np.ndarray) -> None:
        if grad.shape != params.shape:
            raise ValueError(
                f"`grad` must have the shape of `params` {params.shape}, got {grad.shape}."
            )
        if self.state_arrays and self.state_arrays[0] not in self.state:
            for name in self.state_arrays:
                self.state[name] = np.zeros_like(params)
        elif self.state_arrays and self.state[self.state_arrays[0]].shape != params.shape:
            raise ValueError(
                f"Optimizer state holds {self.state[self.state_arrays[0]].size} values but "
                f"`params` has {params.size}: load a matching state or use a new optimizer."
            )
        elif self.state_arrays and self.state[self.state_arrays[0]].dtype != params.dtype:
            for name in self.state_arrays:  # e.g. float64 state loaded for a float32 run
                self.state[name] = self.state[name].astype(params.dtype)
        self._scratch = getattr(self, "_scratch", None)
        if self._scratch is None or self._scratch.shape != params.shape:
            self._scratch = np.empty_like(params)

    def step(self, params: np.ndarray, grad: np.ndarray) -> None:
        raise NotImplementedError

    def _flush_subnormals(self) -> None:
        """At every FLUSH_SUBNORMALS_EVERY-th step, set the state's subnormal values to 0.

        A parameter whose gradient is exactly 0 (a dead ReLU unit, a pixel that is always
        0) has its moments decay geometrically through the subnormal range, ~150 steps for
        Adam's m in float32, and x86 computes with subnormal operands up to 100x slower:
        Adam on the MLP took 0.75 ms per step after 1,000 steps instead of 0.20 ms with
        them flushed. Flushing is what flush-to-zero hardware modes do, here only for the
        state and only every few steps (three passes, ~2 us a step amortised).
        """
        if self.state["step"] % FLUSH_SUBNORMALS_EVERY:
            return
        keep = self._scratch  # 1.0 where a value is normal (or 0), 0.0 where it is subnormal
        for name in self.state_arrays:
            values = self.state[name]
            np.abs(values, out=keep)
            np.greater_equal(keep, np.finfo(values.dtype).tiny, out=keep, casting="unsafe")
            values *= keep

    def hyperparams(self) -> dict:
        """JSON-ready constructor arguments."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """{'step': int, <array name>: copy of the flat array, ...}."""
        return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in self.state.items()}

    def load_state_dict(self, state: dict, n_params: int | None = None) -> None:
        """Replace the state by a copy of `state`, after checking names and sizes."""
        names = [n for n in self.state_arrays if n in state]
        complete = len(names) == len(self.state_arrays) or (not names and state.get("step") == 0)
        if "step" not in state or not complete:
            raise ValueError(
                f"{type(self).__name__} state must hold 'step' and {list(self.state_arrays)}, "
                f"got {sorted(state)}."
            )
        for name in names:
            size = np.asarray(state[name]).size
            if n_params is not None and size != n_params:
                raise ValueError(
                    f"{type(self).__name__} state '{name}' holds {size} values, expected "
                    f"{n_params} (one per parameter)."
                )
        self.state = {"step": int(state["step"])}
        self.state.update({n: np.array(state[n], copy=True) for n in names})

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparams().items())
        return f"{type(self).__name__}({args})"


class Adam(Optimizer):
    """Adam, Algorithm 1 of Kingma & Ba (2015), with bias correction.

    For step t = 1, 2, ...::

        m = b1 m + (1 - b1) g
        v = b2 v + (1 - b2) g^2
        m_hat = m / (1 - b1^t);  v_hat = v / (1 - b2^t)
        params -= lr m_hat / (sqrt(v_hat) + eps)

    eps is added to sqrt(v_hat), as in PyTorch and optax (scikit-learn instead folds the bias
    correction into the step size). State: ``step`` (int t), ``m`` and ``v`` (flat arrays);
    their subnormal values become 0 every FLUSH_SUBNORMALS_EVERY steps.
    The update runs in place with `out=` arguments: no temporaries on the hot path.

    Three options give the variants some tutorials write (all off by default):
    ``bias_correction=False`` uses m and v themselves for m_hat and v_hat;
    ``eps_inside_sqrt=True`` divides by sqrt(v_hat + eps) instead;
    ``keep_moments=False`` starts m and v from 0 at every step (the NumPy CNN tutorial's
    ``adamGD`` re-creates them for each batch), so each step is
    ``lr (1 - b1) g / sqrt((1 - b2) g^2 + eps)``, close to a sign step of ``lr (1 - b1) /
    sqrt(1 - b2)``. With all three, and lr 0.01, beta1 0.95, beta2 0.99, eps 1e-7, this is the
    update of the tutorial of seed 003; see docs/results.md.
    """

    state_arrays = ("m", "v")

    def __init__(self, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8, bias_correction: bool = True, eps_inside_sqrt: bool = False,
                 keep_moments: bool = True):
        super().__init__(lr)
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {beta!r}.")
        if not eps > 0:
            raise ValueError(f"`eps` must be > 0, got {eps!r}.")
        for name, flag in (("bias_correction", bias_correction),
                           ("eps_inside_sqrt", eps_inside_sqrt), ("keep_moments", keep_moments)):
            if not isinstance(flag, (bool, np.bool_)):
                raise ValueError(f"`{name}` must be True or False, got {flag!r}.")
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.bias_correction, self.eps_inside_sqrt = bool(bias_correction), bool(eps_inside_sqrt)
        self.keep_moments = bool(keep_moments)

    def step(self, params: np.ndarray, grad: np.ndarray) -> None:
        """One update of `params` in place from the (averaged) gradient `grad`."""
        self._ensure_state(params, grad)
        s = self.state
        s["step"] += 1
        t, b1, b2 = s["step"], self.beta1, self.beta2
        m, v, tmp = s["m"], s["v"], self._scratch
        if not self.keep_moments:  # the tutorial's m and v, new for every batch
            m.fill(0.0)
            v.fill(0.0)
        m *= b1
        np.multiply(grad, 1.0 - b1, out=tmp)
        m += tmp                                              # m = b1 m + (1 - b1) g
        v *= b2
        np.multiply(grad, grad, out=tmp)
        tmp *= 1.0 - b2
        v += tmp                                              # v = b2 v + (1 - b2) g^2
        if not self.bias_correction or self.eps_inside_sqrt:
            self._variant_update(params, t)
            return
        np.sqrt(v, out=tmp)
        tmp *= 1.0 / math.sqrt(1.0 - b2 ** t)
        tmp += self.eps                                       # sqrt(v_hat) + eps
        np.divide(m, tmp, out=tmp)
        tmp *= self.lr / (1.0 - b1 ** t)                      # lr m_hat / (sqrt(v_hat) + eps)
        params -= tmp
        self._flush_subnormals()

    def _variant_update(self, params: np.ndarray, t: int) -> None:
        """The last step of a variant: params -= lr m_hat / (sqrt(v_hat + eps) or
        sqrt(v_hat) + eps), hats bias-corrected or not."""
        m, v, tmp = self.state["m"], self.state["v"], self._scratch
        correct = self.bias_correction
        np.multiply(v, 1.0 / (1.0 - self.beta2 ** t) if correct else 1.0, out=tmp)   # v_hat
        if self.eps_inside_sqrt:
            tmp += self.eps
            np.sqrt(tmp, out=tmp)                             # sqrt(v_hat + eps)
        else:
            np.sqrt(tmp, out=tmp)
            tmp += self.eps                                   # sqrt(v_hat) + eps
        np.divide(m, tmp, out=tmp)
        tmp *= self.lr / (1.0 - self.beta1 ** t) if correct else self.lr
        params -= tmp
        self._flush_subnormals()

    def hyperparams(self) -> dict:
        variant = {} if self.bias_correction and not self.eps_inside_sqrt and \
            self.keep_moments else {"bias_correction": self.bias_correction,
                                    "eps_inside_sqrt": self.eps_inside_sqrt,
                                    "keep_moments": self.keep_moments}
        return {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps,
                **variant}


class SGD(Optimizer):
    """Stochastic gradient descent with optional (heavy-ball) momentum, as torch.optim.SGD.

    ``velocity = momentum * velocity + g``; ``params -= lr * velocity``.
    State: ``step`` and, with momentum, ``velocity``.
    """

    def __init__(self, lr: float = 0.01, momentum: float = 0.0):
        super().__init__(lr)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1), got {momentum!r}.")
        self.momentum = float(momentum)
        self.state_arrays = ("velocity",) if self.momentum else ()

    def step(self, params: np.ndarray, grad: np.ndarray) -> None:
        """One update of `params` in place."""
        self._ensure_state(params, grad)
        self.state["step"] += 1
        direction = grad
        if self.momentum:
            velocity = self.state["velocity"]
            velocity *= self.momentum
            velocity += grad
            direction = velocity
        np.multiply(direction, self.lr, out=self._scratch)
        params -= self._scratch
        self._flush_subnormals()

    def hyperparams(self) -> dict:
        return {"lr": self.lr, "momentum": self.momentum}


OPTIMIZERS = {"adam": Adam, "sgd": SGD}


def optimizer_from_config(config: dict) -> Optimizer:
    """Rebuild an optimizer from {'name': 'adam', **hyperparams}."""
    config = dict(config)
    name = config.pop("name", None)
    if name not in OPTIMIZERS:
        raise ValueError(f"Invalid optimizer: {name!r}, expected one of {sorted(OPTIMIZERS)}.")
    return OPTIMIZERS[name](**config)


def optimizer_config(optimizer: Optimizer) -> dict:
    """{'name': ..., **hyperparams}: the inverse of `optimizer_from_config`."""
    names = {cls: name for name, cls in OPTIMIZERS.items()}
    return {"name": names[type(optimizer)], **optimizer.hyperparams()}


# ----------------------------------------------------------------------------- schedules


class ConstantLR:
    """The base learning rate at every epoch."""

    def __call__(self, base_lr: float, epoch: int) -> float:
        return base_lr

    def config(self) -> dict:
        return {"name": "constant"}


class InverseTimeDecay:
    """lr_epoch = lr / (1 + decay * epoch), epoch counted from 0."""

    def __init__(self, decay: float):
        self.decay = finite_number("decay", decay, strict=False)

    def __call__(self, base_lr: float, epoch: int) -> float:
        return base_lr / (1.0 + self.decay * epoch)

    def config(self) -> dict:
        return {"name": "inverse_time", "decay": self.decay}


class FunctionSchedule:
    """lr_epoch = fn(epoch), epoch counted from 0: a plain Python function, as Keras's
    `LearningRateScheduler(schedule)`. The base learning rate is not used.

    A checkpoint cannot hold a function: `config()` records its name only, marked as not
    restorable, and resuming asks for the function again (see `Trainer.from_checkpoint`).
    """

    def __init__(self, fn):
        if not callable(fn):
            raise ValueError(f"`lr_schedule` must be callable, got {fn!r}.")
        try:
            inspect.signature(fn).bind(0)
        except TypeError:
            raise ValueError(
                f"`lr_schedule` must be a function of one argument, the epoch (from 0), "
                f"returning the learning rate; {self.describe(fn)} cannot be called as fn(epoch)."
            ) from None
        except ValueError:  # no signature (some builtins): find out when it is called
            pass
        self.fn = fn

    @staticmethod
    def describe(fn) -> str:
        """'module.qualname' of a function (what a checkpoint records)."""
        name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
        return f"{getattr(fn, '__module__', None) or '?'}.{name}"

    def __call__(self, base_lr: float, epoch: int) -> float:
        lr = self.fn(epoch)
        ok = isinstance(lr, numbers.Real) and not isinstance(lr, (bool, np.bool_)) and \
            math.isfinite(lr) and lr > 0
        if not ok:
            raise ValueError(
                f"`lr_schedule` ({self.describe(self.fn)}) must return a finite number > 0, "
                f"got {lr!r} for epoch {epoch}."
            )
        return float(lr)

    def config(self) -> dict:
        return {"name": "function", "function": self.describe(self.fn), "restorable": False}


def schedule_from_config(config: dict | None):
    """Rebuild a schedule from its `config()`; None means constant.

    A function schedule cannot be rebuilt: ValueError saying which function to pass again.
    """
    if not config or config.get("name") == "constant":
        return ConstantLR()
    if config.get("name") == "inverse_time":
        return InverseTimeDecay(config["decay"])
    if config.get("name") == "function":
        raise ValueError(
            f"The lr schedule was the Python function {config.get('function')}, which a "
            "checkpoint cannot hold: pass it again (lr_schedule=...)."
        )
    raise ValueError(
        f"Invalid lr schedule: {config!r}, expected 'constant', 'inverse_time' or 'function'."
    )
