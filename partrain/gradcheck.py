"""Two-sided numerical gradient check of any model, reported per named parameter."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .checks import positive_int
from .layers import Context
from .model import Sequential


class GradcheckResult(NamedTuple):
    """`rel_diff` = ||g_num - g|| / (||g_num|| + ||g||) over the entries compared.

    An entry whose +eps or -eps evaluation changes an activation pattern (a ReLU switching,
    a max-pool window taking another input: see `Layer.activation_pattern`) straddles a kink,
    where the loss has no derivative and a central difference means nothing; such entries
    are counted in `kinks` and left out of every ratio, which are computed over the rest.
    """

    rel_diff: float
    per_param: dict[str, float]  # the same ratio for each layout row (nan: nothing compared)
    n_checked: int  # entries compared (drawn, minus those at kinks)
    checked: dict[str, tuple[int, int]]  # per layout row: (entries compared, entries)
    kinks: dict[str, int] = {}  # per layout row: entries drawn whose +-eps straddled a kink
    kink_examples: tuple[int, ...] = ()  # the examples whose patterns those steps changed

    @property
    def n_kinks(self) -> int:
        """Entries drawn but not compared: their +-eps evaluations straddled a kink."""
        return sum(self.kinks.values())

    def passed(self, tol: float = 1e-6) -> bool:
        """The relative difference of the entries compared is below `tol` (none compared:
        False)."""
        return self.n_checked > 0 and self.rel_diff < tol


def _ratio(num: np.ndarray, ana: np.ndarray) -> float:
    denom = np.linalg.norm(num) + np.linalg.norm(ana)
    return float(np.linalg.norm(num - ana) / denom) if denom else 0.0


def sample_entries(layout, n_params: int | None, seed: int = 0) -> np.ndarray:
    """Sorted flat indices to check: min(size, n_params) entries of EVERY layout row, drawn
    without replacement (seeded), so that no array, however small, goes unchecked."""
    rng = np.random.default_rng(seed)
    picks = []
    for row in layout:
        size = row.stop - row.start
        if n_params is None or n_params >= size:
            picks.append(np.arange(row.start, row.stop))
        else:
            picks.append(row.start + np.sort(rng.choice(size, n_params, replace=False)))
    return np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)


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
        Check this many entries of EACH parameter array (all of a smaller one), drawn at
        random (seeded by `seed`), instead of every entry: every array is checked and
        reported, biases included.
    ctx : Context, optional
        Training context; its key fixes the dropout masks across all evaluations.

    Returns
    -------
    GradcheckResult
        The overall relative difference, one per parameter array (`per_param`, every row of
        `model.layout`), how many entries of each were compared (`checked`), and how many
        were left out because their +-eps evaluations straddled a kink (`kinks`), with the
        examples concerned (`kink_examples`).
    """
    positive_int("n_params", n_params, allow_none=True)
    model64 = model.copy(dtype="float64")
    X, y = model64.check_Xy(X, y)
    ctx = ctx or Context(training=True, key=(seed,))
    params = model64.params.copy()
    analytic = model64.loss_and_grad(params, X, y, ctx).grad
    pattern = model64.activation_patterns(X, params, ctx)
    indices = sample_entries(model64.layout, n_params, seed)
    numeric = np.empty(indices.size)
    straddled = np.zeros((indices.size, len(X)), dtype=bool)  # entry k moved example j's pattern
    for k, i in enumerate(indices):
        original = params[i]
        losses = []
        for step in (eps, -eps):
            params[i] = original + step
            losses.append(model64.loss_and_grad_unchecked(params, X, y, ctx).loss)
            straddled[k] |= (model64.activation_patterns(X, params, ctx) != pattern).any(axis=1)
        params[i] = original
        numeric[k] = (losses[0] - losses[1]) / (2 * eps)
    smooth = ~straddled.any(axis=1)
    per_param, counts, kinks = {}, {}, {}
    for row in model64.layout:
        drawn = (indices >= row.start) & (indices < row.stop)
        mask = drawn & smooth
        per_param[row.name] = _ratio(numeric[mask], analytic[indices[mask]]) if mask.any() \
            else float("nan")
        counts[row.name] = (int(mask.sum()), row.stop - row.start)
        kinks[row.name] = int((drawn & ~smooth).sum())
    return GradcheckResult(_ratio(numeric[smooth], analytic[indices[smooth]]), per_param,
                           int(smooth.sum()), counts, kinks,
                           tuple(int(j) for j in np.flatnonzero(straddled.any(axis=0))))
