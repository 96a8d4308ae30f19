"""The command line of issue 12: a validation split that is not the test set, early stopping
and the best model (also across --resume), val_loss and the start-up line, evaluation that
needs only its split, class counts from the data, and `gradcheck MODEL.npz`."""

import json
import re

import numpy as np
import pytest
from conftest import SHARED_DATA, assert_ok, assert_usage_error, run_partrain

import partrain
from partrain import zoo
from partrain.data import load_dataset
from partrain.trainer import validation_split_point

SHARED = SHARED_DATA
TINY = ["--dataset", "synthetic", "--lr", "0.01"]  # digits-cnn, 1,024 synthetic 8x8 images


@pytest.fixture(scope="module")
def synthetic():
    """The synthetic set `train` builds for digits-cnn, and where its validation part starts."""
    data = load_dataset("synthetic", shape=(8, 8, 1))
    return data, validation_split_point(len(data.x_train), 0.1)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """12 epochs with --early-stopping 1 and --save-best: (cwd, process). Measured: val_loss
    improves until epoch 7, rises at epoch 8, so training stops after epoch 8."""
    cwd = tmp_path_factory.mktemp("stopped")
    proc = run_partrain("train", *TINY, "--epochs", 12, "--early-stopping", 1, "--save-best",
                        "best.npz", "--history", "h.json", "--quiet", cwd=cwd)
    assert_ok(proc)
    return cwd, proc


def test_validation_is_a_held_out_part_of_the_training_set(stopped_run, synthetic):
    """Default --validation-split 0.1: val_* are those of the last 103 of the 1,024 training
    images (not the test set), and the test set is reported once, at the end."""
    cwd, proc = stopped_run
    data, at = synthetic
    assert (at, len(data.x_train) - at) == (921, 103)
    history = json.loads((cwd / "h.json").read_text())
    model = partrain.load(cwd / "digits-cnn-synthetic.npz")  # the last epoch's
    assert model.metadata["validation_split"] == 0.1
    val_loss, val_acc = model.evaluate(data.x_train[at:], data.y_train[at:])
    assert history["val_loss"][-1] == pytest.approx(val_loss, rel=1e-6)
    assert history["val_accuracy"][-1] == pytest.approx(val_acc, abs=1e-12)
    test_acc = model.evaluate(data.x_test, data.y_test)[1]
    assert len(re.findall("test accuracy", proc.stdout)) == 1
    assert f"test accuracy {test_acc:.4f}" in proc.stdout
    assert test_acc != pytest.approx(val_acc)
    assert history["startup_s"][0] > 0 and set(history["startup_s"][1:]) == {0.0}


def test_epoch_lines_show_val_loss_and_one_start_up_line(tmp_path):
    proc = run_partrain("train", *TINY, "--epochs", 2, "--validation-split", 0.2, cwd=tmp_path)
    assert_ok(proc)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("epoch")]
    assert len(lines) == 2, proc.stdout
    assert all(re.search(r"val_loss \d\.\d{4}  val_acc \d\.\d{4}", line) for line in lines)
    assert len(re.findall(r"^start-up \d+\.\d\d s", proc.stdout, re.M)) == 1, proc.stdout
    assert "(819 train, 205 validation, 256 test)" in proc.stderr  # floor(1024 * 0.8)


def test_validation_split_0_turns_validation_off(tmp_path):
    proc = run_partrain("train", *TINY, "--epochs", 1, "--validation-split", 0, "--quiet",
                        "--history", "h.json", cwd=tmp_path)
    assert_ok(proc)
    history = json.loads((tmp_path / "h.json").read_text())
    assert history["val_loss"] == [] and len(history["loss"]) == 1


