"""`partrain train` never loses a run: output paths checked before anything starts, files
rescued when writing still fails, checkpoints claimed by one run, signals and a closed stdout
after training, resume that means "go on", and one-line Dask address errors (issue 11).

Each case was reproduced on the code before the fix; the comment of each test says what it did
then. Runs are tiny (synthetic data, 1-3 epochs); subprocesses where signals, pipes or a second
process are involved, `cli.main` in this process where a function has to fail on cue.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    TESTS,
    assert_ok,
    assert_usage_error,
    run_partrain,
    start_holder,
    subprocess_env,
)

import partrain
from partrain import Trainer, cli

HERE = TESTS
SIGNAL_SCRIPT = HERE / "cli_signal_script.py"
TINY = ["--dataset", "synthetic", "--quiet"]  # digits-cnn on 1,024 synthetic 8x8 images


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- output paths
# Before: each of these trained, then ended in a traceback (IsADirectoryError, FileExistsError,
# NotADirectoryError) with exit status 1, and the trained model was not written anywhere.

BAD_OUTPUTS = {  # id: (set-up, arguments, words of the one-line message)
    "save-is-a-folder": ("mkdir out", ["--save", "out/"], ["--save out/:", "folder"]),
    "history-is-a-folder": ("mkdir h", ["--history", "h"], ["--history", "h", "folder"]),
    "checkpoint-is-a-folder": ("mkdir ck", ["--checkpoint", "ck"], ["--checkpoint", "folder"]),
    "checkpoint-under-a-file": ("touch afile", ["--checkpoint", "afile/ck.npz"],
                                ["--checkpoint", "afile", "not a folder"]),
    "save-under-a-file": ("touch afile", ["--save", "afile/sub/m.npz"], ["--save", "afile"]),
    "plot-is-a-file": ("touch p", ["--plot", "p"], ["--plot", "p"]),
    "save-is-the-checkpoint": ("", ["--save", "x.npz", "--checkpoint", "./x.npz"],
                               ["--save", "--checkpoint", "x.npz"]),
    # Before: "missing port number in address 'notaurl'", then a 20 s hang and an ignored
    # TimeoutError traceback from distributed.Client.__del__ (exit 2 after 21 s).
    "scheduler-not-an-address": ("", ["--backend", "dask", "--scheduler", "notaurl"],
                                 ["--scheduler", "notaurl", "tcp://"]),
}


def _set_up(cwd: Path, command: str) -> None:
    if command.startswith("mkdir "):
        (cwd / command[6:]).mkdir()
    elif command.startswith("touch "):
        (cwd / command[6:]).touch()


@pytest.fixture(scope="module")
def bad_output_runs(tmp_path_factory):
    """Every BAD_OUTPUTS command, started at once, each in its own folder: {case: (Popen,
    cwd, files before)}."""
    runs = {}
    for case, (set_up, args, _) in BAD_OUTPUTS.items():
        cwd = tmp_path_factory.mktemp(case)
        _set_up(cwd, set_up)
        before = sorted(p.name for p in cwd.rglob("*"))
        runs[case] = (subprocess.Popen(
            [sys.executable, "-m", "partrain", "train", "--epochs", "1", *TINY, *args],
            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=subprocess_env()), cwd, before)
    yield runs
    for popen, _, _ in runs.values():
        if popen.poll() is None:
            popen.kill()
            popen.communicate()


@pytest.mark.parametrize("case", list(BAD_OUTPUTS))
def test_bad_output_paths_fail_before_training(case, bad_output_runs):
    """One line, exit 2, no training (nothing on stdout), nothing created."""
    popen, cwd, before = bad_output_runs[case]
    stdout, stderr = popen.communicate(timeout=180)
    proc = subprocess.CompletedProcess(popen.args, popen.returncode, stdout, stderr)
    assert_usage_error(proc, *BAD_OUTPUTS[case][2])
    assert stdout == "", "the run must stop before training"
    assert sorted(p.name for p in cwd.rglob("*")) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_fails_before_training(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    proc = run_partrain("train", "--epochs", 1, *TINY, "--save", "ro/m.npz", cwd=tmp_path)
    assert_usage_error(proc, "--save", "ro", "write")
    assert proc.stdout == ""


def _main_with_fit_hook(monkeypatch, tmp_path, hook, argv):
    """`cli.main(argv)` in `tmp_path` with `hook(when)` called "before" and "after" fit."""
    monkeypatch.chdir(tmp_path)
    fit = Trainer.fit

    def hooked(self, *args, **kwargs):
        hook("before")
        history = fit(self, *args, **kwargs)
        hook("after")
        return history

    monkeypatch.setattr(Trainer, "fit", hooked)
    return cli.main(argv)


def test_model_and_history_are_rescued_when_their_folder_breaks_after_training(
        tmp_path, monkeypatch, capsys):
    """models/ did not exist (fine: it can be created); training ends and models is now a
    file: the model and the history go to the working directory, stderr says where, exit 1."""
    def hook(when):
        if when == "after":
            (tmp_path / "models").write_text("in the way")

    status = _main_with_fit_hook(monkeypatch, tmp_path, hook, [
        "train", "--epochs", "1", *TINY, "--save", "models/m.npz", "--history", "models/h.json"])
    out, err = capsys.readouterr()
    assert status == 1, err
    assert "model saved to" in out and "m.npz" in out
    model = partrain.load(tmp_path / "m.npz")
    assert model.metadata["model"] == "digits-cnn"
    assert len(json.loads((tmp_path / "h.json").read_text())["loss"]) == 1
    assert "Traceback" not in err
    problems = lines(err)
    assert len(problems) == 2, err
    assert "models/m.npz" in problems[0] and "wrote it to" in problems[0] and "m.npz" in problems[0]
    assert "models/h.json" in problems[1] and "h.json" in problems[1]


def test_checkpoint_is_rescued_when_it_cannot_be_written_during_training(
        tmp_path, monkeypatch, capsys):
    """The checkpoint path becomes a folder once training has started: training stops at the
    first checkpoint, which is written next to it; resuming from there finishes the run, with
    the same parameters as an uninterrupted one."""
    def hook(when):
        if when == "before":
            (tmp_path / "runs" / "ck.npz").mkdir(parents=True)

    argv = ["train", "--epochs", "2", *TINY, "--checkpoint", "runs/ck.npz", "--save", "m.npz"]
    status = _main_with_fit_hook(monkeypatch, tmp_path, hook, argv)
    _, err = capsys.readouterr()
    assert status == 1, err
    assert not (tmp_path / "m.npz").exists()  # not trained to the end: no model
    [message] = lines(err)
    assert message.startswith("partrain train: failed: training stopped at"), message
    rescued = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("ck.rescued")]
    assert len(rescued) == 1 and f"--resume {rescued[0].relative_to(tmp_path)}" in message
    assert Trainer.from_checkpoint(rescued[0]).epoch == 1
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--epochs", "2", *TINY, "--resume", str(rescued[0]),
                     "--save", str(tmp_path / "resumed.npz")]) == 0
    assert cli.main(["train", "--epochs", "2", *TINY, "--save", str(tmp_path / "full.npz")]) == 0
    resumed, full = (partrain.load(tmp_path / f"{n}.npz") for n in ("resumed", "full"))
    assert np.array_equal(resumed.params, full.params)


# ----------------------------------------------------------------------------- signals
# Before: SIGTERM during the test evaluation, the model's write or the final checkpoint killed
# the process (exit -15, nothing printed) before the model was written.

@pytest.mark.parametrize("when, signame", [
    ("evaluate", "TERM"), ("evaluate", "INT"), ("save", "TERM"), ("plot", "TERM"),
    ("checkpoint-1", "TERM"), ("checkpoint-2", "TERM")])
def test_a_signal_after_training_still_leaves_the_model_saved(when, signame, tmp_path):
    """The model (equal to the checkpoint's), the history and the checkpoint are written; one
    line on stderr says so and names what was not done; exit status 128 + signal."""
    if when == "plot":
        pytest.importorskip("matplotlib")
    signum = getattr(signal, f"SIG{signame}")
    proc = subprocess.run(
        [sys.executable, str(SIGNAL_SCRIPT), when, signame, "train", "--epochs", "1", *TINY,
         "--save", "m.npz", "--history", "h.json", "--checkpoint", "ck.npz", "--plot", "plots"],
        cwd=tmp_path, capture_output=True, text=True, timeout=180, env=subprocess_env())
    assert proc.returncode == 128 + signum, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    [message] = lines(proc.stderr)
    assert f"SIG{signame}" in message and "model saved to m.npz" in message, message
    assert "plot" in message.split("not done:")[1], message
    model = partrain.load(tmp_path / "m.npz")
    checkpoint = Trainer.from_checkpoint(tmp_path / "ck.npz")
    assert checkpoint.epoch == 1
    assert np.array_equal(model.params, checkpoint.model.params)
    assert len(json.loads((tmp_path / "h.json").read_text())["loss"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz", "h.json", "m.npz"]


def test_a_signal_during_training_says_where_the_checkpoint_is(tmp_path):
    """SIGTERM at the end of epoch 1 of 2: no model (not trained), the checkpoint of epoch 1,
    and a message that says how to go on."""
    proc = subprocess.run(
        [sys.executable, str(SIGNAL_SCRIPT), "checkpoint-1", "TERM", "train", "--epochs", "2",
         *TINY, "--save", "m.npz", "--checkpoint", "ck.npz"],
        cwd=tmp_path, capture_output=True, text=True, timeout=180, env=subprocess_env())
    assert proc.returncode == 143, proc.stderr
    [message] = lines(proc.stderr)
    assert "SIGTERM" in message and "--resume ck.npz" in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz"]
    assert Trainer.from_checkpoint(tmp_path / "ck.npz").epoch == 1


# ----------------------------------------------------------------------------- closed stdout


def run_with_closed_stdout(*args, cwd):
    """`python -m partrain ARGS` whose stdout is a pipe nobody reads any more (`| head` after
    it has exited); stderr captured."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "partrain", *map(str, args)], cwd=cwd,
                              stdout=write_end, stderr=subprocess.PIPE, text=True,
                              timeout=180, env=subprocess_env())
    finally:
        os.close(write_end)


