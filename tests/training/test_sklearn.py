"""partrain.sklearn.NetClassifier: scikit-learn's own estimator checks, Pipeline,
cross_val_score, GridSearchCV, string labels, 2-D input reshaped for a CNN, early stopping."""

import math
import subprocess
import sys

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn", reason="partrain.sklearn needs scikit-learn")
from sklearn.base import clone  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import check_estimator  # noqa: E402

from partrain import zoo  # noqa: E402
from partrain.sklearn import FIXED_INPUT_SKIPPED_CHECKS, NetClassifier  # noqa: E402

NAMES = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                  "nine"])


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's 1,797 digits as 64 features in [0, 1], and their labels as words."""
    X, y = load_digits(return_X_y=True)
    return X / 16, NAMES[y]


# ----------------------------------------------------------------------------- sklearn's checks


def test_check_estimator_passes_every_check():
    """The default (mlp) network: scikit-learn's checks, none skipped by partrain (pandas and
    array-API checks are skipped by scikit-learn when those are absent)."""
    results = check_estimator(NetClassifier(random_state=0), on_fail=None)
    failed = {r["check_name"]: r["exception"] for r in results if r["status"] == "failed"}
    assert not failed, failed
    skipped = {r["check_name"] for r in results if r["status"] == "skipped"}
    assert skipped <= {"check_array_api_input", "check_classifier_data_not_an_array"}
    assert len(results) > 40


def test_check_estimator_with_a_fixed_input_shape_fails_exactly_the_listed_checks():
    """digits-cnn (8x8x1): exactly the checks listed as not applying fail, each because it
    fits on a few random features; with them skipped, everything else passes."""
    estimator = NetClassifier("digits-cnn", epochs=2, random_state=0)
    results = check_estimator(estimator, on_fail=None)
    failed = {r["check_name"]: r["exception"] for r in results if r["status"] == "failed"}
    assert set(failed) == set(FIXED_INPUT_SKIPPED_CHECKS)
    for name, exc in failed.items():
        chain = [exc, exc.__cause__, exc.__context__]
        assert any("network takes (8, 8, 1)" in str(e) for e in chain if e) or \
            name in ("check_fit2d_1feature", "check_positive_only_tag_during_fit"), (name, exc)
    check_estimator(estimator, expected_failed_checks=FIXED_INPUT_SKIPPED_CHECKS)


# ----------------------------------------------------------------------------- meta-estimators


def test_in_a_pipeline_with_string_labels(digits):
    X, y = digits
    pipe = make_pipeline(StandardScaler(), NetClassifier(epochs=8, random_state=0))
    pipe.fit(X[:1200], y[:1200])
    clf = pipe[-1]
    assert list(clf.classes_) == sorted(NAMES) and clf.n_features_in_ == 64
    predicted = pipe.predict(X[1200:])
    assert predicted.dtype.kind == "U" and set(predicted) <= set(NAMES)
    print("pipeline score", pipe.score(X[1200:], y[1200:]))
    assert pipe.score(X[1200:], y[1200:]) > 0.85
    proba = pipe.predict_proba(X[1200:])
    assert proba.shape == (597, 10) and np.allclose(proba.sum(axis=1), 1)
    np.testing.assert_array_equal(clf.classes_[proba.argmax(axis=1)], predicted)


def test_cross_val_score(digits):
    X, y = digits
    scores = cross_val_score(NetClassifier("digits-cnn", epochs=6, lr=3e-3, random_state=0),
                             X, y, cv=3)
    print("cross_val_score", scores)
    assert scores.shape == (3,) and scores.min() > 0.85, scores


def test_grid_search(digits):
    X, y = digits
    search = GridSearchCV(NetClassifier(epochs=4, random_state=0),
                          {"lr": [1e-4, 3e-3], "batch_size": [16]}, cv=2)
    search.fit(X, y)
    assert search.best_params_ == {"batch_size": 16, "lr": 3e-3}  # 1e-4 is far too slow
    assert search.best_estimator_.lr == 3e-3 and search.best_estimator_.n_iter_ == 4
    print("grid search", search.cv_results_["mean_test_score"], search.score(X, y))
    assert search.score(X, y) > 0.85