def test_early_stopping_stops_says_why_and_keeps_the_best_model(stopped_run, synthetic):
    cwd, proc = stopped_run
    data, at = synthetic
    history = json.loads((cwd / "h.json").read_text())
    n = len(history["loss"])
    best = int(np.argmin(history["val_loss"]))
    assert n < 12 and best == n - 2, history["val_loss"]  # patience 1: one worse epoch
    assert f"EarlyStopping: stopped after epoch {n}: val_loss" in proc.stderr, proc.stderr
    assert f"best model: epoch {best + 1}" in proc.stdout
    saved = partrain.load(cwd / "best.npz")
    val_loss = saved.evaluate(data.x_train[at:], data.y_train[at:])[0]
    assert val_loss == pytest.approx(history["val_loss"][best], rel=1e-6)
    last = partrain.load(cwd / "digits-cnn-synthetic.npz")  # the last epoch's (not restored)
    assert last.evaluate(data.x_train[at:], data.y_train[at:])[0] == pytest.approx(
        history["val_loss"][-1], rel=1e-6)


def test_resume_goes_on_stopping_and_saving_as_the_uninterrupted_run(stopped_run, tmp_path):
    """7 epochs (up to the best one), then --resume to 12: epoch 8 is worse than epoch 7
    only for an EarlyStopping that remembers epoch 7, so the resumed run stops after 8 and
    keeps epoch 7's model as the best, exactly as the uninterrupted run."""
    cwd, _ = stopped_run
    first = run_partrain("train", *TINY, "--epochs", 7, "--early-stopping", 1, "--save-best",
                         "best.npz", "--checkpoint", "ck.npz", "--quiet", cwd=tmp_path)
    assert_ok(first)
    resumed = run_partrain("train", "--resume", "ck.npz", "--epochs", 12, "--early-stopping", 1,
                           "--save-best", "best.npz", "--checkpoint", "ck.npz", "--quiet",
                           "--history", "h.json", cwd=tmp_path)
    assert_ok(resumed)
    assert "EarlyStopping: stopped after epoch 8" in resumed.stderr, resumed.stderr
    for name in ("best.npz", "digits-cnn-synthetic.npz"):
        np.testing.assert_array_equal(partrain.load(tmp_path / name).params,
                                      partrain.load(cwd / name).params)
    full, part = (json.loads((d / "h.json").read_text()) for d in (cwd, tmp_path))
    assert part["val_loss"] == full["val_loss"]
    # the checkpoint of the stopped run: resuming it again trains nothing
    again = run_partrain("train", "--resume", "ck.npz", "--epochs", 12, "--early-stopping", 1,
                         "--quiet", "--save", "again.npz", cwd=tmp_path)
    assert_ok(again)
    assert "stopped after epoch 8" in again.stderr and "no more epochs" in again.stderr
    np.testing.assert_array_equal(partrain.load(tmp_path / "again.npz").params,
                                  partrain.load(cwd / "digits-cnn-synthetic.npz").params)


def test_resume_cannot_change_the_validation_split(tmp_path):
    first = run_partrain("train", *TINY, "--epochs", 1, "--checkpoint", "ck.npz", "--quiet",
                         cwd=tmp_path)
    assert_ok(first)
    proc = run_partrain("train", "--resume", "ck.npz", "--validation-split", 0.2, "--quiet",
                        cwd=tmp_path)
    assert_usage_error(proc, "--validation-split 0.2 (checkpoint: 0.1)")


@pytest.mark.parametrize("args, needles", [
    (["--validation-split", "1"], ["--validation-split", "[0, 1)"]),
    (["--validation-split", "-0.5"], ["--validation-split"]),
    (["--early-stopping", "2", "--validation-split", "0"], ["--early-stopping", "val_loss"]),
    (["--save-best", "b.npz", "--validation-split", "0"], ["--save-best", "--validation-split"]),
    (["--early-stopping", "-1"], ["--early-stopping", ">= 0"]),
    (["--save-best", "m.npz", "--save", "m.npz"], ["--save", "--save-best", "m.npz"]),
], ids=["split-1", "split-negative", "stopping-without-validation", "best-without-validation",
        "negative-patience", "best-is-save"])
