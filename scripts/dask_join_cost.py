"""What a step costs while a Dask worker joins, against steady steps (issue 25).

A LocalCluster of one single-threaded worker trains mnist_cnn (batch 64, chunk 16) step
after step; after `--steady` steps a second worker is started from another thread
(`cluster.scale(2)`). Each step's wall time is recorded with the number of processes that
computed it. Three windows:

- steady: the `--steady` steps before the scale-up (1 process);
- joining: steps that start once the scheduler lists the new worker and still run on 1
  process (the engine starts the new worker's ChunkServer in the background meanwhile: the
  actor, the training set fetched from the first worker, the model, the handshake);
- adopted: steps computed by both workers.

The new worker's own process start-up (Python, NumPy, Dask imports: about 1 s of CPU) comes
before it is listed and is not in any window: it is Dask's cost, and on a machine with as
many cores as workers it competes with the steps whatever the engine does.

    python scripts/dask_join_cost.py --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import numpy as np


def one_round(steady: int, after: int) -> dict:
    """Step times (ms) of the three windows of one scale-up."""
    import distributed

    from partrain import Trainer, zoo

    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                       host="127.0.0.1", dashboard_address=None)
    client = distributed.Client(cluster, set_as_default=False)
    rng = np.random.default_rng(0)
    X = rng.random((2048, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, len(X))
    listed = {}

    def grow():
        cluster.scale(2)
        while len(client.nthreads()) < 2:
            time.sleep(0.02)
        listed["at"] = time.perf_counter()

    steps = []  # (start, seconds, processes)
    try:
        trainer = Trainer(zoo.mnist_cnn(), batch_size=64, chunk_size=16, backend="dask",
                          scheduler=client, n_jobs=-1, progress=False)
        with trainer, trainer.session(X, y):
            for k in range(steady + 10_000):
                if k == steady:
                    threading.Thread(target=grow, daemon=True).start()
                start = (k * 64) % (len(X) - 63)
                t0 = time.perf_counter()
                trainer.train_step(np.arange(start, start + 64), 0, k)
                steps.append((t0, time.perf_counter() - t0,
                              trainer.engine.last_timing.processes))
                adopted = [s for s in steps if s[2] == 2]
                if len(adopted) >= after:
                    break
    finally:
        client.close()
        cluster.close()
    return {
        "steady": [1e3 * s for _, s, _ in steps[steady // 2:steady]],
        "joining": [1e3 * s for t, s, p in steps[steady:] if p == 1 and t >= listed["at"]],
        "adopted": [1e3 * s for _, s, p in steps if p == 2][5:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steady", type=int, default=200, help="steps before the scale-up")
    parser.add_argument("--after", type=int, default=100, help="steps on 2 workers")
    args = parser.parse_args()
    print(f"{'round':>5}  {'window':<8} {'steps':>5} {'median ms':>9} {'mean ms':>8} "
          f"{'max ms':>7}")
    joined = {"steady": [], "joining": [], "adopted": []}
    for r in range(args.rounds):
        windows = one_round(args.steady, args.after)
        for name, times in windows.items():
            joined[name] += times
            if times:
                print(f"{r + 1:>5}  {name:<8} {len(times):>5} {statistics.median(times):>9.2f} "
                      f"{statistics.fmean(times):>8.2f} {max(times):>7.2f}")
    steady, joining = joined["steady"], joined["joining"]
    if steady and joining:
        med_j, med_s = statistics.median(joining), statistics.median(steady)
        mean_j, mean_s = statistics.fmean(joining), statistics.fmean(steady)
        print(f"all rounds: joining median {med_j:.2f} ms vs steady {med_s:.2f} ms "
              f"({med_j / med_s - 1:+.1%}); mean {mean_j:.2f} vs {mean_s:.2f} ms "
              f"({mean_j / mean_s - 1:+.1%})")


if __name__ == "__main__":
    main()