def test_closed_stdout_after_training_is_quiet_and_keeps_the_model(tmp_path):
    """Before: `partrain train --quiet | head -1` ended in a BrokenPipeError traceback."""
    proc = run_with_closed_stdout("train", "--epochs", 1, *TINY, "--save", "m.npz", cwd=tmp_path)
    assert proc.returncode == 141, proc.stderr
    assert proc.stderr == ""
    assert partrain.load(tmp_path / "m.npz").metadata["model"] == "digits-cnn"


def test_closed_stdout_during_training_stops_with_a_checkpoint(tmp_path):
    """The first epoch line finds stdout closed: training stops there like on SIGPIPE, with
    the checkpoint written and one line on stderr; no model (the run is not finished)."""
    proc = run_with_closed_stdout("train", "--epochs", 3, "--dataset", "synthetic",
                                  "--checkpoint", "ck.npz", "--save", "m.npz", cwd=tmp_path)
    assert proc.returncode == 141, proc.stderr
    assert "Traceback" not in proc.stderr
    last = lines(proc.stderr)[-1]
    assert "stdout was closed" in last and "--resume ck.npz" in last, proc.stderr
    assert Trainer.from_checkpoint(tmp_path / "ck.npz").epoch == 1
    assert not (tmp_path / "m.npz").exists()


