#!/usr/bin/env python3
"""Two hosts on one machine: the Dask backend across a network link, per-step cost and bytes.

Creates two Linux network namespaces joined by a veth pair, "host A" (10.213.0.1: the Dask
scheduler and worker A) and "host B" (10.213.0.2: the client, i.e. the trainer, and worker B),
optionally shapes the link (tc: `tbf` for a rate, `netem` for a delay when the kernel has it),
and times full training steps of one model in host B's namespace for each batch size:

- local n_jobs=1: host B alone, the serial engine (what one single-core host does by itself);
- local n_jobs=2: host B alone, the loky engine with 2 processes (the same 2 cores without any
  network: the reference for the Dask row's overhead, as in `partrain bench --backend dask`);
- dask 2 hosts: the Dask backend on workers A and B, the state and gradients of worker A
  crossing the link each step.

The three rows of a batch size live side by side and their timed windows are interleaved, so
a busy host's drift touches them alike. Per row: median step time, the busiest worker's
compute, the Dask row's overhead against local n_jobs=2, the bytes the engine sends and
receives per step, and the bytes that crossed the link per step (veth counters: payload plus
TCP/IP headers, and a little Dask heartbeat traffic). A second host pays when the Dask row's
step is shorter than local n_jobs=1's.

Every process runs in the namespaces created here, so no traffic leaves them; they are removed
at the end, also after an error, Ctrl-C or SIGTERM (not after SIGKILL: then run
`ip netns del partrain<pid>a; ip netns del partrain<pid>b`). Needs root and iproute2.

    sudo python benchmarks/bench_dask_netns.py
    sudo python benchmarks/bench_dask_netns.py --link none,10gbit,1gbit --batch-size 32,64,256
    sudo python benchmarks/bench_dask_netns.py --link 1gbit --delay 0.2ms   # needs sch_netem
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST_A, HOST_B = "10.213.0.1", "10.213.0.2"
PORT = 8786


# ----------------------------------------------------------------------------- host B's side


def link_bytes(device: str) -> int:
    """Bytes sent plus received so far on `device` (of the current namespace)."""
    out = subprocess.run(["ip", "-s", "-j", "link", "show", "dev", device], check=True,
                         capture_output=True, text=True).stdout
    stats = json.loads(out)[0]["stats64"]
    return stats["rx"]["bytes"] + stats["tx"]["bytes"]


class Row:
    """One configuration (n_jobs, backend) of host B, its trainer in a session, and the
    step times of its timed windows."""

    def __init__(self, stack, model_name: str, batch_size: int, n_jobs: int, backend: str,
                 scheduler):
        import numpy as np

        from partrain import Trainer, zoo
        from partrain.optim import Adam

        model = zoo.get(model_name)
        rng = np.random.default_rng(0)
        self.n = max(2048, batch_size)
        X = rng.random((self.n, *model.input_shape)).astype(model.dtype)
        y = rng.integers(0, model.n_classes, self.n)
        self.trainer = stack.enter_context(Trainer(
            model, Adam(1e-4), n_jobs=n_jobs, batch_size=batch_size, progress=False,
            backend=backend, scheduler=scheduler))
        stack.enter_context(self.trainer.session(X, y))
        self.key = {"model": model_name, "batch_size": batch_size, "n_jobs": n_jobs,
                    "backend": backend, "processes": self.trainer.plan.processes}
        self.batch_size, self.count = batch_size, 0
        self.steps, self.computes, self.link = [], [], 0

    def run(self, seconds: float, device: str | None) -> None:
        """Steps for `seconds`; with `device`, add the bytes it moved meanwhile."""
        import numpy as np

        before = link_bytes(device) if device else 0
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            start = (self.count * self.batch_size) % (self.n - self.batch_size + 1)
            t0 = time.perf_counter()
            self.trainer.train_step(np.arange(start, start + self.batch_size), 0, self.count)
            self.steps.append(time.perf_counter() - t0)
            self.computes.append(self.trainer.engine.last_timing.compute_max)
            self.count += 1
        if device:
            self.link += link_bytes(device) - before

    def result(self) -> dict:
        sent = getattr(self.trainer.engine, "last_bytes", None)
        return {**self.key, "steps": len(self.steps),
                "step_ms": 1e3 * statistics.median(self.steps),
                "compute_ms": 1e3 * statistics.median(self.computes),
                "engine_bytes": sent and sent["params"] * sent["workers"] + sent["grads"],
                "link_bytes": self.link / len(self.steps)}


def measure(args) -> None:
    """In host B's namespace, per batch size: the three rows side by side, their timed
    windows interleaved (a busy host drifts less between them); results as JSON lines."""
    import contextlib

    from threadpoolctl import threadpool_limits

    scheduler = f"tcp://{HOST_A}:{PORT}"
    slices = 4  # windows per repeat and row
    with threadpool_limits(1):
        for batch in args.batch_size:
            with contextlib.ExitStack() as stack:
                rows = [Row(stack, args.model, batch, n_jobs, backend,
                            scheduler if backend == "dask" else None)
                        for n_jobs, backend in ((1, "loky"), (2, "loky"), (2, "dask"))]
                for row in rows:
                    row.run(args.warmup, None)
                    row.steps, row.computes = [], []
                for _ in range(args.repeats * slices):
                    for row in rows:
                        row.run(args.duration / slices,
                                args.device if row.key["backend"] == "dask" else None)
                for row in rows:
                    print(json.dumps(row.result()), flush=True)


# ----------------------------------------------------------------------------- the machine


class Namespaces:
    """Two network namespaces joined by a veth pair; `close()` removes them (and the pair)."""

    def __init__(self, tag: str):
        self.a, self.b = f"partrain{tag}a", f"partrain{tag}b"
        self.dev_a, self.dev_b = f"ptr{tag}a", f"ptr{tag}b"
        self.created: list[str] = []
        for ns in (self.a, self.b):
            run("ip", "netns", "add", ns)
            self.created.append(ns)
        run("ip", "link", "add", self.dev_a, "netns", self.a, "type", "veth", "peer", "name",
            self.dev_b, "netns", self.b)
        for ns, dev, address in ((self.a, self.dev_a, HOST_A), (self.b, self.dev_b, HOST_B)):
            run("ip", "-n", ns, "addr", "add", f"{address}/30", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")

    def shape(self, rate: str | None, delay: str | None) -> str:
        """Shape both directions of the link (egress of each end); returns a description."""
        for ns, dev in ((self.a, self.dev_a), (self.b, self.dev_b)):
            subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"],
                           capture_output=True)
            if delay:
                netem = ["netem", "delay", delay] + (["rate", rate] if rate else [])
                proc = subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root",
                                       *netem], capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(f"tc netem failed ({proc.stderr.strip()}): this kernel "
                                     "has no sch_netem, so no delay here; run without --delay.")
            elif rate:
                bits = parse_rate(rate)
                burst = max(64 * 1024, int(bits / 8 / 1000))  # 1 ms of traffic, >= a GSO packet
                run("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                    "burst", str(burst), "latency", "50ms")
        return ", ".join(filter(None, [rate and f"rate {rate}", delay and f"delay {delay}"])) \
            or "unshaped veth"

    def close(self) -> None:
        for ns in self.created:  # deleting a namespace deletes the veth end inside it
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.created = []


def run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True)


def parse_rate(rate: str) -> float:
    """'1gbit' -> 1e9 bits/s (tc's units: kbit, mbit, gbit)."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1.0}
    for unit, scale in units.items():
        if rate.lower().endswith(unit):
            return float(rate[:-len(unit)]) * scale
    raise ValueError(f"rate {rate!r}: expected a number with kbit, mbit or gbit")


def dask_environment() -> dict:
    """The environment of the Dask processes: partrain importable, the engine's settings for
    a quiet cluster (no profiler, slow watchdog ticks) as DASK_* variables."""
    from partrain.dask_engine import LOCAL_CLUSTER_CONFIG

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    for key, value in LOCAL_CLUSTER_CONFIG.items():
        env["DASK_" + key.upper().replace(".", "__").replace("-", "_")] = str(value)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    return env


class Processes:
    """Processes started in a namespace, each in its own session; `close()` ends them."""

    def __init__(self, env: dict, log):
        self.env, self.log, self.procs = env, log, []

    def start(self, ns: str, *command: str) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *command], env=self.env,
                                stdout=self.log, stderr=self.log, start_new_session=True)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs = []


