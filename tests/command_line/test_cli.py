"""The `partrain` command line, end to end in subprocesses: train (defaults, history, plot,
checkpoint/resume), evaluate, gradcheck, --help, and one-line usage errors (exit status 2)."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import (
    MNIST_FILES,
    PNG_MAGIC,
    assert_ok,
    assert_usage_error,
    run_partrain,
    subprocess_env,
)

import partrain
from partrain.data import load_dataset


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn", reason="the digits dataset needs scikit-learn")
    return load_dataset("digits")


@pytest.fixture(scope="module")
def two_epoch_run(digits, tmp_path_factory):
    """`partrain train --epochs 2 --n-jobs 2` with --history, --plot and --save, in a tmp cwd."""
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib")
    cwd = tmp_path_factory.mktemp("two_epochs")
    proc = run_partrain("train", "--epochs", 2, "--quiet", "--n-jobs", 2, "--history", "h.json",
                        "--plot", "plots", "--save", "m.npz", cwd=cwd)
    assert_ok(proc)
    return cwd, proc


@pytest.fixture(scope="module")
def one_epoch_checkpoint(digits, tmp_path_factory):
    """A 1-epoch run with --checkpoint: the checkpoint file."""
    cwd = tmp_path_factory.mktemp("one_epoch")
    assert_ok(run_partrain("train", "--epochs", 1, "--quiet", "--checkpoint", "ck.npz",
                           "--save", "one.npz", cwd=cwd))
    assert (cwd / "ck.npz").is_file()
    return cwd / "ck.npz"


# ----------------------------------------------------------------------------- train


def test_train_with_the_real_defaults_learns_digits(digits, tmp_path):
    """`partrain train` alone: digits-cnn on digits, 10 epochs; the saved model is good."""
    proc = run_partrain("train", "--quiet", cwd=tmp_path)
    assert_ok(proc)
    assert proc.elapsed < 60, f"the default run took {proc.elapsed:.0f} s"
    assert (tmp_path / "digits-cnn-digits.npz").is_file(), sorted(
        p.name for p in tmp_path.iterdir())
    model = partrain.load(tmp_path / "digits-cnn-digits.npz")
    loss, acc = model.evaluate(digits.x_test, digits.y_test)
    assert acc > 0.9, acc
    printed = re.search(r"test accuracy (\d\.\d+)\s+test loss (\d+\.\d+)\s+wall time ([\d.]+) s",
                        proc.stdout)
    assert printed, proc.stdout
    assert float(printed[1]) == pytest.approx(acc, abs=1e-4)
    assert float(printed[2]) == pytest.approx(loss, abs=1e-4)
    assert model.metadata.get("model") == "digits-cnn"
    assert model.metadata.get("dataset") == "digits"


def test_train_two_epochs_writes_a_loadable_model(two_epoch_run, digits):
    cwd, proc = two_epoch_run
    assert "model saved to m.npz" in proc.stdout
    model = partrain.load(cwd / "m.npz")
    assert model.input_shape == (8, 8, 1) and model.n_classes == 10
    _, acc = model.evaluate(digits.x_test, digits.y_test)
    assert acc > 0.5, acc


def test_history_json_has_per_epoch_lists(two_epoch_run):
    cwd, _ = two_epoch_run
    history = json.loads((cwd / "h.json").read_text())
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "examples_per_s",
                "epoch_time_s", "lr"):
        values = history[key]
        assert isinstance(values, list) and len(values) == 2, (key, values)
        assert all(isinstance(v, (int, float)) and np.isfinite(v) for v in values), (key, values)
    assert history["loss"][1] < history["loss"][0]
    assert all(0 <= a <= 1 for a in history["accuracy"] + history["val_accuracy"])


def test_history_into_a_new_folder(tmp_path):
    """--history out/h.json creates out/ like --save out/m.npz and --plot out/ do, instead of
    failing after the training with exit 2."""
    proc = run_partrain("train", "--dataset", "synthetic", "--epochs", 1, "--quiet",
                        "--history", "out/h.json", "--save", "models/m.npz", cwd=tmp_path)
    assert_ok(proc)
    assert (tmp_path / "models" / "m.npz").is_file()
    assert len(json.loads((tmp_path / "out" / "h.json").read_text())["loss"]) == 1


def test_plot_writes_history_png(two_epoch_run):
    cwd, proc = two_epoch_run
    png = cwd / "plots" / "history.png"
    assert png.is_file(), proc.stdout
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_resume_continues_bit_for_bit(two_epoch_run, one_epoch_checkpoint, tmp_path):
    """1 epoch (n_jobs=1) + --resume to --epochs 2 (n_jobs=2) == 2 uninterrupted epochs
    (n_jobs=2). --dataset is given: see the test below for the run without it."""
    proc = run_partrain("train", "--resume", one_epoch_checkpoint, "--epochs", 2,
                        "--dataset", "digits", "--n-jobs", 2, "--save", "resumed.npz",
                        cwd=tmp_path)
    assert_ok(proc)
    assert "epoch   2/2" in proc.stdout and "epoch   1/2" not in proc.stdout, proc.stdout
    full = partrain.load(two_epoch_run[0] / "m.npz")
    resumed = partrain.load(tmp_path / "resumed.npz")
    assert np.array_equal(full.params, resumed.params)
    assert np.array_equal(full.buffers, resumed.buffers)


def test_resume_takes_model_and_dataset_from_the_checkpoint(one_epoch_checkpoint, tmp_path):
    """`train --resume CK --epochs 2` alone must continue the checkpoint's run: digits-cnn on
    digits, saved as digits-cnn-digits.npz with its metadata (so `evaluate` works on it)."""
    proc = run_partrain("train", "--resume", one_epoch_checkpoint, "--epochs", 2, "--quiet",
                        cwd=tmp_path)
    assert_ok(proc)
    assert (tmp_path / "digits-cnn-digits.npz").is_file(), sorted(
        p.name for p in tmp_path.iterdir())
    model = partrain.load(tmp_path / "digits-cnn-digits.npz")
    assert model.metadata.get("model") == "digits-cnn", model.metadata
    assert model.metadata.get("dataset") == "digits", model.metadata
    assert_ok(run_partrain("evaluate", "digits-cnn-digits.npz", cwd=tmp_path))


# ----------------------------------------------------------------------------- evaluate


def _parse_evaluate(stdout: str, n_classes: int):
    """(accuracy, {class: (recall, n)}, confusion matrix) from `partrain evaluate` output."""
    accuracy = float(re.search(r"^accuracy (\d\.\d+)", stdout, re.M)[1])
    recall = {m[1]: (float(m[2]), int(m[3]))
              for m in re.finditer(r"^\s+(\S+)\s+(\d\.\d{4})\s+\((\d+) examples\)", stdout, re.M)}
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("confusion matrix"))
    rows = [line.split() for line in lines[start + 2:start + 2 + n_classes]]
    assert all(len(r) == n_classes + 1 for r in rows), rows
    return accuracy, recall, [r[0] for r in rows], np.array([[int(v) for v in r[1:]]
                                                             for r in rows])


def test_evaluate_prints_accuracy_recall_and_confusion_matrix(two_epoch_run, digits):
    pytest.importorskip("matplotlib")
    cwd, _ = two_epoch_run
    proc = run_partrain("evaluate", "m.npz", "--plot", "ev", cwd=cwd)
    assert_ok(proc)
    accuracy, recall, row_names, cm = _parse_evaluate(proc.stdout, digits.n_classes)
    assert cm.shape == (10, 10)
    assert cm.sum() == len(digits.y_test) == 359
    assert list(cm.sum(axis=1)) == list(np.bincount(digits.y_test, minlength=10))
    assert row_names == list(digits.class_names)
    assert accuracy == pytest.approx(np.trace(cm) / cm.sum(), abs=1e-4)
    # the numbers are those of the model, not just self-consistent
    model = partrain.load(cwd / "m.npz")
    pred = model.predict(digits.x_test)
    expected = np.zeros((10, 10), dtype=int)
    np.add.at(expected, (digits.y_test, pred), 1)
    assert np.array_equal(cm, expected)
    assert accuracy == pytest.approx(model.evaluate(digits.x_test, digits.y_test)[1], abs=1e-4)
    assert set(recall) == set(digits.class_names)
    for k, name in enumerate(digits.class_names):
        assert recall[name][0] == pytest.approx(cm[k, k] / cm[k].sum(), abs=1e-4)
        assert recall[name][1] == cm[k].sum()
    for png in ("recall.png", "confusion.png"):
        data = (cwd / "ev" / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, png


def test_evaluate_a_model_trained_on_synthetic_data(tmp_path):
    """`evaluate` regenerates the synthetic set in the shape the model was trained on (here
    digits-cnn's 8x8x1), as `train` did, instead of the 28x28x1 default."""
    assert_ok(run_partrain("train", "--dataset", "synthetic", "--epochs", 1, "--quiet",
                           "--save", "syn.npz", cwd=tmp_path))
    proc = run_partrain("evaluate", "syn.npz", cwd=tmp_path)
    assert_ok(proc)
    _, _, _, cm = _parse_evaluate(proc.stdout, 10)
    assert cm.sum() == 256  # the synthetic test set's default size


# ----------------------------------------------------------------------------- gradcheck


def test_gradcheck_passes_for_digits_cnn(tmp_path):
    proc = run_partrain("gradcheck", "--model", "digits-cnn", cwd=tmp_path)
    assert_ok(proc)
    assert re.search(r"^PASS: relative difference", proc.stdout, re.M), proc.stdout
    assert "conv1.W" in proc.stdout


def test_gradcheck_fails_with_an_impossible_tolerance(tmp_path):
    proc = run_partrain("gradcheck", "--model", "digits-cnn", "--tol", "1e-30", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(r"^FAIL: relative difference", proc.stdout, re.M), proc.stdout


# ----------------------------------------------------------------------------- --help

HELP_OPTIONS = {
    (): ["train", "evaluate", "gradcheck", "bench", "--version"],
    ("train",): ["--model", "--dataset", "--epochs", "--batch-size", "--chunk-size", "--lr",
                 "--optimizer", "--momentum", "--lr-decay", "--dropout", "--batchnorm",
                 "--n-jobs", "--seed", "--checkpoint", "--resume", "--save", "--history",
                 "--plot", "--data-dir", "--normalize", "--backend", "--scheduler", "--quiet",
                 "--validation-split", "--early-stopping", "--save-best"],
    ("evaluate",): ["MODEL", "--dataset", "--split", "validation", "--plot", "--data-dir",
                    "--normalize"],
    ("gradcheck",): ["MODEL.npz", "--model", "--eps", "--n-params", "--tol"],
    ("bench",): ["--model", "--batch-size", "--n-jobs", "--dtype", "--repeats", "--duration",
                 "--warmup", "--compare", "--json", "--csv", "--plot"],
}


@pytest.mark.parametrize("command", list(HELP_OPTIONS), ids=lambda c: " ".join(c) or "top")
def test_help_exits_0_and_lists_the_options(command, tmp_path):
    proc = run_partrain(*command, "--help", cwd=tmp_path)
    assert_ok(proc)
    text = proc.stdout
    missing = [opt for opt in HELP_OPTIONS[command] if opt.lower() not in text.lower()]
    assert not missing, f"{missing} not in --help:\n{text}"
    assert proc.stderr == ""


# ----------------------------------------------------------------------------- errors

USAGE_ERRORS = {  # id: (arguments, words the one-line message must contain)
    "unknown-option": (["train", "--bogus"], ["--bogus"]),
    "epochs-not-int": (["train", "--epochs", "x"], ["--epochs", "'x'"]),
    "unknown-model": (["train", "--model", "nope"], ["--model", "nope"]),
    "unknown-dataset": (["train", "--dataset", "nope", "--quiet"], ["nope"]),
    "scheduler-without-dask": (["train", "--scheduler", "tcp://127.0.0.1:1", "--quiet"],
                               ["--scheduler", "dask"]),
    "model-dataset-mismatch": (["train", "--model", "mnist-cnn", "--dataset", "digits",
                                "--quiet"], ["mnist-cnn", "28x28x1", "digits", "8x8x1"]),
    # (--dataset synthetic where the data do not matter: it spares the scikit-learn import)
    "n-jobs-0": (["train", "--n-jobs", "0", "--dataset", "synthetic", "--quiet"],
                 ["n_jobs", "0"]),
    "dropout-on-a-cnn": (["train", "--dropout", "0.5", "--dataset", "synthetic", "--quiet"],
                         ["--dropout", "mlp"]),
    "resume-missing-file": (["train", "--resume", "nothere.npz", "--quiet"], ["nothere.npz"]),
    "evaluate-missing-file": (["evaluate", "nothere.npz"], ["nothere.npz"]),
    "gradcheck-unknown-model": (["gradcheck", "--model", "nope"], ["nope"]),
    "gradcheck-eps-0": (["gradcheck", "--eps", "0"], ["--eps"]),
    "gradcheck-no-params": (["gradcheck", "--n-params", "0"], ["--n-params"]),
    "gradcheck-no-examples": (["gradcheck", "--examples", "0"], ["--examples"]),
    "no-command": ([], ["command"]),
    # options that must be validated, not silently replaced by the model's defaults
    "epochs-0": (["train", "--epochs", "0", "--dataset", "synthetic", "--quiet"], ["--epochs"]),
    "epochs-negative": (["train", "--epochs", "-1", "--dataset", "synthetic", "--quiet"],
                        ["--epochs"]),
    "batch-size-0": (["train", "--batch-size", "0", "--epochs", "1", "--dataset", "synthetic",
                      "--quiet"], ["batch"]),
    "lr-0": (["train", "--lr", "0", "--epochs", "1", "--dataset", "synthetic", "--quiet"],
             ["lr"]),
    "momentum-with-adam": (["train", "--momentum", "0.9", "--epochs", "1", "--dataset",
                            "synthetic", "--quiet"], ["--momentum"]),
}


@pytest.fixture(scope="module")
def usage_error_runs(digits, tmp_path_factory):
    """Every USAGE_ERRORS command, started at once (they are independent), each in its own
    empty cwd: {case: (Popen, cwd)}."""
    runs = {}
    for case, (args, _) in USAGE_ERRORS.items():
        cwd = tmp_path_factory.mktemp(case)
        runs[case] = (subprocess.Popen([sys.executable, "-m", "partrain", *args], cwd=cwd,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True, env=subprocess_env()), cwd)
    yield runs
    for popen, _ in runs.values():
        if popen.poll() is None:
            popen.kill()
            popen.communicate()


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_errors_are_one_line_exit_2(case, usage_error_runs):
    popen, cwd = usage_error_runs[case]
    stdout, stderr = popen.communicate(timeout=180)
    proc = subprocess.CompletedProcess(popen.args, popen.returncode, stdout, stderr)
    assert_usage_error(proc, *USAGE_ERRORS[case][1])
    assert list(cwd.iterdir()) == [], "an error must not leave files behind"


def test_resume_cannot_change_the_learning_rate(one_epoch_checkpoint, tmp_path):
    proc = run_partrain("train", "--resume", one_epoch_checkpoint, "--lr", "0.1", "--quiet",
                        cwd=tmp_path)
    assert_usage_error(proc, "--lr", "resume")


def test_resume_from_a_model_file_is_refused(two_epoch_run, tmp_path):
    proc = run_partrain("train", "--resume", two_epoch_run[0] / "m.npz", "--quiet",
                        cwd=tmp_path)
    assert_usage_error(proc, "checkpoint")


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty"])
def test_evaluate_a_corrupt_model_file(kind, two_epoch_run, tmp_path):
    good = (two_epoch_run[0] / "m.npz").read_bytes()
    content = {"garbage": b"this is not a model\n" * 20, "truncated": good[:len(good) // 2],
               "empty": b""}[kind]
    (tmp_path / "bad.npz").write_bytes(content)
    proc = run_partrain("evaluate", "bad.npz", cwd=tmp_path)
    assert_usage_error(proc, "bad.npz")


def test_missing_mnist_names_the_four_files_without_downloading(tmp_path):
    """Offline (every request goes to a closed local port): one line naming the four files
    and the folder, quickly, and nothing written into the data folder."""
    data_dir = tmp_path / "empty"
    data_dir.mkdir()
    proc = run_partrain("train", "--model", "mnist-cnn", "--data-dir", data_dir, "--quiet",
                        cwd=tmp_path)
    message = assert_usage_error(proc, *MNIST_FILES, str(data_dir))
    assert "mnist" in message.lower()
    leftovers = [p for p in data_dir.rglob("*") if p.is_file()]
    assert leftovers == [], leftovers
    assert proc.elapsed < 30, f"failing offline took {proc.elapsed:.1f} s"