def test_closed_stdout_on_evaluate(tmp_path):
    assert_ok(run_partrain("train", "--epochs", 1, *TINY, "--save", "m.npz", cwd=tmp_path))
    proc = run_with_closed_stdout("evaluate", "m.npz", cwd=tmp_path)
    assert (proc.returncode, proc.stderr) == (141, "")


# ----------------------------------------------------------------------------- checkpoint claims

def test_a_second_run_on_the_same_checkpoint_is_refused(tmp_path):
    """Before: both runs exited 0 and ck.npz held whichever wrote last.

    A Trainer in one process holds ck.npz; `partrain train --checkpoint ck.npz` is refused at
    once, naming that process; when the holder ends, the same command works, and no lock file
    is left."""
    holder = start_holder(tmp_path / "ck.npz", tmp_path)
    try:
        proc = run_partrain("train", "--epochs", 1, *TINY, "--checkpoint", "ck.npz",
                            "--save", "m.npz", cwd=tmp_path)
        assert_usage_error(proc, "ck.npz", f"pid {holder.pid}", "still going")
        assert proc.stdout == "" and not (tmp_path / "m.npz").exists()
        holder.stdin.write("go on\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "done"
    finally:
        holder.kill()
        holder.communicate()
    assert_ok(run_partrain("train", "--epochs", 1, *TINY, "--checkpoint", "ck.npz",
                           "--save", "m.npz", cwd=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz", "m.npz"]


def test_a_claim_left_by_a_killed_run_blocks_nobody(tmp_path):
    """SIGKILL leaves the sidecar file but not the lock: the next run takes it over."""
    holder = start_holder(tmp_path / "ck.npz", tmp_path)
    holder.kill()
    holder.communicate()
    assert (tmp_path / ".ck.npz.lock").exists()
    assert_ok(run_partrain("train", "--epochs", 1, *TINY, "--checkpoint", "ck.npz",
                           "--save", "m.npz", cwd=tmp_path))
    assert not (tmp_path / ".ck.npz.lock").exists()


# ----------------------------------------------------------------------------- resume = go on

RUNS = {  # the options of a run, given again with --resume
    "cnn-sgd": ["--model", "digits-cnn", "--batch-size", "16", "--chunk-size", "8", "--seed", "3",
                "--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.01", "--lr-decay", "0.1",
                "--normalize", "standardize", "--dataset", "synthetic"],
    "mlp-adam": ["--model", "mlp", "--dropout", "0.2", "--batchnorm", "--batch-size", "64",
                 "--seed", "5", "--optimizer", "adam", "--lr", "0.002",
                 "--normalize", "standardize", "--dataset", "synthetic"],
}


@pytest.mark.parametrize("run", list(RUNS))
def test_resume_with_the_same_command_goes_on(run, tmp_path):
    """Before: "--model, --batch-size, --seed cannot change on --resume" for unchanged values,
    and a bare `--resume` fed `scale`d inputs to a `standardize` run.

    1 epoch with a checkpoint, then (a) only --resume and --epochs 2, (b) the very same
    command with --resume added: both equal 2 uninterrupted epochs, bit for bit, and the
    saved metadata names the real normalisation."""
    options = RUNS[run]
    full = run_partrain("train", *options, "--epochs", 2, "--quiet", "--save", "full.npz",
                        cwd=tmp_path)
    assert_ok(full)
    assert_ok(run_partrain("train", *options, "--epochs", 1, "--quiet", "--checkpoint",
                           "ck.npz", "--save", "one.npz", cwd=tmp_path))
    assert_ok(run_partrain("train", "--resume", "ck.npz", "--epochs", 2, "--quiet",
                           "--save", "bare.npz", cwd=tmp_path))
    assert_ok(run_partrain("train", *options, "--epochs", 2, "--quiet", "--checkpoint",
                           "ck.npz", "--save", "same.npz", "--resume", "ck.npz", cwd=tmp_path))
    reference = partrain.load(tmp_path / "full.npz")
    for name in ("bare", "same"):
        model = partrain.load(tmp_path / f"{name}.npz")
        assert np.array_equal(model.params, reference.params), name
        assert np.array_equal(model.buffers, reference.buffers), name
        assert model.metadata == reference.metadata, name
        assert model.metadata["normalize"] == "standardize"
    assert Trainer.from_checkpoint(tmp_path / "ck.npz").epoch == 2


def test_resume_lists_every_option_that_differs(tmp_path):
    assert_ok(run_partrain("train", *RUNS["cnn-sgd"], "--epochs", 1, "--quiet",
                           "--checkpoint", "ck.npz", cwd=tmp_path))
    proc = run_partrain("train", *RUNS["cnn-sgd"], "--batch-size", "32", "--seed", "4",
                        "--normalize", "scale", "--momentum", "0.5", "--epochs", 2, "--quiet",
                        "--resume", "ck.npz", cwd=tmp_path)
    assert_usage_error(proc, "--resume ck.npz", "--batch-size 32 (checkpoint: 16)",
                       "--seed 4 (checkpoint: 3)", "--normalize scale (checkpoint: standardize)",
                       "--momentum 0.5 (checkpoint: 0.9)")
    message = lines(proc.stderr)[0]
    for same in ("--model", "--chunk-size", "--lr ", "--lr-decay", "--optimizer", "--dataset"):
        assert same not in message, message
    # and a model saved over the checkpoint it resumes from would end that run
    proc = run_partrain("train", "--resume", "ck.npz", "--save", "ck.npz", cwd=tmp_path)
    assert_usage_error(proc, "--save", "--resume", "ck.npz")


def test_evaluate_accepts_a_checkpoint(tmp_path):
    """Before: "'ck.npz' holds a partrain checkpoint, expected a model." (exit 2)."""
    assert_ok(run_partrain("train", *RUNS["cnn-sgd"], "--epochs", 1, "--quiet",
                           "--checkpoint", "ck.npz", "--save", "m.npz", cwd=tmp_path))
    from_model = run_partrain("evaluate", "m.npz", cwd=tmp_path)
    from_checkpoint = run_partrain("evaluate", "ck.npz", cwd=tmp_path)
    assert_ok(from_model)
    assert_ok(from_checkpoint)
    assert from_checkpoint.stdout.replace("ck.npz", "m.npz") == from_model.stdout


# ----------------------------------------------------------------------------- dask


def test_unreachable_scheduler_is_one_line(tmp_path):
    """Before: a ConnectionError traceback after the 10 s connect timeout (exit 1)."""
    pytest.importorskip("distributed")
    proc = run_partrain("train", "--epochs", 1, *TINY, "--backend", "dask", "--scheduler",
                        "tcp://127.0.0.1:1", cwd=tmp_path)
    assert_usage_error(proc, "tcp://127.0.0.1:1", "dask scheduler")
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []
