"""Issue 23, item 4: a /dev/shm too small for a run's shared arrays is one line at the start
(naming /dev/shm, its free space, the need and the fix), never a SIGBUS; no segment and no
process is left behind.

The end-to-end case mounts a 3 MB tmpfs on /dev/shm in a private mount namespace
(`unshare -m`, root only), as in a container started with a small --shm-size; the library
cases make /dev/shm look full (os.statvfs) or fail to reserve pages (os.posix_fallocate).
"""

import errno
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import subprocess_env

from partrain import Trainer, shm, zoo
from partrain.loky_engine import LokyEngine

SMALL_SHM_RUN = """
mount -t tmpfs -o size="$1" tmpfs /dev/shm || exit 99
shift
"$@" > out.txt 2> err.txt < /dev/null
status=$?
sleep 1
ls -A /dev/shm > left.txt
exit $status
"""


def _can_unshare() -> bool:
    if os.geteuid() != 0:
        return False
    try:
        return subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /dev/shm"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def processes_with(marker: str) -> list[int]:
    """Pids of live processes whose environment holds `marker`."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def run_with_small_shm(tmp_path: Path, size: str, *args) -> tuple[int, list[str], str, list]:
    """`partrain ARGS` with a `size` tmpfs as /dev/shm: (status, stderr lines, what was left
    in that /dev/shm, pids of its processes still alive)."""
    script = tmp_path / "small_shm.sh"
    script.write_text(SMALL_SHM_RUN)
    marker = f"PARTRAIN_SHM_TEST={uuid.uuid4().hex}"
    env = subprocess_env()
    env[marker.split("=")[0]] = marker.split("=")[1]
    # (outputs to files: a leftover worker would hold a pipe open and hang the test)
    status = subprocess.run(["unshare", "-m", "sh", str(script), size, sys.executable, "-m",
                             "partrain", *map(str, args)], cwd=tmp_path, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, timeout=300).returncode
    alive = processes_with(marker)
    for pid in alive:  # (clean up before asserting)
        os.kill(pid, 9)
    assert status != 99, "could not mount the tmpfs"
    err = [line for line in (tmp_path / "err.txt").read_text().splitlines() if line.strip()]
    return status, err, (tmp_path / "left.txt").read_text(), alive


small_shm = pytest.mark.skipif(not _can_unshare(), reason="needs root, unshare -m and mount")
RUN = ["train", "--model", "mnist-cnn", "--dataset", "synthetic", "--n-jobs", "2", "--epochs",
       "1", "--quiet"]


@small_shm
@pytest.mark.parametrize("extra", [[], ["--checkpoint", "ck.npz"]], ids=["plain", "checkpoint"])
def test_a_3_mb_dev_shm_is_one_line_at_the_start(tmp_path, extra):
    """Before: "Bus error", exit 135, 11 segments and 7 semaphores left, a loky worker and
    two resource trackers orphaned. With --checkpoint the same line: nothing was trained, so
    no checkpoint is written and no --resume suggested."""
    status, err, left, alive = run_with_small_shm(tmp_path, "3m", *RUN, *extra)
    assert status not in (0, 135), (status, err)
    assert 1 <= len(err) <= 3 and not any("Traceback" in line for line in err), err
    message = err[-1]
    for words in ("/dev/shm", "MiB free", "more there", "--shm-size", "--backend dask"):
        assert words in message, message
    assert left == "", f"left in /dev/shm: {left}"
    assert alive == [], f"processes left: {alive}"
    assert not (tmp_path / "mnist-cnn.npz").exists()
    assert not (tmp_path / "ck.npz").exists() and "--resume" not in message


@small_shm
def test_a_dev_shm_large_enough_trains_and_leaves_nothing(tmp_path):
    status, err, left, alive = run_with_small_shm(tmp_path, "64m", *RUN)
    assert status == 0, err
    assert left == "" and alive == [], (left, alive)


# ----------------------------------------------------------------------------- the library


def my_segments() -> list[str]:
    return sorted(p.name for p in Path(shm.SHM_DIR).glob(f"{shm.SHM_PREFIX}{os.getpid()}_*"))


def fake_statvfs(free_bytes):
    """An os.statvfs whose /dev/shm has `free_bytes()` free (other paths: the real one)."""
    real = os.statvfs

    def statvfs(path):
        if str(path) != shm.SHM_DIR:
            return real(path)
        return os.statvfs_result((4096, 4096, 1 << 20, 0, free_bytes() // 4096, 1 << 20, 0, 0,
                                  0, 255))
    return statvfs


@pytest.mark.skipif(not Path(shm.SHM_DIR).is_dir(), reason="no /dev/shm")
def test_the_engine_checks_the_space_before_creating_any_segment(monkeypatch):
    monkeypatch.setattr(shm.os, "statvfs", fake_statvfs(lambda: 100_000))
    before = my_segments()
    with pytest.raises(shm.SharedMemoryFullError, match=r"/dev/shm has 0\.0 MiB free.*"
                       r"--shm-size"):
        LokyEngine(zoo.digits_cnn(), chunk_size=8, n_processes=2, batch_size=32)
    assert my_segments() == before


@pytest.mark.skipif(not Path(shm.SHM_DIR).is_dir(), reason="no /dev/shm")
def test_a_training_set_that_does_not_fit_leaves_no_segment_and_no_worker(monkeypatch):
    """Room for the engine's slots, not for the training set: fit raises before any worker
    starts and unlinks every segment; the same trainer then trains as n_jobs=1 does."""
    X = np.random.default_rng(0).random((64, 8, 8, 1), dtype=np.float32)
    y = np.arange(64) % 10
    calls = []

    def free() -> int:  # room for the first request only
        calls.append(1)
        return 1 << 40 if len(calls) == 1 else 0

    monkeypatch.setattr(shm.os, "statvfs", fake_statvfs(free))
    before = my_segments()
    trainer = Trainer(zoo.digits_cnn(), n_jobs=2, batch_size=32, chunk_size=8, progress=False)
    with pytest.raises(shm.SharedMemoryFullError, match="/dev/shm"):
        trainer.fit(X, y)
    assert len(calls) == 2  # (the engine's slots, then the training set)
    assert my_segments() == before
    monkeypatch.undo()
    with trainer:
        trainer.fit(X, y)
    serial = Trainer(zoo.digits_cnn(), n_jobs=1, batch_size=32, chunk_size=8, progress=False)
    serial.fit(X, y)
    assert np.array_equal(trainer.model.params, serial.model.params)
    assert my_segments() == before


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="no posix_fallocate")
def test_a_segment_whose_pages_cannot_be_reserved_is_unlinked(monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shm.os, "posix_fallocate", no_space)
    before = my_segments()
    with pytest.raises(shm.SharedMemoryFullError, match="/dev/shm"):
        shm.SharedArray((1000,), np.float32, "t")
    assert my_segments() == before


def test_segments_are_reserved_when_created():
    """The pages of a new segment are allocated at once (st_blocks), not at first touch."""
    array = shm.SharedArray((3, 4096), np.float32, "t")
    try:
        info = os.stat(Path(shm.SHM_DIR) / array.spec.name)
        assert info.st_blocks * 512 >= 3 * 4096 * 4
    finally:
        array.release()
