"""Scaling experiments: examples/s, speedup, parallel and engine efficiency per worker count.

Each configuration (model, batch size, n_jobs) runs full training steps (fan-out, chunk
forward/backward, ordered reduction, Adam on the master) on synthetic data of the model's
input shape, after a warm-up, in several timed windows; speedup and parallel efficiency
(speedup / n_jobs) are taken against n_jobs=1 measured in the same run. Beside each partrain
row:

- a **ceiling** row: n independent processes computing the same chunks as n partrain
  processes would, with no coordination, timed together. partrain / ceiling is the *engine
  efficiency*: what the engine loses, apart from what the machine loses when n processes
  share its caches and memory bandwidth;
- with `compare_torch`, PyTorch as its users would run it: default and tuned at 1..cores
  threads, and DDP with n single-thread processes (`partrain.torch_baselines`);
- with the Dask backend, the local backend at the same configurations.

Strong scaling keeps the batch fixed; weak scaling gives each process `batch_size` examples
(the batch grows with n). Every report records the BLAS kernels that ran and warns when the
machine was busy or a kernel was forced through the environment.

Configurations are measured in *rounds*: each round times every configuration once (one
window after its warm-up, those of one model and batch size back to back), and `repeats`
rounds follow each other. A shared machine's speed drifts over minutes (on the development VM
by up to 1.5x); interleaving makes the drift hit every configuration alike, so the ratios
between rows (speedup, engine efficiency, partrain / torch) stay meaningful.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import zoo
from .chunks import (
    MIN_CHUNK_EXAMPLES,
    MIN_CHUNK_FLOPS,
    compute_chunk,
    default_chunk_size,
    step_groups,
)
from .io import write_text
from .optim import Adam
from .parallel import ParallelismWarning, plan_processes, resolve_n_jobs
from .processes import children_blas_threads, keep_freed_memory, usable_cores
from .torch_baselines import time_torch, time_torch_ddp, torch_unavailable_reason
from .trainer import Trainer

SYNTHETIC_EXAMPLES = 2048
# Environment variables that make a BLAS (or PyTorch) pick other kernels than the CPU's best.
KERNEL_ENV_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "MKL_ENABLE_INSTRUCTIONS",
                   "MKL_DEBUG_CPU_TYPE", "ATEN_CPU_CAPABILITY", "NPY_DISABLE_CPU_FEATURES")
BUSY_LOAD = 0.5  # 1-minute load average above which timings are not trustworthy
SCALINGS = ("strong", "weak")
# "auto": partrain's chunk plan (`chunks.default_chunk_size`); "max4": the first release's,
# kept for before/after comparisons: at most 4 chunks per batch, none under 16 examples or
# 30 MFLOP of work.
CHUNK_PLANS = ("auto", "max4")


@dataclass
class BenchRow:
    """One measured configuration; `windows` holds the examples/s of every timed window."""

    model: str
    batch_size: int  # examples per step (weak scaling: n_jobs x the per-process batch)
    n_jobs: int
    dtype: str
    engine: str  # partrain[-loky|-dask], ceiling, torch, torch-tuned, torch-ddp
    threads: int
    processes: int  # processes that computed each step: fewer than n_jobs when chunks lack
    chunk_size: int
    examples_per_s: float
    examples_per_s_min: float
    examples_per_s_max: float
    scaling: str = "strong"
    chunk_plan: str | None = None  # partrain and ceiling rows: the CHUNK_PLANS entry used
    speedup: float | None = None  # examples/s / partrain's at n_jobs=1 (same model, batch)
    parallel_efficiency: float | None = None  # speedup / n_jobs (called "efficiency" before)
    engine_efficiency: float | None = None  # partrain / ceiling at the same configuration
    gflops: float | None = None
    step_ms: float | None = None
    compute_ms: float | None = None  # busiest worker's compute per step (critical path)
    engine_ms: float | None = None  # the rest of the master's step: dispatch, wait, reduce
    optimizer_ms: float | None = None
    master_peak_rss_mb: float | None = None
    worker_peak_rss_mb: list[float] = field(default_factory=list)
    worker_private_rss_mb: list[float] = field(default_factory=list)
    bytes_per_step: int | None = None  # Dask: parameters sent + gradients received, per step
    windows: list[float] = field(default_factory=list)


# ----------------------------------------------------------------------------- machine


def machine_info() -> dict:
    """CPU, cores, NumPy, the BLAS kernels in use, forcing variables and the load now."""
    from threadpoolctl import threadpool_info

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    blas = [{k: pool.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
            for pool in threadpool_info() if pool.get("user_api") == "blas"]
    forced = {var: os.environ[var] for var in KERNEL_ENV_VARS if var in os.environ}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": usable_cores(), "python": platform.python_version(),
            "numpy": np.__version__, "blas": blas, "forced_kernels": forced,
            "load_average": load, "platform": platform.platform()}


def machine_warnings(machine: dict) -> list[str]:
    """Why the figures of this machine may not be what a user's machine would give."""
    notes = []
    if machine["load_average"] is not None and machine["load_average"] > BUSY_LOAD:
        notes.append(f"the machine was busy: load average {machine['load_average']:.2f} before "
                     f"the run (> {BUSY_LOAD}); timings are unreliable")
    if machine["forced_kernels"]:
        forced = " ".join(f"{k}={v}" for k, v in machine["forced_kernels"].items())
        unset = " ".join(f"-u {k}" for k in machine["forced_kernels"])
        notes.append(f"kernels forced by the environment ({forced}); for the kernels this CPU "
                     f"would pick, run with `env {unset} partrain bench ...`")
    return notes


