"""Scaling experiments: examples/s, speedup and efficiency per worker count.

Each configuration (model, batch size, n_jobs) runs full training steps (fan-out, chunk
forward/backward, ordered reduction, Adam on the master) on synthetic data of the model's
input shape, after a warm-up, in several timed windows; speedup and efficiency are taken
against n_jobs=1 measured in the same run. With the Dask backend, the local backend is timed
at the same configurations too, so the table shows Dask's extra cost per step beside it.
"""

from __future__ import annotations

import csv
import json
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
from .optim import Adam
from .parallel import ParallelismWarning, resolve_n_jobs
from .trainer import Trainer

SYNTHETIC_EXAMPLES = 2048


@dataclass
class BenchRow:
    """One measured configuration; `windows` holds the examples/s of every timed window."""

    model: str
    batch_size: int
    n_jobs: int
    dtype: str
    engine: str
    threads: int
    processes: int  # processes that computed each step: fewer than n_jobs when chunks lack
    chunk_size: int
    examples_per_s: float
    examples_per_s_min: float
    examples_per_s_max: float
    speedup: float | None = None
    efficiency: float | None = None
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
    """CPU, cores, NumPy and BLAS versions: what a reader needs to compare figures."""
    from threadpoolctl import threadpool_info

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    blas = [{k: pool.get(k) for k in ("internal_api", "version", "num_threads")}
            for pool in threadpool_info() if pool.get("user_api") == "blas"]
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "blas": blas, "platform": platform.platform()}


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


# ----------------------------------------------------------------------------- partrain


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


def bench_partrain(model_name: str, batch_size: int, n_jobs: int, dtype: str = "float32",
                   repeats: int = 5, duration: float = 3.0, warmup: float = 1.0,
                   chunk_size: int | None = None, backend: str = "loky",
                   scheduler=None) -> BenchRow:
    """Time full training steps of one configuration (`scheduler`: see `Trainer`)."""
    model = zoo.get(model_name, dtype=dtype)
    rng = np.random.default_rng(0)
    X = rng.random((max(SYNTHETIC_EXAMPLES, batch_size), *model.input_shape)).astype(dtype)
    y = rng.integers(0, model.n_classes, len(X))
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
        workers = [_peak_rss_mb(pid) for pid in getattr(trainer.engine, "worker_pids", list)()]
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
        threads=n_jobs, processes=trainer.plan.processes, chunk_size=trainer.chunk_size,
        examples_per_s=median,
        examples_per_s_min=min(rates), examples_per_s_max=max(rates),
        gflops=median * model.flops_per_example() / 1e9, step_ms=1e3 * step_s,
        compute_ms=1e3 * compute_s, engine_ms=1e3 * (run_s - compute_s + reduce_s),
        optimizer_ms=1e3 * max(step_s - run_s - reduce_s, 0.0),
        master_peak_rss_mb=_peak_rss_mb()[0], worker_peak_rss_mb=[w[0] for w in workers],
        worker_private_rss_mb=[w[1] for w in workers],
        bytes_per_step=moved and moved["params"] * moved["workers"] + moved["grads"],
        windows=rates)


# ----------------------------------------------------------------------------- PyTorch


def torch_unavailable_reason() -> str | None:
    """None if PyTorch can be imported, else why the comparison is skipped."""
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        return (f"PyTorch is not installed ({exc}); pip install \"partrain[compare]\" "
                "to compare")
    return None


def torch_network(model_name: str):
    """The same reference network in PyTorch (NCHW, as PyTorch runs it natively)."""
    from torch import nn

    nets = {
        "signs-cnn": lambda: nn.Sequential(nn.Conv2d(3, 10, 3, stride=2, padding=2), nn.ReLU(),
                                           nn.MaxPool2d(2, stride=1), nn.Flatten(),
                                           nn.Linear(10240, 6)),
        "mnist-cnn": lambda: nn.Sequential(nn.Conv2d(1, 8, 5), nn.ReLU(), nn.Conv2d(8, 8, 5),
                                           nn.ReLU(), nn.MaxPool2d(2, 2), nn.Flatten(),
                                           nn.Linear(800, 128), nn.ReLU(), nn.Linear(128, 10)),
        "mlp": lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.ReLU(),
                                     nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10)),
        "digits-cnn": lambda: nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                                            nn.MaxPool2d(2, 2), nn.Flatten(), nn.Linear(256, 10)),
    }
    return nets[model_name]()


