"""A scaling model of partrain, fitted on this machine and checked against it, then projected.

A step of a batch cut into C chunks on P processes (contiguous groups of chunks) takes

    T(P) = max over groups g of [ |g| * t_chunk * slowdown(P) + inside_additions(g) * t_add ]
           + master_additions(P) * t_add + t_optimizer + t_scale + (t_copy if P > 1)

- t_chunk: one chunk's forward/backward at the plan's chunk size, one process alone (the
  bench's ceiling row at P = 1);
- slowdown(P): how much slower each process computes when P of them run side by side (shared
  caches and memory bandwidth), from the ceiling row at P = 2 and assumed to stay at that value
  beyond (an assumption: bandwidth-bound networks will do worse);
- t_add, t_optimizer, t_scale, t_copy: one gradient addition, one Adam update, the copy of
  the summed gradient out of its slot divided by the batch size, the parameter copy into
  shared memory (each timed right after a chunk's forward/backward, as in a step); the tree
  additions inside a group are made by its process, those across groups by the master.

None of these comes from a partrain run, so the P = 1 and P = 2 predictions are checked against
`partrain bench` measurements of the same configurations, taken in the same interleaved rounds
as the ceiling rows (the target: within 10 %); then the
script projects the speedup at 4..32 cores for batch 64, 256 and 1024 and prints, per network,
the smallest batch that keeps N cores at least 80 % efficient. It also prints the master's
serial time per step at 2, 4, 8 and 16 chunks, for the old left-to-right reduction on the
master and for the tree.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/scaling_model.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from partrain import Context, zoo
from partrain.bench import run_bench
from partrain.chunks import (
    default_chunk_size,
    efficient_chunk,
    reduce_tree,
    split_evenly,
    tree_pairs,
)
from partrain.optim import Adam
from partrain.processes import keep_freed_memory

CORES = (1, 2, 4, 8, 16, 32)
EFFICIENT = 0.8  # the efficiency a batch must keep for the rule of thumb


def median_time(fn, repeats: int = 30) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def chunk_seconds(name: str, chunk: int) -> float:
    """One chunk's forward/backward, one process alone, one BLAS thread."""
    model = zoo.get(name)
    X = np.random.default_rng(0).random((chunk, *model.input_shape)).astype(model.dtype)
    y = np.arange(chunk) % model.n_classes
    grad, ctx = np.empty_like(model.params), Context(training=True, key=(0,))
    run = lambda: model.loss_and_grad_unchecked(model.params, X, y, ctx, grad)  # noqa: E731
    run()
    return median_time(run)


