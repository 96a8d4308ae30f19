"""Two-sided numerical gradient check of any model, reported per named parameter."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .layers import Context
from .model import Sequential


class GradcheckResult(NamedTuple):
    """`rel_diff` = ||g_num - g|| / (||g_num|| + ||g||) over the checked entries."""

    rel_diff: float
    per_param: dict[str, float]  # the same ratio for each layout row, e.g. 'conv1.W'
    n_checked: int

    def passed(self, tol: float = 1e-6) -> bool:
        return self.rel_diff < tol


def _ratio(num: np.ndarray, ana: np.ndarray) -> float:
    denom = np.linalg.norm(num) + np.linalg.norm(ana)
    return float(np.linalg.norm(num - ana) / denom) if denom else 0.0


def gradcheck(model: Sequential, X, y, eps: float = 1e-7, *, n_params: int | None = None,
              seed: int = 0, ctx: Context | None = None) -> GradcheckResult:
    """Compare `model.loss_and_grad` with central differences, in float64.

    Parameters
    ----------
    model : Sequential
        Checked on a float64 copy at its current parameters; the model is not modified.
    X, y : inputs and class ids
    eps : float
        Step of the two-sided difference (L(p + eps) - L(p - eps)) / (2 eps).
    n_params : int, optional
        Check a random subset of this many parameters (seeded by `seed`) instead of all.
    ctx : Context, optional
        Training context; its key fixes the dropout masks across all evaluations.

    Returns
    -------
    GradcheckResult
    """
    model64 = model.copy(dtype="float64")
    X, y = model64.check_Xy(X, y)
    ctx = ctx or Context(training=True, key=(seed,))
    params = model64.params.copy()
    analytic = model64.loss_and_grad(params, X, y, ctx).grad
    indices = np.arange(params.size)
    if n_params is not None and n_params < params.size:
        indices = np.sort(np.random.default_rng(seed).choice(params.size, n_params, replace=False))
    numeric = np.empty(indices.size)
    for k, i in enumerate(indices):
        original = params[i]
        params[i] = original + eps
        plus = model64.loss_and_grad_unchecked(params, X, y, ctx).loss
        params[i] = original - eps
        minus = model64.loss_and_grad_unchecked(params, X, y, ctx).loss
        params[i] = original
        numeric[k] = (plus - minus) / (2 * eps)
    checked = analytic[indices]
    per_param = {}
    for row in model64.layout:
        mask = (indices >= row.start) & (indices < row.stop)
        if mask.any():
            per_param[row.name] = _ratio(numeric[mask], checked[mask])
    return GradcheckResult(_ratio(numeric, checked), per_param, int(indices.size))