def bench_torch(model_name: str, batch_size: int, threads: int, repeats: int = 5,
                duration: float = 3.0, warmup: float = 1.0) -> BenchRow:
    """Time PyTorch's training step (float32, Adam) of the same network and batch size."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        net = torch_network(model_name)
        shape = zoo.get(model_name).input_shape
        x = torch.rand(batch_size, *shape)
        if x.dim() == 4:
            x = x.permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        y = torch.randint(0, zoo.get(model_name).n_classes, (batch_size,))
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)
        loss_fn = torch.nn.CrossEntropyLoss()

        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn(net(x), y).backward()
            opt.step()

        rates = _windows(step, batch_size, duration, warmup, repeats)
    finally:
        torch.set_num_threads(previous)
    median = statistics.median(rates)
    return BenchRow(model=model_name, batch_size=batch_size, n_jobs=1, dtype="float32",
                    engine="torch", threads=threads, processes=1, chunk_size=batch_size,
                    examples_per_s=median, examples_per_s_min=min(rates),
                    examples_per_s_max=max(rates), windows=rates)


# ----------------------------------------------------------------------------- the run


def run_bench(models: list[str], batch_sizes: list[int], n_jobs: list[int],
              dtype: str = "float32", repeats: int = 5, duration: float = 3.0,
              warmup: float = 1.0, compare_torch: bool = False, chunk_size: int | None = None,
              backend: str = "loky", scheduler=None, progress: bool = True) -> dict:
    """Measure every (model, batch size, n_jobs) and optionally PyTorch; return a report dict.

    backend="dask" times the local (loky) backend at the same configurations first, as the
    reference for Dask's overhead; `scheduler` is the Dask cluster (see `Trainer`).

    The report holds `machine`, `matmul_peak_gflops_per_core`, `rows` (dicts of `BenchRow`),
    and `torch_skipped` (the reason, when a requested comparison could not run).
    """
    for name in models:
        zoo.get(name)  # validates the name
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ValueError(f"`batch_size` values must be integers >= 1, got {batch_sizes}.")
    if not n_jobs:
        raise ValueError("`n_jobs` needs at least one value, got none.")
    n_jobs = [resolve_n_jobs(j) for j in n_jobs]  # -1 = all cores, as everywhere
    if repeats < 1 or duration <= 0 or warmup < 0:
        raise ValueError("`repeats` must be >= 1, `duration` > 0 and `warmup` >= 0, got "
                         f"{repeats}, {duration}, {warmup}.")
    skipped = torch_unavailable_reason() if compare_torch else None
    torch_threads = sorted({1, os.cpu_count() or 1})
    backends = ["loky"] if backend == "loky" else ["loky", backend]
    configs = [(m, b, j, be) for m in models for b in batch_sizes for be in backends
               for j in sorted(set(n_jobs))]
    n_torch = len(models) * len(batch_sizes) * len(torch_threads) if compare_torch and not \
        skipped else 0
    from tqdm.auto import tqdm

    rows = []
    with tqdm(total=len(configs) + n_torch, desc="bench", disable=not progress,
              file=sys.stderr) as bar:
        for m, b, j, be in configs:
            bar.set_postfix_str(f"{m} batch {b} {be} n_jobs {j}")
            rows.append(bench_partrain(m, b, j, dtype, repeats, duration, warmup, chunk_size,
                                       be, scheduler if be == "dask" else None))
            bar.update()
        if n_torch:
            for m in models:
                for b in batch_sizes:
                    for threads in torch_threads:
                        bar.set_postfix_str(f"torch {m} batch {b} threads {threads}")
                        rows.append(bench_torch(m, b, threads, repeats, duration, warmup))
                        bar.update()
    _add_ratios(rows)
    return {"machine": machine_info(), "matmul_peak_gflops_per_core": matmul_peak_gflops(dtype),
            "settings": {"repeats": repeats, "duration_s": duration, "warmup_s": warmup,
                         "dtype": dtype, "backend": backend},
            "torch_skipped": skipped, "rows": [asdict(r) for r in rows]}


def _add_ratios(rows: list[BenchRow]) -> None:
    """Speedup and efficiency against partrain's n_jobs=1 for the same model and batch size:
    the in-process run when measured, else the backend's own n_jobs=1 run. None for rows
    whose steps had fewer chunks than n_jobs: fewer processes computed than the row says."""
    base = {}
    for r in sorted((r for r in rows if r.n_jobs == 1 and r.engine != "torch"),
                    key=lambda r: r.engine != "partrain"):  # in-process first
        base.setdefault((r.model, r.batch_size), r.examples_per_s)
    for r in rows:
        if r.engine == "torch":
            continue
        ref = base.get((r.model, r.batch_size))
        if ref and r.processes == r.n_jobs:  # else n_jobs was clamped: no speedup to claim
            r.speedup = r.examples_per_s / ref
            r.efficiency = r.speedup / r.n_jobs


# ----------------------------------------------------------------------------- output


def format_table(report: dict) -> str:
    """The terminal table: one line per configuration, then partrain-vs-torch ratios."""
    head = (f"{'model':<11}{'batch':>6}{'engine':>16}{'jobs':>5}  {'examples/s [min-max]':<26}"
            f"{'speedup':>8}{'eff.':>6}{'GFLOP/s':>9}{'step ms':>9}{'compute':>9}"
            f"{'engine':>8}{'adam':>7}")
    lines = [head, "-" * len(head)]
    for r in report["rows"]:
        rate = (f"{r['examples_per_s']:>9,.0f} [{r['examples_per_s_min']:,.0f}-"
                f"{r['examples_per_s_max']:,.0f}]")
        engine = r["engine"] if r["engine"] != "torch" else f"torch {r['threads']}thr"
        clamped = r["processes"] < r["n_jobs"]
        jobs = f"{r['n_jobs']}*" if clamped else str(r["n_jobs"])
        lines.append(
            f"{r['model']:<11}{r['batch_size']:>6}{engine:>16}{jobs:>5}  {rate:<26}"
            f"{_fmt(r['speedup'], '.2f')}{_fmt(r['efficiency'], '.2f', 6)}"
            f"{_fmt(r['gflops'], '.1f', 9)}{_fmt(r['step_ms'], '.2f', 9)}"
            f"{_fmt(r['compute_ms'], '.2f', 9)}{_fmt(r['engine_ms'], '.2f')}"
            f"{_fmt(r['optimizer_ms'], '.2f', 7)}")
    lines.append(f"matmul peak (1 thread, {report['settings']['dtype']}): "
                 f"{report['matmul_peak_gflops_per_core']:.1f} GFLOP/s per core; "
                 f"{report['machine']['cpu']}, {report['machine']['cores']} cores")
    clamped = sorted({(r["n_jobs"], r["processes"]) for r in report["rows"]
                      if r["processes"] < r["n_jobs"]})
    for n_jobs, processes in clamped:
        lines.append(f"* n_jobs={n_jobs}: each step had only {processes} chunk(s), so it ran in "
                     f"{processes} process(es); no speedup is claimed (see --chunk-size)")
    lines += _dask_overhead_lines(report)
    lines += _torch_ratio_lines(report)
    return "\n".join(lines)


def _dask_overhead_lines(report: dict) -> list[str]:
    """Per step, what Dask costs beyond the local backend at the same n_jobs."""
    local = {(r["model"], r["batch_size"], r["n_jobs"]): r for r in report["rows"]
             if r["engine"] in ("partrain", "partrain-loky")}
    lines = []
    for r in report["rows"]:
        ref = local.get((r["model"], r["batch_size"], r["n_jobs"]))
        if r["engine"] == "partrain-dask" and ref:
            lines.append(
                f"dask {r['model']} batch {r['batch_size']} n_jobs {r['n_jobs']}: step "
                f"{r['step_ms']:.2f} ms vs local {ref['step_ms']:.2f} ms (+"
                f"{r['step_ms'] - ref['step_ms']:.2f} ms); {r['bytes_per_step'] / 1e6:.2f} MB "
                "over the network per step")
    return lines


def _fmt(value, spec: str, width: int = 8) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def _torch_ratio_lines(report: dict) -> list[str]:
    if report["torch_skipped"]:
        return [f"torch comparison skipped: {report['torch_skipped']}"]
    best: dict = {}
    for r in report["rows"]:
        key = (r["model"], r["batch_size"], r["engine"] == "torch")
        if r["examples_per_s"] > best.get(key, (0,))[0]:
            best[key] = (r["examples_per_s"], r["n_jobs"], r["threads"])
    lines = []
    for (model, batch, is_torch), (rate, jobs, _) in sorted(best.items()):
        if not is_torch and (model, batch, True) in best:
            t_rate, _, t_threads = best[(model, batch, True)]
            threads = f"{t_threads} thread{'s' if t_threads > 1 else ''}"
            lines.append(f"{model} batch {batch}: best partrain (n_jobs={jobs}) {rate:,.0f} ex/s"
                         f" vs best torch ({threads}) {t_rate:,.0f} ex/s -> ratio "
                         f"{rate / t_rate:.2f}")
    return lines


def write_json(report: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=1))


def write_csv(report: dict, path: str | Path) -> None:
    """One row per configuration; lists (windows, worker memory) joined by ';'."""
    rows = report["rows"]
    machine = {f"machine_{k}": v for k, v in report["machine"].items() if k != "blas"}
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], *machine])
        writer.writeheader()
        for r in rows:
            flat = {k: ";".join(f"{x:.6g}" for x in v) if isinstance(v, list) else v
                    for k, v in r.items()}
            writer.writerow({**flat, **machine})
