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

"compute ms" is the median compute time of the busiest worker in the window's steps; the
rest of a step is the master's (transport, reduction, Adam, and whatever else the engine
does in the step): "master max" is its largest value in the window.

The new worker's own process start-up (Python, NumPy, Dask imports: about 1 s of CPU) comes
mostly before it is listed; what it still does after that competes with the steps for the
cores whatever the engine does. `--no-adopt` measures that part alone: the engine starts no
server on the new worker, and "joining" is then the steps of the `--window` seconds after it
was listed (0.15 s by default: about as long as the joining window with a server on this
machine, 0.06-0.19 s; a longer one dilutes the new process's first moments).

`--relist-in-step` re-lists the workers inside the step, as the engine did before
re-listing in a thread of its own (the scheduler round trip and the server's submission,
2-4 ms here, then lengthened the step after the join event).

The machine's load average is printed before and after (other jobs on the cores change the
figures more than anything measured here).

    python benchmarks/dask_join_cost.py --rounds 3
    python benchmarks/dask_join_cost.py --rounds 3 --no-adopt
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import numpy as np


def one_round(steady: int, after: int, adopt: bool, window: float,
              relist_in_step: bool = False) -> dict:
    """Step times (ms) of the three windows of one scale-up, and the seconds from the new
    worker's listing to its first step."""
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
                    engine = trainer.engine
                    if not adopt:  # the engine ignores the new worker from now on
                        engine._start_server = lambda address: None
                    if relist_in_step:
                        engine._relist_in_background = engine._relist_workers
                    threading.Thread(target=grow, daemon=True).start()
                start = (k * 64) % (len(X) - 63)
                t0 = time.perf_counter()
                trainer.train_step(np.arange(start, start + 64), 0, k)
                timing = trainer.engine.last_timing
                steps.append((t0, time.perf_counter() - t0, timing.processes,
                              timing.compute_max))
                adopted = [s for s in steps if s[2] == 2]
                if len(adopted) >= after or (not adopt and "at" in listed
                                             and t0 > listed["at"] + window):
                    break
    finally:
        client.close()
        cluster.close()
    first = [t for t, _, p, _ in steps if p == 2]
    windows = {
        "steady": steps[steady // 2:steady],
        "joining": [s for s in steps[steady:] if s[2] == 1 and s[0] >= listed["at"]],
        "adopted": [s for s in steps if s[2] == 2][5:],
    }
    return ({name: [(1e3 * s, 1e3 * c) for _, s, _, c in window]
             for name, window in windows.items()},
            first[0] - listed["at"] if first else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steady", type=int, default=200, help="steps before the scale-up")
    parser.add_argument("--after", type=int, default=100, help="steps on 2 workers")
    parser.add_argument("--no-adopt", action="store_true",
                        help="start no server on the new worker (its own start-up cost only)")
    parser.add_argument("--relist-in-step", action="store_true",
                        help="re-list the workers inside the step (the engine's former way)")
    parser.add_argument("--window", type=float, default=0.15,
                        help="--no-adopt: seconds after the listing counted as joining")
    args = parser.parse_args()
    print("# load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print(f"{'round':>5}  {'window':<8} {'steps':>5} {'median ms':>9} {'mean ms':>8} "
          f"{'max ms':>7} {'compute ms':>10} {'master max':>10}")
    joined = {"steady": [], "joining": [], "adopted": []}
    for r in range(args.rounds):
        windows, latency = one_round(args.steady, args.after, not args.no_adopt,
                                     args.window, args.relist_in_step)
        if latency is not None:
            print(f"{r + 1:>5}  first step on the new worker {latency:.3f} s after it was "
                  "listed")
        for name, rows in windows.items():
            times = [t for t, _ in rows]
            joined[name] += times
            if times:
                print(f"{r + 1:>5}  {name:<8} {len(times):>5} {statistics.median(times):>9.2f} "
                      f"{statistics.fmean(times):>8.2f} {max(times):>7.2f} "
                      f"{statistics.median(c for _, c in rows):>10.2f} "
                      f"{max(t - c for t, c in rows):>10.2f}")
    steady, joining = joined["steady"], joined["joining"]
    if steady and joining:
        med_j, med_s = statistics.median(joining), statistics.median(steady)
        mean_j, mean_s = statistics.fmean(joining), statistics.fmean(steady)
        print(f"all rounds: joining median {med_j:.2f} ms vs steady {med_s:.2f} ms "
              f"({med_j / med_s - 1:+.1%}); mean {mean_j:.2f} vs {mean_s:.2f} ms "
              f"({mean_j / mean_s - 1:+.1%})")
    print("# load average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
