"""Helper for the signal tests: train "forever" with 2 workers and a checkpoint.

Usage: python train_worker_script.py CHECKPOINT_PATH

After the first epoch it prints one line "started <worker pid> <worker pid> ..." so that the
test knows when to send SIGINT or SIGTERM. The tests import `make_run` to replay the run.
"""

import faulthandler
import signal
import sys

import numpy as np

from partrain import Callback, Trainer, optim, zoo

N_EXAMPLES, BATCH_SIZE, CHUNK_SIZE, SEED = 600, 20, 5, 7


def make_run(n_jobs: int = 1, checkpoint=None):
    """(trainer, X, y) of the run this script performs (the tests replay it with n_jobs=1)."""
    rng = np.random.default_rng(SEED)
    X = rng.random((N_EXAMPLES, 64)).astype(np.float32)
    y = rng.integers(0, 10, size=N_EXAMPLES)
    model = zoo.mlp(dims=(64, 32, 10), dropout=0.2, seed=SEED)
    trainer = Trainer(model, optim.Adam(1e-3), n_jobs=n_jobs, batch_size=BATCH_SIZE,
                      chunk_size=CHUNK_SIZE, seed=SEED, progress=False, checkpoint=checkpoint,
                      checkpoint_every=1000)
    return trainer, X, y


class AnnounceStart(Callback):
    """Print the worker pids once, at the end of the first epoch."""

    def on_epoch_end(self, trainer, epoch, logs):
        if epoch == 0:
            pids = " ".join(str(pid) for pid in trainer.engine.worker_pids())
            print(f"started {pids}", flush=True)


def main(checkpoint: str) -> None:
    # A shell may start background jobs with SIGINT ignored; Ctrl-C semantics are under test.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks when it hangs
    trainer, X, y = make_run(n_jobs=3, checkpoint=checkpoint)  # the master and 2 workers
    trainer.fit(X, y, epochs=100_000, callbacks=[AnnounceStart()])


if __name__ == "__main__":
    main(sys.argv[1])
