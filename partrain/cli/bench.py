"""`partrain bench`: the scaling experiment, its table and its output files."""

from __future__ import annotations

import sys
from pathlib import Path

from .common import EXIT_FAILURE, scheduler_address
from .outputs import check_outputs, write_or_rescue


def cmd_bench(args) -> int:
    """`partrain bench`: run, print the table, write the requested files."""
    from ..bench import format_table, run_bench, write_csv, write_json
    from ..plots import plot_scaling

    if args.plot:
        from ..plots import require_matplotlib

        require_matplotlib()
    outputs = [("--json", args.json, write_json, "bench.json"),
               ("--csv", args.csv, write_csv, "bench.csv"),
               ("--plot", args.plot, plot_scaling, "scaling.png")]
    check_outputs([(option, path, False, example) for option, path, _, example in outputs])
    report = run_bench([m.replace("_", "-") for m in args.model], args.batch_size, args.n_jobs,
                       args.dtype, args.repeats, args.duration, args.warmup,
                       compare_torch=args.compare == "torch", chunk_size=args.chunk_size,
                       backend=args.backend, scheduler=scheduler_address(args),
                       progress=not args.quiet, ceiling=args.ceiling,
                       chunk_plans=tuple(args.chunk_plan),
                       scaling=("strong", "weak") if args.scaling == "both" else (args.scaling,))
    print(format_table(report))
    status = 0
    for option, path, writer, _ in outputs:
        if path is not None:
            where, problem = write_or_rescue(f"{option} output", Path(path),
                                             lambda to, writer=writer: writer(report, to))
            if problem:
                print(f"partrain bench: failed: {problem}", file=sys.stderr)
                status = EXIT_FAILURE
            if where is not None:
                print(f"wrote {where}")
    return status
