"""The ParallelismWarning's advice can be followed wherever it is given (NetClassifier's
`chunk_size`, the training scripts' --chunk-size), and the same cause is said once per
process (a GridSearchCV fitting one configuration many times), unless asked "always"."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
from conftest import ROOT, subprocess_env

from partrain import ParallelismWarning, Trainer, parallel, zoo

sklearn = pytest.importorskip("sklearn", reason="partrain.sklearn needs scikit-learn")
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import GridSearchCV  # noqa: E402

from partrain.sklearn import NetClassifier  # noqa: E402


@pytest.fixture
def fresh_process(monkeypatch):
    """Nothing said yet, and Python's default filter for the warning (shown, not raised)."""
    monkeypatch.setattr(parallel, "_SAID", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        yield caught


def parallelism(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, ParallelismWarning)]


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X[:300] / 16, y[:300]


def test_net_classifier_follows_the_advice(digits, fresh_process):
    """The default chunk of digits-cnn at batch 32 is the whole batch: the warning says
    chunk_size=16; NetClassifier takes it (it raised TypeError) and then warns no more."""
    X, y = digits
    clf = NetClassifier("digits-cnn", epochs=1, n_jobs=2, chunk_size=16, random_state=0)
    assert clf.fit(X, y).n_iter_ == 1 and clf.get_params()["chunk_size"] == 16
    assert parallelism(fresh_process) == []  # the "must show"
    NetClassifier("digits-cnn", epochs=1, n_jobs=2, random_state=0).fit(X, y)
    (advice,) = parallelism(fresh_process)
    assert "use chunk_size=16 to split" in advice


def test_grid_search_says_the_same_cause_once(digits, fresh_process):
    """7 fits (3 folds x 2 + the refit) of n_jobs=2 with one chunk per step: one warning."""
    X, y = digits
    search = GridSearchCV(NetClassifier("digits-cnn", n_jobs=2, chunk_size=32),
                          {"epochs": [1, 2]}, cv=3).fit(X, y)
    assert search.best_params_["epochs"] in (1, 2)
    said = parallelism(fresh_process)
    assert len(said) == 1 and "use chunk_size=16" in said[0], said


def test_a_different_cause_is_said_too_and_always_means_always(fresh_process):
    model = zoo.digits_cnn()
    for _ in range(2):
        Trainer(model, n_jobs=2, batch_size=32, chunk_size=32, progress=False).close()
        Trainer(model, n_jobs=3, batch_size=32, chunk_size=32, progress=False).close()
    said = parallelism(fresh_process)
    assert [s.split(" but")[0] for s in said] == ["n_jobs=2", "n_jobs=3"], said
    for _ in range(2):  # pytest.warns asks for "always"
        with pytest.warns(ParallelismWarning, match="n_jobs=2 but 1 chunk"):
            Trainer(model, n_jobs=2, batch_size=32, chunk_size=32, progress=False).close()


@pytest.mark.parametrize("chunk, warned", [(32, True), (16, False)])
def test_training_scripts_take_chunk_size(chunk, warned, tmp_path):
    """train_mnist.py at batch 32, n_jobs 2: --chunk-size 32 leaves one chunk per step (the
    warning), --chunk-size 16 splits it."""
    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, x_train=rng.integers(0, 256, (64, 28, 28), dtype=np.uint8),
             y_train=np.arange(64) % 10,
             x_test=rng.integers(0, 256, (32, 28, 28), dtype=np.uint8),
             y_test=np.arange(32) % 10)
    env = {**subprocess_env(), "PYTHONWARNINGS": "default"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_mnist.py"), "--dataset",
                           f"npz:{data}", "--epochs", "1", "--n-jobs", "2", "--chunk-size",
                           str(chunk), "--quiet"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr
    assert ("1 chunk per step" in proc.stderr) == warned, proc.stderr  # the "note:" line
