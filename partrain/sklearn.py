"""A partrain network as a scikit-learn classifier: `NetClassifier` (Pipeline, GridSearchCV, ...).

Needs scikit-learn (`pip install "partrain[digits]"`); `import partrain` alone never imports it.
"""

from __future__ import annotations

import inspect
import math
import numbers

import numpy as np

try:
    from sklearn.base import BaseEstimator, ClassifierMixin
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import check_is_fitted, check_random_state
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        'partrain.sklearn needs scikit-learn: pip install "partrain[digits]" '
        "(or pip install scikit-learn)."
    ) from exc
try:
    from sklearn.utils.validation import validate_data  # scikit-learn >= 1.6
except ImportError:  # pragma: no cover - older scikit-learn: the estimator's own method
    validate_data = None

from . import zoo
from .callbacks import EarlyStopping
from .checks import positive_int
from .model import Sequential
from .optim import Adam
from .trainer import Trainer

__all__ = ["FIXED_INPUT_SKIPPED_CHECKS", "NetClassifier"]

_RANDOM_FEATURES = ("fits on 2 to 10 random features, which a network with a fixed input shape "
                    "(e.g. digits-cnn's 8x8x1 = 64) cannot take")
FIXED_INPUT_SKIPPED_CHECKS = {name: _RANDOM_FEATURES for name in (
    "check_classifier_data_not_an_array", "check_classifiers_classes",
    "check_classifiers_train", "check_dict_unchanged", "check_dont_overwrite_parameters",
    "check_dtype_object", "check_estimators_dtypes", "check_estimators_fit_returns_self",
    "check_estimators_nan_inf", "check_estimators_overwrite_params", "check_estimators_pickle",
    "check_f_contiguous_array_estimator", "check_fit2d_1feature", "check_fit2d_predict1d",
    "check_fit_check_is_fitted", "check_fit_idempotent", "check_fit_score_takes_y",
    "check_methods_sample_order_invariance", "check_methods_subset_invariance",
    "check_n_features_in", "check_n_features_in_after_fitting", "check_pipeline_consistency",
    "check_positive_only_tag_during_fit", "check_readonly_memmap_input",
    "check_supervised_y_2d",
)}
"""check_estimator checks skipped for a network with a fixed input shape (a zoo CNN), with
the reason; pass it as `expected_failed_checks`. The adaptive "mlp" skips none."""

_BUILD_ARGUMENTS = ("input_shape", "n_classes", "seed")  # what a model function may declare


