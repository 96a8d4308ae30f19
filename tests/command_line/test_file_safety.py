"""Issue 23, items 1 and 2: partrain never replaces a device (or pipe, or socket) it is told to
write, and never writes through a planted link.

Rule (partrain/io.py, `special_file`): an output path that exists and is not a regular file is
refused before any work (CLI: one line, exit 2; library: `NotRegularFileError`), except the
null device (any character device numbered as /dev/null), which is written through without a
rename, to discard the output. Temporary files are created exclusively next to their target;
the checkpoint's lock sidecar is opened without following a link.

The device cases need root (mknod); the others run as anyone.
"""

import os
import stat
from pathlib import Path

import pytest
from conftest import assert_ok, assert_usage_error, run_partrain

from partrain import io, zoo
from partrain.runlock import CheckpointClaim, UnsafeLockFileError, claim_file

TINY = ["train", "--dataset", "synthetic", "--quiet", "--epochs", "1"]
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
NULL = os.stat(os.devnull).st_rdev
FULL = os.makedev(1, 7)  # /dev/full: every write fails with ENOSPC


def mknod(path: Path, device: int = FULL, kind: int = stat.S_IFCHR) -> Path:
    os.mknod(path, 0o666 | kind, device)
    return path


def assert_device(path: Path, device: int) -> None:
    info = os.lstat(path)
    assert stat.S_ISCHR(info.st_mode) and info.st_rdev == device, f"{path} was replaced"


# ----------------------------------------------------------------------------- the CLI