def test_bad_validation_options(args, needles, tmp_path):
    proc = run_partrain("train", *TINY, "--quiet", *args, cwd=tmp_path)
    assert_usage_error(proc, *needles)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_train_and_validation_splits(stopped_run, synthetic):
    """--split train is what the model trained on, --split validation the held-out rest."""
    cwd, _ = stopped_run
    data, at = synthetic
    model = partrain.load(cwd / "best.npz")
    for split, (X, y) in (("train", (data.x_train[:at], data.y_train[:at])),
                          ("validation", (data.x_train[at:], data.y_train[at:]))):
        proc = run_partrain("evaluate", "best.npz", "--split", split, cwd=cwd)
        assert_ok(proc)
        assert f"({split}, {len(y):,} examples)" in proc.stdout
        assert f"accuracy {model.evaluate(X, y)[1]:.4f}" in proc.stdout


def test_evaluate_signs_with_only_the_test_file(tmp_path):
    """Only data/signs/test_signs.npz exists: `--dataset signs --split test` works, and so does
    the same file as npz:PATH (the SIGNS layout x, y, classes)."""
    rng = np.random.default_rng(0)
    (tmp_path / "data" / "signs").mkdir(parents=True)
    test_file = tmp_path / "data" / "signs" / "test_signs.npz"
    np.savez(test_file, x=rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8),
             y=np.arange(6), classes=np.arange(6))
    model = zoo.signs_cnn()
    model.save(tmp_path / "s.npz")
    for dataset in ("signs", f"npz:{test_file}"):
        proc = run_partrain("evaluate", "s.npz", "--dataset", dataset, "--split", "test",
                            cwd=tmp_path)
        assert_ok(proc)
        assert "(test, 6 examples)" in proc.stdout
    proc = run_partrain("evaluate", "s.npz", "--dataset", "signs", "--split", "train",
                        cwd=tmp_path)
    assert_usage_error(proc, "train_signs")


def test_evaluate_mnist_with_only_the_t10k_files(tmp_path):
    """The shared MNIST folder holds only the two t10k files (real, checksummed)."""
    if not (SHARED / "mnist" / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"no t10k files in {SHARED / 'mnist'}")
    model = zoo.mlp(input_shape=(28, 28, 1))
    model.metadata.update(model="mlp", dataset="mnist", normalize="scale")
    model.save(tmp_path / "mlp.npz")
    proc = run_partrain("evaluate", "mlp.npz", "--data-dir", SHARED, cwd=tmp_path)
    assert_ok(proc)
    assert "mnist (test, 10,000 examples)" in proc.stdout


def test_train_on_an_npz_whose_labels_are_not_0_to_k(tmp_path):
    """Labels 0, 5 and 99: a 3-class network, and a note on stderr saying what was found."""
    rng = np.random.default_rng(0)
    labels = np.array([0, 5, 99])
    np.savez(tmp_path / "d.npz", x_train=rng.random((60, 4, 4, 1)),
             y_train=labels[np.arange(60) % 3], x_test=rng.random((9, 4, 4, 1)),
             y_test=labels[np.arange(9) % 3])
    proc = run_partrain("train", "--model", "mlp", "--dataset", "npz:d.npz", "--epochs", 1,
                        "--quiet", "--save", "m.npz", cwd=tmp_path)
    assert_ok(proc)
    assert re.search(r"note: .*d\.npz: the labels take 3 distinct values \(0, 5, 99\)",
                     proc.stderr), proc.stderr
    assert partrain.load(tmp_path / "m.npz").n_classes == 3


# ----------------------------------------------------------------------------- gradcheck


def test_gradcheck_a_saved_model_checks_every_array(stopped_run):
    cwd, _ = stopped_run
    proc = run_partrain("gradcheck", "best.npz", "--n-params", 20, cwd=cwd)
    assert_ok(proc)
    model = partrain.load(cwd / "best.npz")
    for row in model.layout:
        size = row.stop - row.start
        assert re.search(rf"^  {re.escape(row.name)}\s+\d\.\d{{3}}e-\d+  "
                         rf"\({min(size, 20):,} of {size:,}\)$", proc.stdout, re.M), proc.stdout
    assert "best.npz at its saved parameters" in proc.stdout
    assert re.search(r"^PASS: .* in 4 arrays", proc.stdout, re.M), proc.stdout


def test_gradcheck_model_file_and_model_name_together(tmp_path):
    assert_usage_error(run_partrain("gradcheck", "m.npz", "--model", "mlp", cwd=tmp_path),
                       "not both")
