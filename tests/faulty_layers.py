"""Fault-injection layers and probes for the trainer tests; loky workers import this module.

Every layer here is a parameter-free identity except when its input holds a SENTINEL value
(x.max() > SENTINEL): then it raises, produces infinities, or kills its own process.
"""

import os
import signal

import numpy as np

from partrain.callbacks import Callback
from partrain.layers import Layer, register_layer

SENTINEL = 1e3
BAD_MESSAGE = "bad value in chunk"
BLAS_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def has_sentinel(x: np.ndarray) -> bool:
    """Whether an example of this chunk was marked as poisoned."""
    return x.size > 0 and float(x.max()) > SENTINEL


@register_layer
class RaiseOnSentinel(Layer):
    """Identity that raises ValueError(BAD_MESSAGE) on a poisoned chunk."""

    short_name = "raiser"

    def forward(self, p, x, ctx, index):
        if has_sentinel(x):
            raise ValueError(BAD_MESSAGE)
        return x, None


@register_layer
class InfOnSentinel(Layer):
    """Identity that turns a poisoned chunk into infinities (a diverged network's symptom)."""

    short_name = "infer"

    def forward(self, p, x, ctx, index):
        if has_sentinel(x):
            return np.full_like(x, np.inf), None
        return x, None


@register_layer
class DieOnSentinel(Layer):
    """Identity whose process SIGKILLs itself on a poisoned chunk, unless it is `master_pid`."""

    short_name = "killer"

    def __init__(self, master_pid: int):
        self.master_pid = int(master_pid)

    def forward(self, p, x, ctx, index):
        if has_sentinel(x) and os.getpid() != self.master_pid:
            os.kill(os.getpid(), signal.SIGKILL)
        return x, None

    def config(self):
        return {"master_pid": self.master_pid}


class InterruptAt(Callback):
    """Raise KeyboardInterrupt (as Ctrl-C would) after step `step` of epoch `epoch`."""

    def __init__(self, epoch, step):
        self.at = (epoch, step)

    def on_batch_end(self, trainer, step, logs):
        if (trainer.epoch, step) == self.at:
            raise KeyboardInterrupt


def blas_report() -> dict:
    """What a process sees: its pid, BLAS environment variables and BLAS thread counts."""
    from threadpoolctl import threadpool_info

    return {"pid": os.getpid(),
            "env": {var: os.environ.get(var) for var in BLAS_ENV_VARS},
            "threads": {info["internal_api"]: info["num_threads"]
                        for info in threadpool_info()}}


# ----------------------------------------------------------------------------- process probes


def shm_segments(pid: int | None = None) -> set[str]:
    """partrain's shared-memory segments in /dev/shm (only those created by `pid` if given)."""
    prefix = "partrain_" if pid is None else f"partrain_{pid}_"
    try:
        return {name for name in os.listdir("/dev/shm") if name.startswith(prefix)}
    except FileNotFoundError:  # no /dev/shm on this system
        return set()


def is_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def wait_gone(pids, timeout: float = 5.0) -> list[int]:
    """Poll until none of `pids` is alive; return those still alive after `timeout` s."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if is_alive(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.02)


def descendants(pid: int) -> set[int]:
    """Pids of all living descendants of `pid` (Linux /proc scan)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found