def wait_for_workers(env: dict, ns: str, n: int, timeout: float = 60) -> None:
    """Until the scheduler on host A lists `n` workers (asked from host B)."""
    code = ("import distributed, sys; c = distributed.Client(sys.argv[1], timeout=30); "
            "c.wait_for_workers(int(sys.argv[2]), timeout=float(sys.argv[3])); c.close()")
    subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code,
                    f"tcp://{HOST_A}:{PORT}", str(n), str(timeout)], env=env, check=True,
                   capture_output=True, timeout=timeout + 30)


# ----------------------------------------------------------------------------- report


def report(rows: list[dict], link: str) -> list[str]:
    """Lines of the table of one link setting."""
    lines = [f"link: {link}",
             f"{'batch':>5} {'row':<16}{'step ms':>9}{'compute':>9}{'overhead':>10}"
             f"{'engine MB':>11}{'link MB':>9}  second host pays?"]
    for batch in sorted({r["batch_size"] for r in rows}):
        rs = {(r["backend"], r["n_jobs"]): r for r in rows if r["batch_size"] == batch}
        one, two, dask = rs[("loky", 1)], rs[("loky", 2)], rs[("dask", 2)]
        for label, r in (("local n_jobs=1", one), ("local n_jobs=2", two),
                         ("dask 2 hosts", dask)):
            overhead = f"{r['step_ms'] - two['step_ms']:+10.2f}" if r is dask else f"{'':>10}"
            moved = (f"{r['engine_bytes'] / 1e6:11.2f}{r['link_bytes'] / 1e6:9.2f}"
                     if r is dask else f"{'-':>11}{'-':>9}")
            pays = ""
            if r is dask:
                gain = one["step_ms"] - dask["step_ms"]
                pays = f"  {'yes' if gain > 0 else 'no'} ({gain:+.2f} ms/step vs local n_jobs=1)"
            lines.append(f"{batch:>5} {label:<16}{r['step_ms']:9.2f}{r['compute_ms']:9.2f}"
                         f"{overhead}{moved}{pays}")
    waits = [r["step_ms"] - r["compute_ms"] for r in rows if r["backend"] == "dask"]
    wait = statistics.median(waits)
    lines.append(f"dask 2 hosts: step minus its compute {wait:.2f} ms (median over batch sizes): "
                 f"splitting a step over two hosts pays from about {2 * wait:.0f} ms of "
                 "compute per step on one host (its half must save more than that)")
    return lines


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Dask backend across a veth link between two network namespaces: "
        "per-step time, overhead and bytes against the local backend (needs root).")
    parser.add_argument("--model", default="mnist-cnn", help="zoo model (default mnist-cnn)")
    parser.add_argument("--batch-size", default="32,64,256",
                        help="comma-separated batch sizes (default 32,64,256)")
    parser.add_argument("--link", default="none,10gbit,1gbit",
                        help="comma-separated link rates, tc units; none = unshaped "
                        "(default none,10gbit,1gbit)")
    parser.add_argument("--delay", default=None,
                        help="one-way delay added to each direction, e.g. 0.2ms (tc netem; "
                        "fails if the kernel lacks sch_netem)")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows (default 3)")
    parser.add_argument("--duration", type=float, default=2.0,
                        help="seconds per window (default 2)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds (default 1)")
    parser.add_argument("--json", default=None, help="write every row here")
    parser.add_argument("--log", default=None,
                        help="Dask processes' output (default: discarded)")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.batch_size = [int(b) for b in args.batch_size.split(",") if b.strip()]
        args.link = [None if s.strip() == "none" else s.strip() for s in args.link.split(",")]
        for rate in filter(None, args.link):
            parse_rate(rate)
    except ValueError as exc:
        parser.error(f"--batch-size / --link: {exc}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.measure:
        measure(args)
        return 0
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        print("bench_dask_netns.py needs root and iproute2 (`ip`, `tc`): network namespaces.",
              file=sys.stderr)
        return 2

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    env = dask_environment()
    log = open(args.log, "w") if args.log else subprocess.DEVNULL
    tag = str(os.getpid() % 100000)
    ns = processes = None
    rows, lines = [], []
    try:
        ns = Namespaces(tag)
        processes = Processes(env, log)
        python = sys.executable
        processes.start(ns.a, python, "-m", "distributed.cli.dask_scheduler", "--host", HOST_A,
                        "--port", str(PORT), "--no-dashboard")
        for host_ns, address, name in ((ns.a, HOST_A, "A"), (ns.b, HOST_B, "B")):
            processes.start(host_ns, python, "-m", "distributed.cli.dask_worker",
                            f"tcp://{HOST_A}:{PORT}", "--host", address, "--name", name,
                            "--nthreads", "1", "--no-nanny", "--no-dashboard")
        wait_for_workers(env, ns.b, 2)
        for rate in args.link:
            link = ns.shape(rate, args.delay)
            proc = subprocess.run(
                ["ip", "netns", "exec", ns.b, python, str(Path(__file__).resolve()),
                 "--measure", "--device", ns.dev_b, "--model", args.model,
                 "--batch-size", ",".join(map(str, args.batch_size)),
                 "--repeats", str(args.repeats), "--duration", str(args.duration),
                 "--warmup", str(args.warmup)],
                env=env, capture_output=True, text=True, check=False)
            if proc.returncode:
                print(proc.stderr, file=sys.stderr)
                return 1
            found = [{**json.loads(line), "link": link}
                     for line in proc.stdout.splitlines() if line.startswith("{")]
            rows += found
            lines += report(found, link) + [""]
            print("\n".join(report(found, link)), flush=True)
            print(flush=True)
    finally:
        if processes is not None:
            processes.close()
        if ns is not None:
            ns.close()
        if log is not subprocess.DEVNULL:
            log.close()
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": sys.argv[1:], "delay": args.delay,
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