class NetClassifier(ClassifierMixin, BaseEstimator):
    """A partrain network trained with Adam, as a scikit-learn classifier.

    Parameters
    ----------
    model : str or callable, default "mlp"
        A zoo name ("mlp", "digits-cnn", "mnist-cnn", "signs-cnn"), or a function returning a
        `partrain.Sequential`, called with those of `input_shape` (a tuple: X's example
        shape), `n_classes` (int) and `seed` (int) that it declares. "mlp" is Dense 100 -
        ReLU - Dense 100 - ReLU - Dense K, built for the data's feature count; the zoo CNNs
        have a fixed input shape (8x8x1, 28x28x1, 64x64x3) and get K outputs.
    epochs : int, default 10
    batch_size : int, default 32
    lr : float, default 1e-3
        Adam's learning rate.
    n_jobs : int, default 1
        Processes that compute each training step (see `partrain.Trainer`); results are
        the same for every value.
    random_state : None, int or numpy RandomState, default None
        Seeds initialisation, shuffling and dropout; None draws a seed from NumPy's global
        random state (as scikit-learn does), an int gives the same model every time.
    validation_split : float in [0, 1), default 0.0
        Hold out the LAST fraction of the training data (as Keras: shuffle your data first
        if it is ordered) for the per-epoch val_loss; 0 = none.
    early_stopping : None, bool or int, default None
        Patience: stop once the monitored loss (val_loss with a validation split, else the
        training loss) has not improved for this many epochs in a row, and keep the best
        epoch's weights (as scikit-learn's MLPClassifier does). True means 10 (MLPClassifier's
        n_iter_no_change); None or False: off.
    verbose : int, default 0
        0 silent; 1 progress bars and early-stopping messages on stderr.
    chunk_size : int or None, default None
        Examples per task; a step keeps at most batch_size / chunk_size processes busy.
        None: chosen from the network and batch size, never from n_jobs (see
        `partrain.Trainer`). The ParallelismWarning says which value splits a batch.

    Attributes
    ----------
    classes_ : ndarray
        The class labels seen in `fit`, sorted (any labels: strings, integers, ...).
    n_features_in_ : int
        Features per example (for image input: H * W * C).
    model_ : Sequential
        The trained network.
    input_shape_ : tuple
        The network's input shape: 2-D `X` (n, features) is reshaped to (n, *input_shape_),
        N-D `X` must have this shape already.
    history_ : dict
        The trainer's per-epoch history (loss, accuracy, val_loss, ..., lr).
    n_iter_ : int
        Epochs trained.

    Notes
    -----
    `sklearn.utils.estimator_checks.check_estimator` (scikit-learn 1.9) passes every check
    for the default `model="mlp"`, whose input layer takes the data's feature count: none is
    skipped by partrain. scikit-learn itself skips check_array_api_input (unless
    SCIPY_ARRAY_API is set) and check_classifier_data_not_an_array (without pandas), and
    generates no sample-weight checks (fit takes no `sample_weight`).

    With a zoo CNN ("digits-cnn", "mnist-cnn", "signs-cnn": a fixed input shape, any class
    count), the checks that fit on random data of 2 to 10 features do not apply and are
    skipped (`FIXED_INPUT_SKIPPED_CHECKS`, to pass as `expected_failed_checks`); all others
    pass. Skipped: check_classifier_data_not_an_array, check_classifiers_classes,
    check_classifiers_train, check_dict_unchanged, check_dont_overwrite_parameters,
    check_dtype_object, check_estimators_dtypes, check_estimators_fit_returns_self,
    check_estimators_nan_inf, check_estimators_overwrite_params, check_estimators_pickle,
    check_f_contiguous_array_estimator, check_fit2d_1feature, check_fit2d_predict1d,
    check_fit_check_is_fitted, check_fit_idempotent, check_fit_score_takes_y,
    check_methods_sample_order_invariance, check_methods_subset_invariance,
    check_n_features_in, check_n_features_in_after_fitting, check_pipeline_consistency,
    check_positive_only_tag_during_fit, check_readonly_memmap_input, check_supervised_y_2d.
    Each of them is exercised on the mlp instead.

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from partrain.sklearn import NetClassifier
    >>> X, y = load_digits(return_X_y=True)
    >>> clf = NetClassifier("digits-cnn", epochs=5, random_state=0).fit(X / 16, y)
    >>> clf.score(X / 16, y) > 0.9                                          # doctest: +SKIP
    True
    """

    def __init__(self, model="mlp", epochs=10, batch_size=32, lr=1e-3, n_jobs=1,
                 random_state=None, validation_split=0.0, early_stopping=None, verbose=0,
                 chunk_size=None):
        self.model = model
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.validation_split = validation_split
        self.early_stopping = early_stopping
        self.verbose = verbose
        self.chunk_size = chunk_size

    # ------------------------------------------------------------------ scikit-learn API

    def fit(self, X, y):
        """Build the network for (X, y) and train it for `epochs` epochs; returns self."""
        X, y = self._validate(X, y, reset=True)
        check_classification_targets(y)
        self.classes_, encoded = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(
                f"NetClassifier needs at least 2 classes in y, got 1 class "
                f"({self.classes_[0]!r})."
            )
        epochs = positive_int("epochs", self.epochs)
        patience = self._patience()
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        net = self._build(X, len(self.classes_), seed)
        callbacks = []
        if patience is not None:
            monitor = "val_loss" if self.validation_split else "loss"
            callbacks.append(EarlyStopping(monitor, patience=patience,
                                           restore_best_weights=True, verbose=self.verbose))
        trainer = Trainer(net, Adam(self.lr), n_jobs=self.n_jobs, batch_size=self.batch_size,
                          chunk_size=self.chunk_size, seed=seed, progress=bool(self.verbose))
        with trainer:
            history = trainer.fit(self._to_network(X, net.input_shape), encoded,
                                  epochs=int(epochs), validation_split=self.validation_split,
                                  callbacks=callbacks)
        self.model_ = net
        self.input_shape_ = net.input_shape
        self.history_ = history.history
        self.n_iter_ = trainer.epoch
        return self

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (n, len(classes_)), columns in the order of `classes_`.

        Computed in float64 from the trained (float32) parameters, so that an example's
        probabilities do not depend on the other examples of the call (float32 matrix
        products round differently for different batch sizes).
        """
        check_is_fitted(self)
        X, _ = self._validate(X, reset=False)
        return self.model_.copy("float64").predict_proba(self._to_network(X, self.input_shape_))

    def predict(self, X) -> np.ndarray:
        """The most probable class label of each example."""
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags

    # ------------------------------------------------------------------ helpers

    def _patience(self) -> int | None:
        value = self.early_stopping
        if value is None or value is False:
            return None
        if value is True:
            return 10
        if not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(
                f"`early_stopping` must be None, a bool or a patience >= 0, got {value!r}.")
        return int(value)

    def _validate(self, X, y=None, reset: bool = True):
        """scikit-learn's input checks on X flattened to (n, features); N-D X comes back in
        its own shape."""
        shape = X.shape if isinstance(X, np.ndarray) and X.ndim > 2 else None
        if shape is not None:
            X = X.reshape(len(X), -1)
        kwargs = {"reset": reset, "dtype": (np.float64, np.float32)}
        if validate_data is not None:
            out = validate_data(self, X, y, **kwargs) if y is not None else \
                validate_data(self, X, **kwargs)
        else:  # pragma: no cover
            out = self._validate_data(X, y, **kwargs) if y is not None else \
                self._validate_data(X, **kwargs)
        X, y = out if y is not None else (out, None)
        return (X if shape is None else X.reshape(shape)), y

    def _build(self, X: np.ndarray, n_classes: int, seed: int) -> Sequential:
        """The network for X's examples and n_classes classes."""
        spec, shape = self.model, tuple(X.shape[1:])
        if isinstance(spec, str):
            name = spec.replace("_", "-")
            if name == "mlp":
                net = zoo.mlp(dims=(math.prod(shape), 100, 100, n_classes), input_shape=shape,
                              seed=seed)
            else:
                net = zoo.get(name, seed=seed, n_classes=n_classes)
        elif callable(spec):
            try:
                params = inspect.signature(spec).parameters
            except (TypeError, ValueError):
                params = {}
            takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
            given = {"input_shape": shape, "n_classes": n_classes, "seed": seed}
            net = spec(**{k: v for k, v in given.items() if takes_all or k in params})
        else:
            raise ValueError(f"`model` must be a zoo name or a function returning a partrain "
                             f"Sequential, got {spec!r}.")
        if not isinstance(net, Sequential):
            raise ValueError(f"`model` {spec!r} returned {type(net).__name__}, expected a "
                             "partrain Sequential.")
        if net.n_classes != n_classes:
            raise ValueError(f"`model` {spec!r} has {net.n_classes} outputs, but y has "
                             f"{n_classes} classes: they must be equal.")
        self._to_network(X[:0], net.input_shape)  # a shape mismatch fails now
        return net

    @staticmethod
    def _to_network(X: np.ndarray, input_shape: tuple) -> np.ndarray:
        """X (n, features) reshaped to (n, *input_shape); N-D X must match it already."""
        size = math.prod(input_shape)
        if X.ndim == 2 and X.shape[1] == size:
            return X.reshape(len(X), *input_shape)
        if X.shape[1:] != tuple(input_shape):
            shape = ", ".join(map(str, input_shape))
            raise ValueError(f"X has examples of shape {X.shape[1:]}, but the network takes "
                             f"({shape}) inputs: give X of shape (n, {size}) or (n, {shape}).")
        return X
