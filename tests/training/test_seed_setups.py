"""The seeds' set-ups (issue 21): the training scripts validate on held-out training images,
never on the test set; the tutorial's set-up is what its article writes; each set-up trains
bit-identically with 1 and 2 processes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, write_mnist_like_npz

from partrain import Trainer, optim, zoo
from partrain.trainer import validation_split_point

SCRIPTS = ROOT / "scripts"


def load_script(name: str, monkeypatch):
    """scripts/NAME.py as a module (its folder on sys.path for _tutorial_run)."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_npz(tmp_path) -> Path:
    return write_mnist_like_npz(tmp_path / "tiny.npz", 120, 40)


@pytest.fixture
def recorded_fits(monkeypatch):
    """Every Trainer.fit call's arguments; the fit itself still runs."""
    calls = []
    real_fit = Trainer.fit

    def fit(self, X, y, **kwargs):
        calls.append({"n": len(X), **kwargs})
        return real_fit(self, X, y, **kwargs)

    monkeypatch.setattr(Trainer, "fit", fit)
    return calls


@pytest.mark.parametrize(("script", "extra"), [
    ("train_mnist", []), ("train_mnist", ["--setup", "article"]), ("train_mlp", ["--batchnorm"]),
    ("train_signs", None)])
def test_scripts_validate_on_held_out_training_images_not_the_test_set(
        script, extra, tiny_npz, recorded_fits, monkeypatch, capsys, tmp_path):
    module = load_script(script, monkeypatch)
    if extra is None:  # SIGNS: a train and a test file of the SIGNS layout
        rng = np.random.default_rng(1)
        for name, n in (("train", 30), ("test", 12)):
            np.savez(tmp_path / f"{name}.npz", x=rng.integers(0, 256, (n, 64, 64, 3), np.uint8),
                     y=np.arange(n) % 6, classes=np.array([str(i) for i in range(6)]))
        argv = ["--train", str(tmp_path / "train.npz"), "--test", str(tmp_path / "test.npz")]
    else:
        argv = ["--dataset", f"npz:{tiny_npz}", *extra]
    assert module.main([*argv, "--epochs", "1", "--quiet"]) == 0
    (call,) = recorded_fits
    assert call.get("validation_data") is None
    expected = 1 / 6 if extra == ["--setup", "article"] else 0.1
    assert call["validation_split"] == pytest.approx(expected)
    assert "test accuracy" in capsys.readouterr().out


def test_the_article_setup_trains_on_the_first_50000_images(monkeypatch):
    module = load_script("train_mnist", monkeypatch)
    args = module.parse_args(["--setup", "article"])
    assert validation_split_point(60000, args.validation_split) == 50000
    model, opt = module.build(args.resolved, seed=0)
    assert (opt.lr, opt.beta1, opt.beta2, opt.eps) == (0.01, 0.95, 0.99, 1e-7)
    assert opt.bias_correction is False and opt.eps_inside_sqrt is True
    assert opt.keep_moments is False  # the tutorial's adamGD makes new m and v per batch
    assert args.resolved["normalize"] == "standardize-int"
    inits = [layer.config().get("init") for layer in model.layers if layer.param_specs()]
    assert inits == ["array", "array", "small", "small"]
    # one part changed, the rest kept
    args = module.parse_args(["--setup", "article", "--adam", "standard", "--lr", "0.001"])
    model, opt = module.build(args.resolved, seed=0)
    assert opt.bias_correction is True and opt.lr == 0.001 and opt.beta1 == 0.95
    partrain_args = module.parse_args([])
    _, opt = module.build(partrain_args.resolved, seed=0)
    assert opt.hyperparams() == optim.Adam(1e-3).hyperparams()


def _setups(monkeypatch):
    """(name, model factory, optimizer factory, batch size, lr decay) of each seed's set-up."""
    module = load_script("train_mnist", monkeypatch)
    article = module.parse_args(["--setup", "article"]).resolved
    partrain = module.parse_args([]).resolved
    return [
        ("seed 003, partrain", lambda: module.build(partrain, 0)[0],
         lambda: module.build(partrain, 0)[1], 32, None),
        ("seed 003, article", lambda: module.build(article, 0)[0],
         lambda: module.build(article, 0)[1], 32, None),
        ("seed 002", lambda: zoo.mlp(batchnorm=True, input_shape=(28, 28, 1), seed=0),
         lambda: optim.Adam(1e-3), 64, 0.01),
    ]


@pytest.mark.parametrize("which", [0, 1, 2])
def test_each_setup_is_bit_identical_with_1_and_2_processes(which, monkeypatch):
    _, make_model, make_opt, batch, decay = _setups(monkeypatch)[which]
    rng = np.random.default_rng(which)
    x = rng.random((160, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, 160)
    finals = []
    for n_jobs in (1, 2):
        model = make_model()
        with Trainer(model, make_opt(), n_jobs=n_jobs, batch_size=batch, chunk_size=16, seed=0,
                     lr_schedule=decay, progress=False) as trainer:
            trainer.fit(x, y, epochs=2, validation_split=0.1)
        finals.append((model.params.tobytes(), model.buffers.tobytes()))
    assert finals[0] == finals[1]