def master_pieces(name: str, chunk: int, repeats: int = 100) -> dict:
    """Seconds of one gradient addition, the scaled copy of the sum, one Adam update and one
    parameter copy, each timed in a step's order right after a chunk's forward/backward (so
    with the caches as a real step leaves them: Adam ran 1.8x slower so than in a loop)."""
    model = zoo.get(name)
    X = np.random.default_rng(0).random((chunk, *model.input_shape)).astype(model.dtype)
    y = np.arange(chunk) % model.n_classes
    grad, ctx = np.empty_like(model.params), Context(training=True, key=(0,))
    a, b = np.ones_like(model.params), np.ones_like(model.params)
    adam, copy = Adam(1e-4), np.empty_like(model.params)
    adam.step(model.params, a)
    pieces = {"add": lambda: a.__iadd__(b), "scale": lambda: np.multiply(b, np.float32(0.5), out=a),
              "adam": lambda: adam.step(model.params, b),
              "copy": lambda: np.copyto(copy, model.params)}
    times: dict[str, list[float]] = {k: [] for k in pieces}
    for _ in range(repeats):
        model.loss_and_grad_unchecked(model.params, X, y, ctx, grad)
        for key, piece in pieces.items():
            t0 = time.perf_counter()
            piece()
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def serial_table(name: str, pieces: dict) -> list[dict]:
    """The master's serial time per step at 2..16 chunks: chain (all additions on the
    master) against the tree with 2 processes (the master joins one partial) and with one
    process per chunk."""
    rows = []
    for chunks in (2, 4, 8, 16):
        slots = np.ones((chunks, zoo.get(name).n_params), np.float32)
        two = [(0, chunks // 2), (chunks // 2, chunks)]
        master = median_time(lambda s=slots, n=chunks, r=two: reduce_tree(s, n, done=r), 50)
        rows.append({"chunks": chunks,
                     "chain_ms": 1e3 * ((chunks - 1) * pieces["add"] + pieces["adam"]),
                     "tree_2_processes_ms": 1e3 * (master + pieces["adam"]),
                     "tree_additions_2_processes": sum(
                         not any(a <= p[0] and p[2] <= b for a, b in two)
                         for p in tree_pairs(chunks)),
                     "tree_one_per_chunk_ms": 1e3 * ((chunks - 1) * pieces["add"]
                                                     + pieces["adam"])})
    return rows


def predict(t_chunk: float, chunks: int, processes: int, slowdown: float,
            pieces: dict) -> float:
    """Step seconds at `processes` processes (see the module docstring)."""
    groups = split_evenly(list(range(chunks)), processes)
    ranges = [(g[0], g[-1] + 1) for g in groups]
    pairs = tree_pairs(chunks)

    def inside(a: int, b: int) -> int:
        return sum(a <= p[0] and p[2] <= b for p in pairs)

    factor = slowdown if len(groups) > 1 else 1.0
    compute = max((b - a) * t_chunk * factor + inside(a, b) * pieces["add"] for a, b in ranges)
    master_adds = len(pairs) - sum(inside(a, b) for a, b in ranges)
    serial = master_adds * pieces["add"] + pieces["adam"] + pieces["scale"]
    return compute + serial + (pieces["copy"] if len(groups) > 1 else 0.0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mnist-cnn,signs-cnn,mlp,digits-cnn")
    parser.add_argument("--batch-sizes", default="64,256,1024")
    parser.add_argument("--check-batch-sizes", default="64,256",
                        help="configurations measured to check the model (default 64,256)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=1.5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    keep_freed_memory()
    report = {"models": {}}
    for name in args.models.split(","):
        model = zoo.get(name)
        with threadpool_limits(1):
            pieces = master_pieces(name, efficient_chunk(model))
        entry = {"pieces_ms": {k: 1e3 * v for k, v in pieces.items()},
                 "serial": serial_table(name, pieces), "check": [], "projection": []}
        fitted = {}
        for batch in map(int, args.check_batch_sizes.split(",")):
            chunk = default_chunk_size(model, batch)
            chunks = -(-batch // chunk)
            report_b = run_bench([name], [batch], [1, 2], repeats=args.repeats,
                                 duration=args.duration, warmup=0.5, progress=False)
            rows = {(r["engine"], r["n_jobs"]): r for r in report_b["rows"]}
            ceil1, ceil2 = rows[("ceiling", 1)], rows[("ceiling", 2)]
            t_chunk = batch / ceil1["examples_per_s"] / chunks
            # each of 2 processes computes half the chunks; the ceiling says how long it took
            slowdown = (batch / ceil2["examples_per_s"]) / (-(-chunks // 2) * t_chunk)
            fitted[batch] = (t_chunk / chunk, max(slowdown, 1.0))
            for n in (1, 2):
                run = rows[("partrain" if n == 1 else "partrain-loky", n)]
                step = predict(t_chunk, chunks, n, max(slowdown, 1.0), pieces)
                entry["check"].append({"batch": batch, "n": n, "chunks": chunks,
                                       "measured": run["examples_per_s"],
                                       "predicted": batch / step})
        # project with the per-example chunk cost and slowdown of the largest checked batch
        per_example, slowdown = fitted[max(fitted)]
        for batch in map(int, args.batch_sizes.split(",")):
            chunk = default_chunk_size(model, batch)
            chunks = -(-batch // chunk)
            t_chunk = per_example * chunk
            one = predict(t_chunk, chunks, 1, slowdown, pieces)
            for cores in CORES:
                step = predict(t_chunk, chunks, min(cores, chunks), slowdown, pieces)
                entry["projection"].append({"batch": batch, "cores": cores, "chunks": chunks,
                                            "speedup": one / step})
        report["models"][name] = entry
        print_model(name, entry)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


def print_model(name: str, entry: dict) -> None:
    print(f"\n== {name}: master pieces (ms) " + ", ".join(
        f"{k} {v:.3f}" for k, v in entry["pieces_ms"].items()))
    print("serial time per step (ms): chunks | chain on master | tree, 2 processes "
          "(additions) | tree, one process per chunk")
    for r in entry["serial"]:
        print(f"  {r['chunks']:>3} | {r['chain_ms']:.3f} | {r['tree_2_processes_ms']:.3f} "
              f"({r['tree_additions_2_processes']}) | {r['tree_one_per_chunk_ms']:.3f}")
    print("check against measured partrain (examples/s): batch n | measured | predicted | error")
    for r in entry["check"]:
        error = r["predicted"] / r["measured"] - 1
        print(f"  {r['batch']:>5} {r['n']} | {r['measured']:,.0f} | {r['predicted']:,.0f} | "
              f"{error:+.1%}")
    print("projected speedup: batch | " + " | ".join(f"{c} cores" for c in CORES))
    rule = {}
    for batch in sorted({r["batch"] for r in entry["projection"]}):
        rows = [r for r in entry["projection"] if r["batch"] == batch]
        print(f"  {batch:>5} ({rows[0]['chunks']} chunks) | " +
              " | ".join(f"{r['speedup']:.1f}" for r in rows))
        for r in rows:
            if r["speedup"] / r["cores"] >= EFFICIENT:
                rule.setdefault(r["cores"], batch)
    print(f"  smallest projected batch keeping >= {EFFICIENT:.0%} efficiency: " +
          ", ".join(f"{c} cores: {b}" for c, b in sorted(rule.items())))


if __name__ == "__main__":
    raise SystemExit(main())