def matmul_peak_gflops(dtype="float32", n: int = 1024, repeats: int = 5) -> float:
    """Single-thread GFLOP/s of an n x n matmul: the per-core ceiling for these kernels."""
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).random((n, n)).astype(dtype)
    with threadpool_limits(1):
        a @ a
        best = min(_timed(lambda: a @ a) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _peak_rss_mb(pid: int | None = None) -> tuple[float, float]:
    """(peak RSS, current private RSS) in MiB of a process, from /proc (Linux)."""
    if pid is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        pid = os.getpid()
    else:
        peak = float("nan")
    private = float("nan")
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) / 1024
                elif line.startswith("RssAnon:"):
                    private = int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak, private


# ----------------------------------------------------------------------------- timing


def _windows(step, batch_size: int, duration: float, warmup: float, repeats: int) -> list[float]:
    """Run `step()` for `warmup` s, then `repeats` windows of ~`duration` s; examples/s each."""
    deadline = time.perf_counter() + warmup
    step()
    while time.perf_counter() < deadline:
        step()
    rates = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            step()
            n += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= duration:
                break
        rates.append(n * batch_size / elapsed)
    return rates


def _synthetic(model, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.random((n, *model.input_shape)).astype(model.dtype)
    return X, rng.integers(0, model.n_classes, n)


def plan_chunk_size(plan: str, model, batch_size: int) -> int:
    """Examples per chunk under a bench chunk plan (see CHUNK_PLANS)."""
    if plan == "auto":
        return default_chunk_size(model, batch_size)
    if plan == "max4":
        work = batch_size * max(model.flops_per_example(), 1)
        n_chunks = int(max(1, min(4, work // MIN_CHUNK_FLOPS, batch_size // MIN_CHUNK_EXAMPLES)))
        return -(-batch_size // n_chunks)
    raise ValueError(f"Unknown chunk plan {plan!r}, expected one of {list(CHUNK_PLANS)}.")


def bench_partrain(model_name: str, batch_size: int, n_jobs: int, dtype: str = "float32",
                   repeats: int = 5, duration: float = 3.0, warmup: float = 1.0,
                   chunk_size: int | None = None, backend: str = "loky",
                   scheduler=None) -> BenchRow:
    """Time full training steps of one configuration (`scheduler`: see `Trainer`)."""
    model = zoo.get(model_name, dtype=dtype)
    X, y = _synthetic(model, max(SYNTHETIC_EXAMPLES, batch_size))
    with warnings.catch_warnings():  # a clamped n_jobs is marked in the table instead
        warnings.simplefilter("ignore", ParallelismWarning)
        trainer = Trainer(model, Adam(1e-4), n_jobs=n_jobs, batch_size=batch_size,
                          chunk_size=chunk_size, progress=False, backend=backend,
                          scheduler=scheduler)
    timings = []
    state = {"step": 0}

    def step():
        k = state["step"]
        start = (k * batch_size) % (len(X) - batch_size + 1)
        t0 = time.perf_counter()
        trainer.train_step(np.arange(start, start + batch_size), 0, k)
        t1 = time.perf_counter()
        timings.append((t1 - t0, trainer.engine.last_timing))
        state["step"] = k + 1

    with trainer, trainer.session(X, y):
        rates = _windows(step, batch_size, duration, warmup, repeats)
        workers = [_peak_rss_mb(pid) for pid in trainer.engine.worker_pids()]
        moved = getattr(trainer.engine, "last_bytes", None)
    recent = timings[len(timings) // 2:]  # steady state
    step_s = statistics.median(t for t, _ in recent)
    run_s = statistics.median(t.run for _, t in recent)
    reduce_s = statistics.median(t.reduce for _, t in recent)
    compute_s = statistics.median(t.compute_max for _, t in recent)
    median = statistics.median(rates)
    return BenchRow(
        model=model_name, batch_size=batch_size, n_jobs=n_jobs, dtype=dtype,
        engine=f"partrain-{backend}" if n_jobs > 1 or backend != "loky" else "partrain",
        # processes: counted in the steps (a Dask cluster's workers, not what n_jobs planned)
        threads=n_jobs, processes=max(t.processes for _, t in recent),
        chunk_size=trainer.chunk_size,
        examples_per_s=median, examples_per_s_min=min(rates), examples_per_s_max=max(rates),
        gflops=median * model.flops_per_example() / 1e9, step_ms=1e3 * step_s,
        compute_ms=1e3 * compute_s, engine_ms=1e3 * (run_s - compute_s + reduce_s),
        optimizer_ms=1e3 * max(step_s - run_s - reduce_s, 0.0),
        master_peak_rss_mb=_peak_rss_mb()[0], worker_peak_rss_mb=[w[0] for w in workers],
        worker_private_rss_mb=[w[1] for w in workers],
        bytes_per_step=moved and moved["params"] * moved["workers"] + moved["grads"],
        windows=rates)


# ----------------------------------------------------------------------------- the ceiling


def _ceiling_process(model_name: str, dtype: str, batch_size: int, chunk_size: int,
                     n_processes: int, rank: int, repeats: int, duration: float,
                     warmup: float, barrier, queue) -> None:
    """One ceiling process: compute rank `rank`'s group of chunks over and over, alone."""
    keep_freed_memory()
    model = zoo.get(model_name, dtype=dtype)
    X, y = _synthetic(model, batch_size, seed=rank)
    group = step_groups(batch_size, chunk_size, n_processes)[rank]
    batch_idx, grad = np.arange(batch_size), np.empty_like(model.params)
    n_examples = sum(stop - start for _, (start, stop) in group)

    def step():
        for k, bounds in group:
            compute_chunk(model, model.params, X, y, batch_idx, k, bounds, (0, 1, 0, 0), grad,
                          None)

    barrier.wait()  # everyone starts together, so the windows overlap
    rates = _windows(step, n_examples, duration, warmup, repeats)
    queue.put((rank, [n_examples / rate for rate in rates]))  # seconds per step, per window


def bench_ceiling(model_name: str, batch_size: int, n_jobs: int, dtype: str = "float32",
                  repeats: int = 5, duration: float = 3.0, warmup: float = 1.0,
                  chunk_size: int | None = None) -> BenchRow:
    """The machine's ceiling for partrain at `n_jobs`: its processes' chunk groups computed
    by independent processes (one BLAS thread each) at the same time, with no engine, no
    reduction and no optimizer; examples/s = batch / the slowest process's step time."""
    model = zoo.get(model_name, dtype=dtype)
    chunk_size = min(chunk_size or default_chunk_size(model, batch_size), batch_size)
    processes = plan_processes(n_jobs, batch_size, chunk_size).processes
    context = multiprocessing.get_context("spawn")
    barrier, queue = context.Barrier(processes), context.SimpleQueue()
    with children_blas_threads(1):
        procs = [context.Process(target=_ceiling_process, daemon=True, args=(
            model_name, dtype, batch_size, chunk_size, processes, rank, repeats, duration,
            warmup, barrier, queue)) for rank in range(processes)]
        for proc in procs:
            proc.start()
    step_times = dict(queue.get() for _ in procs)
    for proc in procs:
        proc.join()
    rates = [batch_size / max(step_times[r][w] for r in step_times) for w in range(repeats)]
    return BenchRow(model=model_name, batch_size=batch_size, n_jobs=n_jobs, dtype=dtype,
                    engine="ceiling", threads=processes, processes=processes,
                    chunk_size=chunk_size, examples_per_s=statistics.median(rates),
                    examples_per_s_min=min(rates), examples_per_s_max=max(rates),
                    windows=rates)


# ----------------------------------------------------------------------------- PyTorch


def bench_torch(model_name: str, batch_size: int, threads: int, config: str = "default",
                repeats: int = 5, duration: float = 3.0, warmup: float = 1.0) -> BenchRow:
    """Time PyTorch's training step (float32, Adam): config "default", "tuned" or "ddp"
    (then `threads` is the number of single-thread processes)."""
    if config == "ddp":
        rates = time_torch_ddp(model_name, batch_size, threads, repeats, duration, warmup)
    else:
        rates = time_torch(model_name, batch_size, threads, config == "tuned",
                           lambda step, b: _windows(step, b, duration, warmup, repeats))
    engine = "torch" if config == "default" else f"torch-{config}"
    return BenchRow(model=model_name, batch_size=batch_size,
                    n_jobs=threads if config == "ddp" else 1, dtype="float32", engine=engine,
                    threads=threads, processes=threads if config == "ddp" else 1,
                    chunk_size=batch_size, examples_per_s=statistics.median(rates),
                    examples_per_s_min=min(rates), examples_per_s_max=max(rates),
                    windows=rates)


def torch_configs(n_jobs: list[int]) -> list[tuple[str, int]]:
    """(config, threads or processes) of every PyTorch baseline: default and tuned at
    1..cores threads, DDP at every n_jobs above 1."""
    threads = range(1, usable_cores() + 1)
    return [(c, t) for c in ("default", "tuned") for t in threads] + \
        [("ddp", n) for n in sorted(set(n_jobs)) if n > 1]


# ----------------------------------------------------------------------------- the run


def run_bench(models: list[str], batch_sizes: list[int], n_jobs: list[int],
              dtype: str = "float32", repeats: int = 5, duration: float = 3.0,
              warmup: float = 1.0, compare_torch: bool = False, chunk_size: int | None = None,
              backend: str = "loky", scheduler=None, progress: bool = True,
              scaling: tuple[str, ...] = ("strong",), ceiling: bool = True,
              chunk_plans: tuple[str, ...] = ("auto",)) -> dict:
    """Measure every (model, batch size, n_jobs), their ceilings, optionally PyTorch; return
    a report dict.

    `repeats` rounds, each timing every configuration for one window (see the module
    docstring); a row's examples/s is the median of its rounds. `scaling` "strong" keeps each
    batch size; "weak" runs batch size x n_jobs (the batch sizes are then per process).
    `chunk_plans`: partrain (and its ceiling) under each plan of CHUNK_PLANS, unless
    `chunk_size` fixes the chunks. backend="dask" times the local (loky) backend at the same
    configurations too, as the reference for Dask's overhead; `scheduler` is the Dask cluster
    (see `Trainer`).

    The report holds `machine` (taken before the run, with its load), `warnings`,
    `matmul_peak_gflops_per_core`, `settings`, `rows` (dicts of `BenchRow`) and
    `torch_skipped` (the reason, when a requested comparison could not run).
    """
    for name in models:
        zoo.get(name)  # validates the name
    # each configuration once, in the order given (a repeated value would be measured twice)
    models, batch_sizes = list(dict.fromkeys(models)), list(dict.fromkeys(batch_sizes))
    chunk_plans = tuple(dict.fromkeys(chunk_plans))
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ValueError(f"`batch_size` values must be integers >= 1, got {batch_sizes}.")
    if not n_jobs:
        raise ValueError("`n_jobs` needs at least one value, got none.")
    n_jobs = sorted({resolve_n_jobs(j) for j in n_jobs})  # -1 = all cores, as everywhere
    if repeats < 1 or duration <= 0 or warmup < 0:
        raise ValueError("`repeats` must be >= 1, `duration` > 0 and `warmup` >= 0, got "
                         f"{repeats}, {duration}, {warmup}.")
    if not scaling or set(scaling) - set(SCALINGS):
        raise ValueError(f"Invalid scaling: {scaling!r}, expected some of {list(SCALINGS)}.")
    if not chunk_plans or set(chunk_plans) - set(CHUNK_PLANS):
        raise ValueError(f"Invalid chunk plans: {chunk_plans!r}, expected some of "
                         f"{list(CHUNK_PLANS)}.")
    if chunk_size is not None and tuple(chunk_plans) != ("auto",):
        raise ValueError(f"A fixed chunk size ({chunk_size}) leaves no chunk plan to compare: "
                         f"give chunk_size or chunk plans {list(chunk_plans)}, not both.")
    machine = machine_info()  # before anything runs: the load average of the machine as found
    skipped = torch_unavailable_reason() if compare_torch else None
    backends = ["loky"] if backend == "loky" else ["loky", backend]
    jobs = [(kind, m, b, j, be, plan) for kind in SCALINGS if kind in scaling for m in models
            for b in batch_sizes for plan in chunk_plans for be in backends for j in n_jobs]
    if ceiling:
        jobs += [("ceiling", m, b, j, kind, plan) for kind in SCALINGS if kind in scaling
                 for m in models for b in batch_sizes for plan in chunk_plans for j in n_jobs]
    if compare_torch and not skipped:
        jobs += [("torch", m, b, t, config, None) for m in models for b in batch_sizes
                 for config, t in torch_configs(n_jobs)]
    # one model and batch size back to back within a round: the rows compared are close in time
    order = sorted(jobs, key=lambda job: (models.index(job[1]), batch_sizes.index(job[2])))
    from tqdm.auto import tqdm

    measured: dict[tuple, list[BenchRow]] = {job: [] for job in jobs}
    failed: dict[tuple, str] = {}
    with tqdm(total=len(jobs) * repeats, desc="bench", disable=not progress,
              file=sys.stderr) as bar:
        for round_ in range(repeats):
            for job in order:
                kind, m, b, j, variant, plan = job
                bar.set_postfix_str(f"round {round_ + 1}: {kind} {m} batch {b} {variant} {j}"
                                    + (f" {plan} plan" if len(chunk_plans) > 1 else ""))
                if job not in failed:
                    try:
                        measured[job].append(_measure(job, dtype, duration, warmup,
                                                      chunk_size, scheduler))
                    except Exception as exc:  # a crashed baseline must not cost the whole run
                        if kind != "torch":
                            raise
                        failed[job] = (f"torch {variant} {m} batch {b} x{j}: "
                                       f"{type(exc).__name__}: "
                                       f"{str(exc).splitlines()[0] if str(exc) else ''}")
                bar.update()
    rows = [merge_rounds(measured[job]) for job in jobs if job not in failed]
    _add_ratios(rows)
    return {"machine": machine, "warnings": machine_warnings(machine),
            "matmul_peak_gflops_per_core": matmul_peak_gflops(dtype),
            "settings": {"repeats": repeats, "duration_s": duration, "warmup_s": warmup,
                         "dtype": dtype, "backend": backend, "scaling": list(scaling),
                         "chunk_plans": list(chunk_plans), "rounds": "interleaved"},
            "torch_skipped": skipped, "torch_failed": list(failed.values()),
            "rows": [asdict(r) for r in rows]}


def _measure(job: tuple, dtype, duration, warmup, chunk_size, scheduler) -> BenchRow:
    """One window of one configuration of the plan built by `run_bench`."""
    kind, model, batch, n, variant, plan = job
    if kind == "torch":
        return bench_torch(model, batch, n, variant, 1, duration, warmup)
    scaling = variant if kind == "ceiling" else kind
    global_batch = batch * n if scaling == "weak" else batch
    chunk_size = chunk_size or plan_chunk_size(plan, zoo.get(model, dtype=dtype), global_batch)
    if kind == "ceiling":
        row = bench_ceiling(model, global_batch, n, dtype, 1, duration, warmup, chunk_size)
    else:
        row = bench_partrain(model, global_batch, n, dtype, 1, duration, warmup, chunk_size,
                             variant, scheduler if variant == "dask" else None)
    row.scaling, row.chunk_plan = scaling, plan
    return row


def merge_rounds(rounds: list[BenchRow]) -> BenchRow:
    """One row from a configuration's rounds: examples/s the median of the rounds' windows
    (min and max theirs), the per-step breakdown the median of the rounds' medians."""
    row = rounds[0]
    windows = [w for r in rounds for w in r.windows]
    row.windows = windows
    row.examples_per_s = statistics.median(windows)
    row.examples_per_s_min, row.examples_per_s_max = min(windows), max(windows)
    for name in ("step_ms", "compute_ms", "engine_ms", "optimizer_ms"):
        values = [getattr(r, name) for r in rounds if getattr(r, name) is not None]
        setattr(row, name, statistics.median(values) if values else None)
    if row.gflops is not None:  # follows the merged examples/s
        row.gflops = row.examples_per_s * zoo.get(row.model).flops_per_example() / 1e9
    for name in ("worker_peak_rss_mb", "worker_private_rss_mb"):
        per_round = [getattr(r, name) for r in rounds if getattr(r, name)]
        setattr(row, name, [max(values) for values in zip(*per_round)] if per_round else [])
    row.master_peak_rss_mb = max((r.master_peak_rss_mb for r in rounds
                                  if r.master_peak_rss_mb is not None), default=None)
    return row


def _add_ratios(rows: list[BenchRow]) -> None:
    """Speedup and parallel efficiency against partrain's n_jobs=1 for the same model and
    batch size (weak scaling: the same per-process batch), the in-process run when measured,
    else the backend's own n_jobs=1 run; None for rows whose steps had fewer chunks than
    n_jobs (fewer processes computed than the row says). Engine efficiency against the
    ceiling row. Rows are compared only with rows of the same chunk plan."""
    def per_process(r: BenchRow) -> int:
        return r.batch_size // r.n_jobs if r.scaling == "weak" else r.batch_size

    partrain = [r for r in rows if r.engine.startswith("partrain")]
    base = {}
    for r in sorted((r for r in partrain if r.n_jobs == 1), key=lambda r: r.engine != "partrain"):
        base.setdefault((r.model, per_process(r), r.scaling, r.chunk_plan), r.examples_per_s)
    ceilings = {(r.model, r.batch_size, r.n_jobs, r.scaling, r.chunk_plan): r.examples_per_s
                for r in rows if r.engine == "ceiling"}
    for r in partrain:
        ref = base.get((r.model, per_process(r), r.scaling, r.chunk_plan))
        if ref and r.processes == r.n_jobs:  # else n_jobs was clamped: no speedup to claim
            r.speedup = r.examples_per_s / ref
            r.parallel_efficiency = r.speedup / r.n_jobs
        top = ceilings.get((r.model, r.batch_size, r.n_jobs, r.scaling, r.chunk_plan))
        if top and r.engine in ("partrain", "partrain-loky"):
            r.engine_efficiency = r.examples_per_s / top


# ----------------------------------------------------------------------------- output


# One line each under the table: what its derived columns mean.
DEFINITIONS = (
    "speedup = examples/s / partrain's examples/s at n_jobs=1 (same model, batch, chunk plan)",
    "par. eff = parallel efficiency = speedup / n_jobs (1.00 = every process fully used)",
    "eng. eff = engine efficiency = partrain's examples/s / the ceiling's (the same chunks in "
    "n independent processes, no engine; 1.00 = the engine costs nothing)",
    "ms per step: step = wall time; compute = the busiest process's forward/backward; "
    "engine = the rest of the master's step (dispatch, wait, reduce); adam = the update",
)


def parallel_efficiency(row: dict) -> float | None:
    """A report row's speedup / n_jobs, under its name before and after the rename."""
    return row.get("parallel_efficiency", row.get("efficiency"))


def format_table(report: dict) -> str:
    """The terminal table: one line per configuration, the columns' definitions, then
    partrain-vs-torch ratios."""
    head = (f"{'model':<11}{'batch':>6}{'scaling':>8}{'runner':>20}{'jobs':>5}  "
            f"{'examples/s [min-max]':<26}{'speedup':>8}{'par. eff':>9}{'eng. eff':>9}"
            f"{'GFLOP/s':>9}{'step ms':>9}{'compute ms':>11}{'engine ms':>10}{'adam ms':>8}")
    lines = [f"WARNING: {note}" for note in report.get("warnings", [])]
    lines += [head, "-" * len(head)]
    for r in report["rows"]:
        rate = (f"{r['examples_per_s']:>9,.0f} [{r['examples_per_s_min']:,.0f}-"
                f"{r['examples_per_s_max']:,.0f}]")
        engine = r["engine"]
        if engine in ("torch", "torch-tuned"):
            engine = f"{engine} {r['threads']}thr"
        elif r.get("chunk_plan") not in (None, "auto"):
            engine = f"{engine} {r['chunk_plan']}"
        jobs = f"{r['n_jobs']}*" if r["processes"] < r["n_jobs"] else str(r["n_jobs"])
        lines.append(
            f"{r['model']:<11}{r['batch_size']:>6}{r['scaling']:>8}{engine:>20}{jobs:>5}  "
            f"{rate:<26}{_fmt(r['speedup'], '.2f')}{_fmt(parallel_efficiency(r), '.2f', 9)}"
            f"{_fmt(r['engine_efficiency'], '.2f', 9)}"
            f"{_fmt(r['gflops'], '.1f', 9)}{_fmt(r['step_ms'], '.2f', 9)}"
            f"{_fmt(r['compute_ms'], '.2f', 11)}{_fmt(r['engine_ms'], '.2f', 10)}"
            f"{_fmt(r['optimizer_ms'], '.2f', 8)}")
    lines += DEFINITIONS
    lines.append(f"matmul peak (1 thread, {report['settings']['dtype']}): "
                 f"{report['matmul_peak_gflops_per_core']:.1f} GFLOP/s per core; "
                 f"{report['machine']['cpu']}, {report['machine']['cores']} cores")
    lines.append(_kernel_line(report["machine"]))
    clamped = sorted({(r["n_jobs"], r["processes"]) for r in report["rows"]
                      if r["processes"] < r["n_jobs"]})
    for n_jobs, processes in clamped:
        lines.append(f"* n_jobs={n_jobs}: each step had only {processes} chunk(s), so it ran in "
                     f"{processes} process(es); no speedup is claimed (see --chunk-size)")
    lines += _dask_overhead_lines(report)
    lines += _torch_ratio_lines(report)
    return "\n".join(lines)


def _kernel_line(machine: dict) -> str:
    """Which BLAS kernels ran, and whether the environment forced them."""
    blas = "; ".join(f"{b['internal_api']} {b['version']} {b['architecture']} kernels, "
                     f"{b['num_threads']} threads max" for b in machine["blas"]) or "no BLAS"
    forced = " ".join(f"{k}={v}" for k, v in machine["forced_kernels"].items())
    load = machine["load_average"]
    return (f"BLAS: {blas}; forced by the environment: {forced or 'nothing'}; load average "
            f"before the run: {'-' if load is None else f'{load:.2f}'}")


def _dask_overhead_lines(report: dict) -> list[str]:
    """Per step, what Dask costs beyond the local backend at the same n_jobs."""
    def key(r: dict) -> tuple:
        return r["model"], r["batch_size"], r["n_jobs"], r.get("chunk_plan")

    local = {key(r): r for r in report["rows"] if r["engine"] in ("partrain", "partrain-loky")}
    lines = []
    for r in report["rows"]:
        ref = local.get(key(r))
        if r["engine"] == "partrain-dask" and ref:
            lines.append(
                f"dask {r['model']} batch {r['batch_size']} n_jobs {r['n_jobs']}: step "
                f"{r['step_ms']:.2f} ms vs local {ref['step_ms']:.2f} ms (+"
                f"{r['step_ms'] - ref['step_ms']:.2f} ms); {r['bytes_per_step'] / 1e6:.2f} MB "
                "over the network per step")
    return lines


def _fmt(value, spec: str, width: int = 8) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def _describe(r: dict) -> str:
    if r["engine"] == "torch-ddp":
        return f"torch DDP {r['threads']}x1 thread"
    if r["engine"].startswith("torch"):
        kind = "tuned" if r["engine"] == "torch-tuned" else "default"
        return f"torch {kind}, {r['threads']} thread{'s' * (r['threads'] > 1)}"
    if r["processes"] < r["n_jobs"]:  # clamped: say what actually ran
        return f"partrain n_jobs={r['n_jobs']}, {r['processes']} process(es)"
    return f"partrain n_jobs={r['n_jobs']}"


def _torch_ratio_lines(report: dict) -> list[str]:
    """Best partrain against the best of every PyTorch configuration, per model and batch."""
    if report["torch_skipped"]:
        return [f"torch comparison skipped: {report['torch_skipped']}"]
    lines = [f"torch baseline failed (left out): {note}" for note in report.get("torch_failed", [])]
    best: dict = {}
    for r in report["rows"]:
        if r["scaling"] != "strong" or r["engine"] in ("ceiling", "partrain-dask") \
                or r.get("chunk_plan") not in (None, "auto"):  # partrain as shipped only
            continue
        key = (r["model"], r["batch_size"], r["engine"].startswith("torch"))
        if r["examples_per_s"] > best.get(key, {"examples_per_s": 0})["examples_per_s"]:
            best[key] = r
    for (model, batch, is_torch), mine in sorted(best.items()):
        theirs = best.get((model, batch, True))
        if not is_torch and theirs:
            lines.append(f"{model} batch {batch}: best partrain ({_describe(mine)}) "
                         f"{mine['examples_per_s']:,.0f} ex/s vs best torch ({_describe(theirs)})"
                         f" {theirs['examples_per_s']:,.0f} ex/s -> ratio "
                         f"{mine['examples_per_s'] / theirs['examples_per_s']:.2f}")
    return lines


def write_json(report: dict, path: str | Path) -> None:
    """The full report as JSON, written atomically (its folder created)."""
    write_text(path, json.dumps(report, indent=1))


def write_csv(report: dict, path: str | Path) -> None:
    """One row per configuration, with the machine's kernel, forcing and load columns; lists
    (windows, worker memory) joined by ';'."""
    rows = report["rows"]
    machine = {f"machine_{k}": v for k, v in report["machine"].items()
               if k not in ("blas", "forced_kernels")}
    machine["machine_blas"] = " | ".join(
        f"{b['internal_api']} {b['version']} {b['architecture']} {b['num_threads']}thr"
        for b in report["machine"]["blas"])
    machine["machine_forced_kernels"] = " ".join(
        f"{k}={v}" for k, v in report["machine"]["forced_kernels"].items())
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=[*rows[0], *machine])
    writer.writeheader()
    for r in rows:
        flat = {k: ";".join(f"{x:.6g}" for x in v) if isinstance(v, list) else v
                for k, v in r.items()}
        writer.writerow({**flat, **machine})
    write_text(path, text.getvalue())
