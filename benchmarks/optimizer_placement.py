"""Where should Adam run? Measure what synchronous steps and the optimizer update cost two
processes, and what splitting the update between them (each updating half the parameters)
would buy.

Two processes compute their halves of a batch's chunks (forward and backward, one BLAS
thread each). In phases that alternate so that all modes see the same machine:

- free:    no synchronisation, no optimizer: each process computes step after step (what
           the bench's ceiling row measures);
- none:    lockstep: a spin barrier on shared memory ends every step, as in partrain's engine,
           so each step waits for the slower process; no optimizer update;
- master:  lockstep, and process 0 runs Adam on the whole parameter vector after its chunks
           while the other waits (partrain's design: the master alone keeps the moments);
- sharded: lockstep, and each process runs Adam on its half (the moments split between the
           processes).

A step's time is the wall time from one barrier to the next (free: from one step to the
next), the slower process's per-phase median; each mode's figure is the median over its
phases, and "x of free" the median over phases of free's step / the mode's step. Nothing
here is partrain's engine: no parameter copy, no gradient addition, so the gaps are the
synchronisation's and the optimizer's alone.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/optimizer_placement.py \\
        --model mnist-cnn --batch-size 32,64
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import signal
import statistics
import sys
import time
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

MODES = ("free", "none", "master", "sharded")


def _spin_barrier(counters: np.ndarray, rank: int, step: int) -> None:
    """Mark this process at `step` and wait until the other one is there too."""
    counters[rank] = step
    while counters[1 - rank] < step:
        pass


def _process(rank: int, shm_name: str, model_name: str, batch_size: int, chunk_size: int,
             phases: int, steps: int, queue) -> None:
    from threadpoolctl import threadpool_limits

    from partrain import zoo
    from partrain.chunks import compute_chunk, step_groups
    from partrain.optim import Adam
    from partrain.processes import keep_freed_memory

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops us
    threadpool_limits(1)
    keep_freed_memory()
    shm = shared_memory.SharedMemory(name=shm_name)
    try:
        counters = np.ndarray((2,), np.int64, buffer=shm.buf)
        model = zoo.get(model_name)
        rng = np.random.default_rng(rank)
        X = rng.random((batch_size, *model.input_shape)).astype(model.dtype)
        y = rng.integers(0, model.n_classes, batch_size)
        batch_idx, grad = np.arange(batch_size), np.empty_like(model.params)
        group = step_groups(batch_size, chunk_size, 2)[rank]
        n = model.n_params
        half = slice(rank * n // 2, (rank + 1) * n // 2)
        # The update's inputs: a gradient of the size and magnitude of an averaged one.
        update_grad = rng.normal(0, 1e-3, n).astype(model.dtype)
        whole, own_half = model.params.copy(), model.params[half].copy()
        optimizers = {"master": Adam(1e-6), "sharded": Adam(1e-6)}
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        step = 0
        for _ in range(phases):
            for mode in MODES:
                step += 1
                _spin_barrier(counters, rank, step)
                phase = []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    for k, bounds in group:
                        compute_chunk(model, model.params, X, y, batch_idx, k, bounds,
                                      (0, 1, 0, 0), grad, None)
                    if mode == "master" and rank == 0:
                        optimizers["master"].step(whole, update_grad)
                    elif mode == "sharded":
                        optimizers["sharded"].step(own_half, update_grad[half])
                    if mode != "free":
                        step += 1
                        _spin_barrier(counters, rank, step)
                    phase.append(time.perf_counter() - t0)
                times[mode].append(statistics.median(phase))
        queue.put((rank, times))
    finally:
        shm.close()


def measure(model_name: str, batch_size: int, chunk_size: int | None, phases: int,
            steps: int) -> dict:
    """Seconds per step of each mode (medians over phases) on 2 lockstep processes."""
    from partrain import zoo
    from partrain.chunks import default_chunk_size
    from partrain.processes import children_blas_threads

    model = zoo.get(model_name)
    chunk_size = chunk_size or default_chunk_size(model, batch_size)
    if -(-batch_size // chunk_size) < 2:
        raise SystemExit(f"error: batch {batch_size} at chunk {chunk_size} is one chunk: "
                         "nothing for a second process")
    context = multiprocessing.get_context("spawn")
    shm = shared_memory.SharedMemory(create=True, size=16)
    procs = []
    try:
        np.ndarray((2,), np.int64, buffer=shm.buf)[:] = 0
        queue = context.SimpleQueue()
        with children_blas_threads(1):
            procs = [context.Process(target=_process, daemon=True, args=(
                rank, shm.name, model_name, batch_size, chunk_size, phases, steps, queue))
                for rank in range(2)]
            for proc in procs:
                proc.start()
        results = dict(queue.get() for _ in procs)
        for proc in procs:
            proc.join()
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        shm.close()
        shm.unlink()
    per_phase = {m: np.maximum(results[0][m], results[1][m]) for m in MODES}
    free = per_phase["free"]
    return {"model": model_name, "batch_size": batch_size, "chunk_size": chunk_size,
            "n_params": model.n_params,
            "step_ms": {m: 1e3 * float(np.median(per_phase[m])) for m in MODES},
            "vs_free": {m: float(np.median(free / per_phase[m])) for m in MODES}}


def positive_int(text: str) -> int:
    """An integer >= 1 (argparse turns the ValueError into a one-line usage error)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def positive_int_list(text: str) -> list[int]:
    """'32,64' -> [32, 64], each >= 1."""
    return [positive_int(part) for part in text.split(",")]


def main(argv=None) -> int:
    from partrain import zoo

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mnist-cnn", choices=sorted(zoo.MODELS))
    parser.add_argument("--batch-size", default="32,64", type=positive_int_list,
                        help="comma-separated")
    parser.add_argument("--chunk-size", type=positive_int,
                        help="default: partrain's for the model")
    parser.add_argument("--phases", type=positive_int, default=12,
                        help="phases per mode")
    parser.add_argument("--steps", type=positive_int, default=60,
                        help="steps per phase")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.json and not args.json.parent.is_dir():
        parser.error(f"--json: folder {args.json.parent} does not exist")
    rows = []
    for batch in args.batch_size:
        try:
            row = measure(args.model, batch, args.chunk_size, args.phases, args.steps)
        except KeyboardInterrupt:
            print("interrupted: no figures for this batch", file=sys.stderr)
            return 130
        rows.append(row)
        print(f"{row['model']} batch {batch} (chunk {row['chunk_size']}, "
              f"{row['n_params']:,} parameters), 2 processes:")
        for mode in MODES:
            ms = row["step_ms"][mode]
            print(f"  {mode:8s} {ms:7.3f} ms/step  {batch / ms * 1e3:8,.0f} ex/s  "
                  f"x{row['vs_free'][mode]:.3f} of free")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