def test_params_round_trip_and_clone():
    clf = NetClassifier("digits-cnn", epochs=3, early_stopping=2)
    params = clf.get_params()
    assert params == {"model": "digits-cnn", "epochs": 3, "batch_size": 32, "lr": 1e-3,
                      "n_jobs": 1, "random_state": None, "validation_split": 0.0,
                      "early_stopping": 2, "verbose": 0, "chunk_size": None}
    assert clf.set_params(lr=0.01, epochs=5) is clf and clf.lr == 0.01 and clf.epochs == 5
    assert clone(clf).get_params() == clf.get_params()


# ----------------------------------------------------------------------------- networks, input


def test_2d_input_is_reshaped_to_a_cnn_input_shape(digits):
    X, y = digits
    clf = NetClassifier("digits-cnn", epochs=3, random_state=0).fit(X, y)
    assert clf.model_.input_shape == clf.input_shape_ == (8, 8, 1)
    images = X.reshape(-1, 8, 8, 1)
    np.testing.assert_array_equal(clf.predict(images), clf.predict(X))
    with pytest.raises(ValueError, match=r"network takes \(8, 8, 1\) inputs"):
        NetClassifier("digits-cnn", epochs=1).fit(X[:, :60], y)
    with pytest.raises(ValueError, match="60 features"):  # scikit-learn's own check
        clf.predict(X[:, :60])


def test_a_model_function_gets_shape_classes_and_seed(digits):
    X, y = digits
    seen = {}

    def small(input_shape, n_classes, seed):
        seen.update(input_shape=input_shape, n_classes=n_classes)
        return zoo.mlp(dims=(math.prod(input_shape), 16, n_classes), seed=seed)

    clf = NetClassifier(small, epochs=2, random_state=0).fit(X[:100], y[:100])
    assert seen == {"input_shape": (64,), "n_classes": len(set(y[:100]))}
    assert clf.model_.n_params == 64 * 16 + 16 + 16 * len(clf.classes_) + len(clf.classes_)
    with pytest.raises(ValueError, match="returned int"):
        NetClassifier(lambda: 3).fit(X[:50], y[:50])


def test_random_state_makes_fits_repeatable(digits):
    X, y = digits
    a, b, c = (NetClassifier(epochs=2, random_state=s).fit(X, y) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.model_.params, b.model_.params)
    assert not np.array_equal(a.model_.params, c.model_.params)


def test_early_stopping_on_the_validation_split(digits):
    """early_stopping=0 with a validation split: Keras's rule on val_loss (stop at the first
    epoch that is not better than the best so far), best weights kept."""
    X, y = digits
    clf = NetClassifier(epochs=30, lr=0.02, validation_split=0.2, early_stopping=0,
                        random_state=0).fit(X, y)
    val = clf.history_["val_loss"]
    stop = next((i for i in range(1, len(val)) if not val[i] < min(val[:i])), None)
    assert stop is not None and clf.n_iter_ == stop + 1 == len(val)
    at = math.floor(len(X) * 0.8)  # the last 20 % are held out (Keras's rule)
    proba = clf.predict_proba(X[at:])
    log_loss = -np.mean(np.log(proba[np.arange(len(X) - at), np.searchsorted(clf.classes_,
                                                                             y[at:])]))
    assert log_loss == pytest.approx(min(val), rel=1e-5)  # the best epoch's weights


@pytest.mark.parametrize("params, match", [
    ({"epochs": 0}, "epochs"), ({"lr": -1.0}, "lr"), ({"batch_size": 0}, "batch_size"),
    ({"early_stopping": -2}, "early_stopping"), ({"validation_split": 1.5}, "validation_split"),
    ({"model": "resnet"}, "resnet"), ({"model": 3}, "model"),
])
def test_bad_parameters_fail_at_fit_with_their_name(params, match, digits):
    X, y = digits
    clf = NetClassifier(**params)  # scikit-learn: no validation in __init__
    with pytest.raises(ValueError, match=match):
        clf.fit(X[:50], y[:50])


# ----------------------------------------------------------------------------- optional dependency


def test_partrain_alone_does_not_import_sklearn_and_the_estimator_says_what_to_install():
    code = ("import sys; import partrain; assert 'sklearn' not in sys.modules, 'imported'; "
            "sys.modules['sklearn'] = None\n"
            "try:\n    import partrain.sklearn\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert 'pip install "partrain[digits]"' in out, out