@root_only
def test_train_refuses_a_device_and_leaves_both_devices(tmp_path):
    """Before: exit 0, and both devices had become regular files (the rename replaced them)."""
    full, null = mknod(tmp_path / "fakefull"), mknod(tmp_path / "fakenull", NULL)
    proc = run_partrain(*TINY, "--save", "fakefull", "--history", "fakenull", cwd=tmp_path)
    assert_usage_error(proc, "--save fakefull", "character device", "not a regular file")
    assert_device(full, FULL)
    assert_device(null, NULL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fakefull", "fakenull"]


@root_only
def test_train_writes_through_a_null_device(tmp_path):
    """--save and --history at /dev/null-like nodes: discarded, the nodes stay devices."""
    save, history = mknod(tmp_path / "null1", NULL), mknod(tmp_path / "null2", NULL)
    assert_ok(run_partrain(*TINY, "--save", save.name, "--history", history.name,
                           "--checkpoint", "ck.npz", cwd=tmp_path))
    assert_device(save, NULL)
    assert_device(history, NULL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz", "null1", "null2"]


@root_only
@pytest.mark.parametrize("option", ["--checkpoint", "--save-best", "--history"])
def test_every_train_output_refuses_a_block_device(option, tmp_path):
    block = mknod(tmp_path / "disk", os.makedev(7, 200), stat.S_IFBLK)  # a loop device number
    extra = ["--validation-split", "0.2"] if option == "--save-best" else []
    proc = run_partrain(*TINY, *extra, option, "disk", "--save", "m.npz", cwd=tmp_path)
    assert_usage_error(proc, f"{option} disk", "block device")
    assert stat.S_ISBLK(os.lstat(block).st_mode)
    assert not (tmp_path / "m.npz").exists()


@pytest.mark.parametrize("option", ["--save", "--history", "--plot"])
def test_train_refuses_a_named_pipe(option, tmp_path):
    """Before: --save fifo trained and then renamed the model over the pipe."""
    target = tmp_path / "out" / "history.png" if option == "--plot" else tmp_path / "out"
    target.parent.mkdir(exist_ok=True)
    os.mkfifo(target)
    proc = run_partrain(*TINY, option, "out", cwd=tmp_path)
    if option == "--plot" and "matplotlib" in proc.stderr:
        pytest.skip("no matplotlib")
    assert_usage_error(proc, option, "named pipe")
    assert stat.S_ISFIFO(os.lstat(target).st_mode)


@pytest.mark.parametrize("option", ["--json", "--csv"])
def test_bench_refuses_a_named_pipe_before_running(option, tmp_path):
    os.mkfifo(tmp_path / "out")
    proc = run_partrain("bench", "--model", "mlp", "--batch-size", "8", "--n-jobs", "1",
                        "--repeats", "1", "--duration", "0.1", "--warmup", "0", "--quiet",
                        "--no-ceiling", option, "out", cwd=tmp_path)
    assert_usage_error(proc, f"{option} out", "named pipe")
    assert proc.stdout == ""  # refused before the table was timed
    assert stat.S_ISFIFO(os.lstat(tmp_path / "out").st_mode)


def test_evaluate_refuses_a_named_pipe_among_its_plots(tmp_path):
    pytest.importorskip("matplotlib")
    zoo.digits_cnn().save(tmp_path / "m.npz")
    (tmp_path / "plots").mkdir()
    os.mkfifo(tmp_path / "plots" / "confusion.png")
    proc = run_partrain("evaluate", "m.npz", "--dataset", "synthetic", "--plot", "plots",
                        cwd=tmp_path)
    assert_usage_error(proc, "--plot", "confusion.png", "named pipe")
    assert not (tmp_path / "plots" / "recall.png").exists()


# ----------------------------------------------------------------------------- the library


@root_only
def test_writers_refuse_a_character_device_and_write_through_the_null_device(tmp_path):
    full, null = mknod(tmp_path / "full"), mknod(tmp_path / "null", NULL)
    model = zoo.digits_cnn()
    with pytest.raises(io.NotRegularFileError, match="character device"):
        model.save(full)
    with pytest.raises(io.NotRegularFileError, match="character device"):
        io.write_text(full, "x")
    model.save(null)
    io.write_text(null, "x")
    assert_device(full, FULL)
    assert_device(null, NULL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "null"]  # no temporary left


def test_writers_refuse_a_pipe_without_opening_it(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # (opening it to write would block: the test would hang)
    with pytest.raises(io.NotRegularFileError, match="named pipe"):
        zoo.digits_cnn().save(fifo)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["fifo"]


def test_plots_refuse_a_pipe(tmp_path):
    pytest.importorskip("matplotlib")
    from partrain.plots import plot_history

    os.mkfifo(tmp_path / "h.png")
    with pytest.raises(io.NotRegularFileError):
        plot_history({"loss": [1.0, 0.5], "accuracy": [0.1, 0.2]}, tmp_path / "h.png", "t")
    assert stat.S_ISFIFO(os.lstat(tmp_path / "h.png").st_mode)


def test_a_regular_file_and_a_symlink_to_one_are_still_replaced_atomically(tmp_path):
    io.write_text(tmp_path / "a.txt", "old")
    io.write_text(tmp_path / "a.txt", "new")
    assert (tmp_path / "a.txt").read_text() == "new"
    assert io.output_problem(tmp_path / "a.txt") is None
    assert io.output_problem(os.devnull) is None


def test_temporary_files_are_created_exclusively(tmp_path, monkeypatch):
    """A file planted under the temporary name the writer draws first is never opened: a
    link there to another file leaves that file as it was, and the write still succeeds."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    names = iter(["planted", "fresh"])
    monkeypatch.setattr(io.secrets, "token_hex", lambda n: next(names))
    (tmp_path / ".out.txt.planted.tmp").symlink_to(victim)
    io.write_text(tmp_path / "out.txt", "data")
    assert victim.read_text() == "precious"
    assert (tmp_path / "out.txt").read_text() == "data"
    assert os.stat(tmp_path / "out.txt").st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------- the lock sidecar


def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path):
    """Before: the claim truncated the link's target and wrote its JSON into it."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    claim_file(tmp_path / "ck.npz").symlink_to(victim)
    with pytest.raises(UnsafeLockFileError, match="symbolic link"):
        CheckpointClaim(tmp_path / "ck.npz")
    assert victim.read_text() == "precious"
    assert claim_file(tmp_path / "ck.npz").is_symlink()


def test_a_dangling_lock_link_does_not_create_its_target(tmp_path):
    """Before: the claim created the file the dangling link pointed to."""
    claim_file(tmp_path / "ck.npz").symlink_to(tmp_path / "created.txt")
    with pytest.raises(UnsafeLockFileError, match="symbolic link"):
        CheckpointClaim(tmp_path / "ck.npz")
    assert not (tmp_path / "created.txt").exists()


def test_a_hard_linked_lock_file_is_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.link(victim, claim_file(tmp_path / "ck.npz"))
    with pytest.raises(UnsafeLockFileError, match="2 hard links"):
        CheckpointClaim(tmp_path / "ck.npz")
    assert victim.read_text() == "precious"


def test_train_with_a_symlinked_lock_file_is_one_line_and_touches_nothing(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    claim_file(tmp_path / "ck.npz").symlink_to(victim)
    proc = run_partrain(*TINY, "--checkpoint", "ck.npz", cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode not in (0, None) and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and "symbolic link" in lines[0], proc.stderr
    assert victim.read_text() == "precious"
    assert not (tmp_path / "ck.npz").exists() and not (tmp_path / "digits-cnn.npz").exists()


def test_a_claim_still_works_and_is_released(tmp_path):
    with CheckpointClaim(tmp_path / "ck.npz"):
        assert stat.S_ISREG(os.lstat(claim_file(tmp_path / "ck.npz")).st_mode)
    assert list(tmp_path.iterdir()) == []
