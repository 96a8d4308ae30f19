"""Per-example cost of a chunk's forward/backward against the chunk size, per zoo network.

Small chunks run slower per example (thin matmuls, per-call overheads), and very large ones
can too (their activations outgrow the caches); the chunk plan (`partrain.chunks.
efficient_chunk`) uses, for each zoo network, the smallest chunk whose per-example cost stays
within `--tolerance` of the cheapest size measured. This
script measures those costs (one BLAS thread, sizes interleaved round by round, medians) and
prints the table that `partrain/chunks.py` records in MEASURED_CHUNKS:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/chunk_efficiency.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from threadpoolctl import threadpool_limits

from partrain import Context, zoo
from partrain.processes import keep_freed_memory

SIZES = (4, 8, 16, 24, 32, 48, 64, 96, 128, 256)


def per_example_costs(name: str, sizes, rounds: int) -> dict[int, float]:
    """Median seconds per example of loss_and_grad at each chunk size (rounds interleave
    every size, so a busy spell of the machine hits them all alike)."""
    model = zoo.get(name)
    X = np.random.default_rng(0).random((max(sizes), *model.input_shape)).astype(model.dtype)
    y = np.arange(max(sizes)) % model.n_classes
    grad = np.empty_like(model.params)
    times: dict[int, list[float]] = {s: [] for s in sizes}
    ctx = Context(training=True, key=(0,))
    for _ in range(rounds):
        for size in sizes:
            repeat = max(1, 256 // size)
            t0 = time.perf_counter()
            for _ in range(repeat):
                model.loss_and_grad_unchecked(model.params, X[:size], y[:size], ctx, grad)
            times[size].append((time.perf_counter() - t0) / (repeat * size))
    return {s: statistics.median(t) for s, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mnist-cnn,signs-cnn,mlp,digits-cnn")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="accepted extra cost per example (default 0.05 = 5 %%)")
    args = parser.parse_args(argv)
    keep_freed_memory()
    chosen = {}
    with threadpool_limits(1):
        for name in args.models.split(","):
            costs = per_example_costs(name, SIZES, args.rounds)
            base = min(costs.values())
            print(f"{name}: us per example by chunk size (relative to the cheapest)")
            for size, cost in costs.items():
                print(f"  {size:>4}  {cost * 1e6:8.1f} us  {cost / base:5.2f}")
            chosen[name] = min(s for s, c in costs.items() if c <= base * (1 + args.tolerance))
    print("MEASURED_CHUNKS =", chosen)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
