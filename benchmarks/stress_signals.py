"""Stress test: signals at random moments to real multi-process training runs.

Each run starts `partrain train ... --n-jobs 2 --checkpoint ck.npz` in a fresh folder, waits
until training starts (the header line), sleeps a random time within the run's expected length
and sends one signal to the master. It then counts, over all runs:

- hangs: the master has not exited `--timeout` seconds after the signal;
- bad exits: an exit status other than 128 + signal, death by the signal itself (what a shell
  also reports as 128 + signal: the signal landed while the interpreter was exiting, after
  every file was written and Python had given the signal back to the system) or 0 when the run
  had already finished, or a traceback on stderr;
- missing checkpoints: an interrupted run without a readable checkpoint;
- leftover shared memory: /dev/shm/partrain_<pid>_* segments after the exit;
- orphans: worker processes of the run still alive 3 s after the master's exit.

All must be 0. Example (the issue's figure; ~15 minutes on 2 cores):

    python benchmarks/stress_signals.py --runs 200 --mnist ../shared/data/mnist

Without --mnist the runs train mnist-cnn on synthetic data (fast; what the test suite runs).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHM_DIR = Path("/dev/shm")


def mnist_npz(mnist_dir: Path, n_train: int, folder: Path) -> str:
    """An npz dataset of the real MNIST test images: `n_train` to train on, the rest to test."""
    from partrain.data import load_idx_pair

    images, labels = load_idx_pair(mnist_dir / "t10k-images-idx3-ubyte.gz",
                                   mnist_dir / "t10k-labels-idx1-ubyte.gz")
    path = folder / "mnist8k.npz"
    np.savez(path, x_train=images[:n_train], y_train=labels[:n_train],
             x_test=images[n_train:], y_test=labels[n_train:])
    return f"npz:{path}"


def descendants(pid: int) -> set[int]:
    """Living descendants of `pid` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def one_run(command: list[str], folder: Path, signum: int | None, delay: float,
            timeout: float) -> dict:
    """Start a run, signal it `delay` s after training starts, and check what it left."""
    stderr_path = folder / "stderr.txt"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(command, cwd=folder, stdout=subprocess.DEVNULL, stderr=stderr)
    t_start = time.monotonic()
    while "Training " not in stderr_path.read_text() and proc.poll() is None:
        if time.monotonic() - t_start > 120:
            break
        time.sleep(0.005)
    t_train = time.monotonic()
    workers: set[int] = set()
    while proc.poll() is None and time.monotonic() - t_train < delay:
        workers |= descendants(proc.pid)
        time.sleep(0.002)
    signalled = signum is not None and proc.poll() is None
    if signalled:
        workers |= descendants(proc.pid)
        proc.send_signal(signum)
    try:
        proc.wait(timeout=timeout)
        hang = False
    except subprocess.TimeoutExpired:
        hang = True
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    seconds = time.monotonic() - t_train
    deadline = time.monotonic() + 3.0
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    stderr = stderr_path.read_text()
    status = proc.returncode
    expected = {0} if not signalled else {0, 128 + signum, -signum}
    checkpoint_ok = None
    if signalled and status in (128 + signum, -signum):
        from partrain.io import read_npz

        try:
            read_npz(folder / "ck.npz", "checkpoint")
            checkpoint_ok = True
        except Exception:  # noqa: BLE001 - any failure to read it counts as missing
            checkpoint_ok = False
    return {
        "signalled": signalled, "delay_s": round(delay, 4), "seconds": round(seconds, 3),
        "status": status, "hang": hang,
        "bad_exit": hang or status not in expected or "Traceback" in stderr,
        "missing_checkpoint": checkpoint_ok is False,
        "leftover_shm": sorted(p.name for p in SHM_DIR.glob(f"partrain_{proc.pid}_*")),
        "orphans": sorted(pid for pid in workers if alive(pid)),
        "stderr_tail": stderr[-800:] if hang or status not in expected else "",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--signal", choices=["INT", "TERM"], default="INT")
    parser.add_argument("--mnist", type=Path, default=None,
                        help="folder of t10k MNIST files: train on 8,000 real images")
    parser.add_argument("--model", default="mnist-cnn")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=20.0,
                        help="seconds after the signal before a run counts as hung")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window-fraction", type=float, default=1.0,
                        help="signal within this fraction of the calibration run's length "
                             "(below 1 on a busy machine, whose runs vary in length, so that "
                             "most signals still land during training)")
    parser.add_argument("--json", type=Path, default=None, help="write every run's record")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    signum = getattr(signal, f"SIG{args.signal}")
    with tempfile.TemporaryDirectory(prefix="partrain-stress-") as tmp:
        tmp = Path(tmp)
        dataset = mnist_npz(args.mnist, 8000, tmp) if args.mnist else "synthetic"
        command = [sys.executable, "-m", "partrain", "train", "--model", args.model,
                   "--dataset", dataset, "--epochs", str(args.epochs), "--n-jobs",
                   str(args.n_jobs), "--checkpoint", "ck.npz", "--save", "model.npz"]
        calibration = one_run(command, _fresh(tmp, "calibration"), None, 0.0, 600.0)
        if calibration["status"] != 0:
            print(f"the run itself fails:\n{calibration['stderr_tail']}", file=sys.stderr)
            return 1
        window = calibration["seconds"] * args.window_fraction
        records = []
        for i in range(args.runs):
            delay = rng.uniform(0.0, window)
            records.append(one_run(command, _fresh(tmp, f"run{i}"), signum, delay,
                                   args.timeout))
            print(f"run {i + 1}/{args.runs}: delay {delay:.3f} s, status "
                  f"{records[-1]['status']}", file=sys.stderr, flush=True)
    summary = {
        "runs": len(records), "signal": f"SIG{args.signal}", "dataset": dataset.split("/")[-1],
        "run_seconds": round(window, 2),
        "interrupted": sum(r["signalled"] and r["status"] == 128 + signum for r in records),
        "finished_first": sum(r["status"] == 0 for r in records),
        "killed_while_exiting": sum(r["status"] == -signum for r in records),
        "hangs": sum(r["hang"] for r in records),
        "bad_exits": sum(r["bad_exit"] for r in records),
        "missing_checkpoints": sum(r["missing_checkpoint"] for r in records),
        "leftover_shm": sum(bool(r["leftover_shm"]) for r in records),
        "orphans": sum(bool(r["orphans"]) for r in records),
    }
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": records}, indent=1))
    print(json.dumps(summary))
    failures = [r for r in records if r["bad_exit"] or r["missing_checkpoint"]
                or r["leftover_shm"] or r["orphans"]]
    for r in failures[:3]:
        print(json.dumps(r), file=sys.stderr)
    return 1 if failures else 0


def _fresh(tmp: Path, name: str) -> Path:
    folder = tmp / name
    folder.mkdir()
    return folder


if __name__ == "__main__":
    sys.exit(main())
