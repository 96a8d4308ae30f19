#!/usr/bin/env python3
"""The first scaling experiment: examples/s of full training steps for n_jobs 1 and 2.

Times zoo.signs_cnn at batch 64 and zoo.mnist_cnn at batch 32 (the tutorials' batch sizes) on
synthetic data of their input shapes, with `partrain.bench.run_bench`, and prints the table with
the speedup and efficiency against n_jobs=1. `partrain bench` is the full tool (more models,
batch sizes, PyTorch comparison, JSON/CSV/plot output).

    python scripts/bench_scaling.py
    python scripts/bench_scaling.py --n-jobs 1,2,4 --repeats 5 --duration 3
"""

from __future__ import annotations

import argparse
import sys
import time

from partrain.bench import format_table, run_bench

CONFIGS = (("signs-cnn", 64), ("mnist-cnn", 32))  # (model, batch size) of each tutorial


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="examples/s of signs_cnn (batch 64) and mnist_cnn (batch 32) training steps "
        "for several worker counts, with the speedup against n_jobs=1.")
    parser.add_argument("--n-jobs", default="1,2",
                        help="comma-separated worker counts (default 1,2)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed windows per configuration (default 3)")
    parser.add_argument("--duration", type=float, default=2.0,
                        help="seconds per timed window (default 2)")
    parser.add_argument("--warmup", type=float, default=0.5,
                        help="seconds of warm-up per configuration (default 0.5)")
    args = parser.parse_args(argv)
    try:
        args.n_jobs = [int(j) for j in args.n_jobs.split(",") if j.strip()]
    except ValueError:
        parser.error(f"--n-jobs must be comma-separated integers, got {args.n_jobs!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    n_jobs = sorted(set(args.n_jobs) | {1})  # the speedup needs n_jobs=1
    t0 = time.perf_counter()
    try:
        reports = [run_bench([model], [batch], n_jobs, repeats=args.repeats,
                             duration=args.duration, warmup=args.warmup)
                   for model, batch in CONFIGS]
    except ValueError as exc:
        print(f"bench_scaling.py: error: {exc}", file=sys.stderr)
        return 2
    report = {**reports[0], "rows": [row for r in reports for row in r["rows"]]}
    print(format_table(report))
    for row in report["rows"]:
        if row["n_jobs"] > 1 and row["engine"].startswith("partrain") and row["speedup"]:
            print(f"{row['model']} batch {row['batch_size']}: n_jobs={row['n_jobs']} runs "
                  f"{row['speedup']:.2f}x as fast as n_jobs=1 (parallel efficiency "
                  f"{row['parallel_efficiency']:.2f}"
                  f", engine efficiency {row['engine_efficiency']:.2f})")
    print(f"wall time {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
