"""`partrain bench` end to end on tiny configurations: JSON / CSV / PNG output, speedup and
efficiency bookkeeping, the PyTorch comparison (present and missing), bad options. No timing
assertions: only the structure and the arithmetic of the report."""

import csv
import importlib.util
import json
import math
import os
import re

import pytest
from conftest import PNG_MAGIC, assert_ok, assert_usage_error, run_partrain, subprocess_env

from partrain import zoo

TINY = ["--model", "mlp", "--batch-size", "16", "--repeats", "2", "--duration", "0.2",
        "--warmup", "0.1"]
ROW_FIELDS = ("model", "batch_size", "n_jobs", "dtype", "engine", "threads", "examples_per_s",
              "examples_per_s_min", "examples_per_s_max", "speedup", "parallel_efficiency",
              "engine_efficiency")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib")
    cwd = tmp_path_factory.mktemp("bench")
    proc = run_partrain("bench", *TINY, "--n-jobs", "1,2", "--chunk-size", "8", "--json",
                        "b.json", "--csv", "b.csv", "--plot", "b.png", "--quiet", cwd=cwd)
    assert_ok(proc)
    return cwd, proc, json.loads((cwd / "b.json").read_text())


def test_bench_json_rows_and_ratios(bench_run):
    _, _, report = bench_run
    rows = [r for r in report["rows"] if r["engine"] != "ceiling"]
    assert [(r["model"], r["batch_size"], r["n_jobs"]) for r in rows] == [("mlp", 16, 1),
                                                                          ("mlp", 16, 2)]
    for r in rows:
        missing = [f for f in ROW_FIELDS if f not in r]
        assert not missing, missing
        assert r["dtype"] == "float32"
        assert r["engine"].startswith("partrain")
        assert 0 < r["examples_per_s_min"] <= r["examples_per_s"] <= r["examples_per_s_max"]
        assert len(r["windows"]) == 2
        assert r["parallel_efficiency"] == pytest.approx(r["speedup"] / r["n_jobs"])
    base, two = rows
    assert base["speedup"] == 1.0 and base["parallel_efficiency"] == 1.0
    assert two["speedup"] == pytest.approx(two["examples_per_s"] / base["examples_per_s"])
    assert report["torch_skipped"] is None
    assert report["settings"]["repeats"] == 2


def test_bench_claims_no_speedup_for_steps_with_fewer_chunks_than_workers(tmp_path):
    """mlp batch 16 is one chunk per step: the n_jobs=2 row ran in one process, so it has no
    speedup or efficiency, and the table marks it instead of printing a ratio."""
    proc = run_partrain("bench", *TINY, "--repeats", "1", "--duration", "0.05", "--warmup", "0",
                        "--n-jobs", "1,2", "--no-ceiling", "--json", "c.json", "--quiet",
                        cwd=tmp_path)
    assert_ok(proc)
    one, two = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert (one["processes"], two["processes"], two["chunk_size"]) == (1, 1, 16)
    assert one["speedup"] == 1.0
    assert two["speedup"] is None and two["parallel_efficiency"] is None
    marked = [line for line in proc.stdout.splitlines() if line.startswith("mlp") and " 2* " in
              line]
    assert len(marked) == 1, proc.stdout
    assert "n_jobs=2: each step had only 1 chunk(s), so it ran in 1 process(es)" in proc.stdout


def test_bench_reports_the_machine(bench_run):
    _, proc, report = bench_run
    machine = report["machine"]
    for key in ("cpu", "cores", "python", "numpy", "blas", "platform", "forced_kernels",
                "load_average"):
        assert key in machine, key
    for blas in machine["blas"]:
        assert {"internal_api", "version", "architecture", "num_threads"} <= set(blas)
    assert "BLAS: " in proc.stdout and "load average before the run" in proc.stdout
    assert isinstance(machine["cores"], int) and machine["cores"] >= 1
    assert machine["cpu"]
    assert report["matmul_peak_gflops_per_core"] > 0


def test_bench_has_a_ceiling_row_per_configuration_and_the_engine_efficiency(bench_run):
    """One ceiling row per (model, batch, n_jobs): as many processes as partrain used, and
    engine efficiency = partrain / ceiling for the partrain rows."""
    _, _, report = bench_run
    partrain = {r["n_jobs"]: r for r in report["rows"] if r["engine"].startswith("partrain")}
    ceiling = {r["n_jobs"]: r for r in report["rows"] if r["engine"] == "ceiling"}
    assert set(ceiling) == set(partrain) == {1, 2}
    for n, row in partrain.items():
        assert ceiling[n]["processes"] == row["processes"] == n
        assert ceiling[n]["examples_per_s"] > 0
        assert row["engine_efficiency"] == pytest.approx(
            row["examples_per_s"] / ceiling[n]["examples_per_s"])


def test_bench_weak_scaling_grows_the_batch_with_n_jobs(tmp_path):
    """--scaling weak: batch 8 per process is 8 at n_jobs=1 and 16 at n_jobs=2, chunked so
    both processes work; the speedup is against n_jobs=1 at the per-process batch."""
    proc = run_partrain("bench", "--model", "mlp", "--batch-size", "8", "--chunk-size", "8",
                        "--repeats", "1", "--duration", "0.05", "--warmup", "0", "--n-jobs",
                        "1,2", "--scaling", "weak", "--json", "w.json", "--quiet", cwd=tmp_path)
    assert_ok(proc)
    rows = json.loads((tmp_path / "w.json").read_text())["rows"]
    partrain = [r for r in rows if r["engine"].startswith("partrain")]
    assert [(r["batch_size"], r["n_jobs"], r["scaling"]) for r in partrain] == [
        (8, 1, "weak"), (16, 2, "weak")]
    one, two = partrain
    assert two["processes"] == 2
    assert two["speedup"] == pytest.approx(two["examples_per_s"] / one["examples_per_s"])
    assert {(r["batch_size"], r["n_jobs"]) for r in rows if r["engine"] == "ceiling"} == {
        (8, 1), (16, 2)}


def test_bench_names_kernels_forced_by_the_environment(tmp_path):
    """OPENBLAS_CORETYPE set: recorded in the report and the CSV, and the table warns."""
    env = {**subprocess_env(), "OPENBLAS_CORETYPE": "Haswell"}
    proc = run_partrain("bench", *TINY, "--repeats", "1", "--duration", "0.05", "--warmup", "0",
                        "--n-jobs", "1", "--no-ceiling", "--json", "k.json", "--csv", "k.csv",
                        "--quiet", cwd=tmp_path, env=env)
    assert_ok(proc)
    report = json.loads((tmp_path / "k.json").read_text())
    assert report["machine"]["forced_kernels"]["OPENBLAS_CORETYPE"] == "Haswell"
    assert any("OPENBLAS_CORETYPE=Haswell" in w for w in report["warnings"])
    assert "WARNING: kernels forced by the environment (OPENBLAS_CORETYPE=Haswell" in proc.stdout
    assert [r["engine"] for r in report["rows"]] == ["partrain"]
    with open(tmp_path / "k.csv", newline="") as f:
        assert "OPENBLAS_CORETYPE=Haswell" in next(csv.DictReader(f))["machine_forced_kernels"]


def test_bench_csv_has_the_same_rows(bench_run):
    cwd, _, report = bench_run
    with open(cwd / "b.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(report["rows"])
    for got, want in zip(rows, report["rows"]):
        for key in ("model", "dtype", "engine"):
            assert got[key] == want[key]
        for key in ("batch_size", "n_jobs", "threads"):
            assert int(got[key]) == want[key]
        for key in ("examples_per_s", "examples_per_s_min", "examples_per_s_max", "speedup",
                    "parallel_efficiency", "engine_efficiency"):
            if want[key] is None:  # ceiling rows have no ratios
                assert got[key] == "", key
            else:
                assert math.isclose(float(got[key]), want[key], rel_tol=1e-9), key
        assert got["machine_cores"] == str(report["machine"]["cores"])


def test_bench_prints_the_table_and_writes_the_plot(bench_run):
    cwd, proc, _ = bench_run
    assert "examples/s" in proc.stdout and "speedup" in proc.stdout
    assert "matmul peak" in proc.stdout
    for name in ("b.json", "b.csv", "b.png"):
        assert f"wrote {name}" in proc.stdout
    data = (cwd / "b.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_bench_compare_torch(tmp_path):
    """Default and tuned PyTorch at 1..cores threads, DDP at n_jobs=2, each labelled; the
    ratio line names the best configuration of all."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("PyTorch is not installed (pip install 'partrain[compare]')")
    proc = run_partrain("bench", *TINY, "--repeats", "1", "--duration", "0.05", "--warmup", "0",
                        "--n-jobs", "1,2", "--chunk-size", "8", "--no-ceiling", "--compare",
                        "torch", "--json", "t.json", "--quiet", cwd=tmp_path)
    assert_ok(proc)
    report = json.loads((tmp_path / "t.json").read_text())
    assert report["torch_skipped"] is None
    torch_rows = [r for r in report["rows"] if r["engine"].startswith("torch")]
    cores = os.cpu_count()
    expected = {(e, t) for e in ("torch", "torch-tuned") for t in range(1, cores + 1)}
    assert {(r["engine"], r["threads"]) for r in torch_rows} == expected | {("torch-ddp", 2)}
    for r in torch_rows:
        assert r["model"] == "mlp" and r["batch_size"] == 16 and r["examples_per_s"] > 0
        assert r["speedup"] is None  # speedups are partrain's, against partrain n_jobs=1
    best = max(torch_rows, key=lambda r: r["examples_per_s"])
    label = {"torch": "torch default", "torch-tuned": "torch tuned",
             "torch-ddp": "torch DDP"}[best["engine"]]
    assert re.search(rf"vs best torch \({label}[^)]*\) {best['examples_per_s']:,.0f} ex/s",
                     proc.stdout), proc.stdout


def test_bench_compare_torch_when_torch_is_missing(tmp_path):
    """A sitecustomize makes `import torch` fail in the subprocess, as on a machine without it:
    the run succeeds, says the comparison was skipped and why, and has no torch rows."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    env = subprocess_env()
    env["PYTHONPATH"] = f"{shim}:{env['PYTHONPATH']}"
    proc = run_partrain("bench", *TINY, "--repeats", "1", "--warmup", "0", "--no-ceiling",
                        "--n-jobs", "1",
                        "--compare", "torch", "--json", "t.json", "--quiet", cwd=tmp_path,
                        env=env)
    assert_ok(proc)
    report = json.loads((tmp_path / "t.json").read_text())
    assert report["torch_skipped"] and "not installed" in report["torch_skipped"]
    assert all(r["engine"] != "torch" for r in report["rows"])
    assert [r["n_jobs"] for r in report["rows"]] == [1]
    skipped = [line for line in proc.stdout.splitlines() if "skipped" in line]
    assert skipped and "torch" in skipped[0].lower() and "not installed" in skipped[0], \
        proc.stdout
    assert "partrain[compare]" in skipped[0]


def test_bench_dask_backend_is_timed_beside_the_local_backend(tmp_path):
    """--backend dask: the in-process row first (the speedup reference), then the Dask row
    with its speedup against it, the bytes it moves per step and an overhead line."""
    pytest.importorskip("distributed", reason="--backend dask needs partrain[dask]")
    proc = run_partrain("bench", *TINY, "--repeats", "1", "--duration", "0.05", "--warmup", "0",
                        "--n-jobs", "1", "--backend", "dask", "--no-ceiling", "--json", "d.json",
                        "--quiet", cwd=tmp_path)
    assert_ok(proc)
    local, dask = json.loads((tmp_path / "d.json").read_text())["rows"]
    assert (local["engine"], dask["engine"]) == ("partrain", "partrain-dask")
    assert local["speedup"] == 1.0 and local["bytes_per_step"] is None
    assert dask["speedup"] == pytest.approx(dask["examples_per_s"] / local["examples_per_s"])
    model = zoo.get(local["model"])
    n_chunks = -(-local["batch_size"] // dask["chunk_size"])
    assert dask["bytes_per_step"] == (1 + n_chunks) * model.params.nbytes  # no buffers in mlp
    assert re.search(r"dask mlp batch \d+ n_jobs 1: step [\d.]+ ms vs local [\d.]+ ms",
                     proc.stdout), proc.stdout


BAD_OPTIONS = [  # (arguments, words the one-line message must contain)
    (["--n-jobs", "0"], ["n_jobs", "0"]),
    (["--n-jobs", "1,x"], ["--n-jobs", "1,x"]),
    (["--model", "nope"], ["nope"]),
    (["--batch-size", "0"], ["batch_size"]),
    (["--repeats", "0"], ["repeats"]),
    (["--duration", "0"], ["duration"]),
    (["--dtype", "float16"], ["--dtype"]),
    (["--compare", "tensorflow"], ["--compare"]),
    (["--scheduler", "tcp://127.0.0.1:1"], ["--scheduler", "dask"]),
]


@pytest.mark.parametrize("args, needles", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bench_bad_options_are_one_line_exit_2(args, needles, tmp_path):
    proc = run_partrain("bench", *args, "--quiet", cwd=tmp_path)
    assert_usage_error(proc, *needles)
    assert list(tmp_path.iterdir()) == []


def test_max4_chunk_plan_is_the_first_releases_rule():
    """Exact values of the first release's plan (at most 4 chunks, none under 16 examples or
    30 MFLOP), worked out by hand from each network's FLOPs per example."""
    from partrain.bench import plan_chunk_size

    mnist, signs, mlp = zoo.get("mnist-cnn"), zoo.get("signs-cnn"), zoo.get("mlp")
    assert plan_chunk_size("max4", mnist, 256) == 64  # 4 chunks, not 16
    assert plan_chunk_size("max4", mnist, 64) == 16
    assert plan_chunk_size("max4", signs, 32) == 16  # 68 MFLOP: 2 chunks
    assert plan_chunk_size("max4", mlp, 32) == 32  # 17 MFLOP: one chunk
    assert plan_chunk_size("max4", mlp, 256) == 64
    assert plan_chunk_size("auto", mnist, 256) == 16
    with pytest.raises(ValueError, match="Unknown chunk plan 'v0'"):
        plan_chunk_size("v0", mnist, 32)


def test_bench_rounds_interleave_the_configurations(monkeypatch):
    """Every configuration is timed once per round, round after round (a value given twice
    still once), and a row's figure is the median of its rounds' windows."""
    from partrain import bench

    calls = []

    def fake_measure(job, dtype, duration, warmup, chunk_size, scheduler):
        kind, model, batch, n, variant, plan = job
        calls.append((kind, n))
        rate = 1000.0 * n + len(calls)  # a different figure every round
        return bench.BenchRow(model=model, batch_size=batch, n_jobs=n, dtype=dtype,
                              engine="partrain" if kind != "ceiling" else "ceiling",
                              threads=n, processes=n, chunk_size=8, examples_per_s=rate,
                              examples_per_s_min=rate, examples_per_s_max=rate,
                              step_ms=float(len(calls)), windows=[rate], chunk_plan=plan)

    monkeypatch.setattr(bench, "_measure", fake_measure)
    report = bench.run_bench(["mlp", "mlp"], [16, 16], [1, 2, 2], repeats=3, progress=False)
    one_round = [("strong", 1), ("strong", 2), ("ceiling", 1), ("ceiling", 2)]
    assert calls == one_round * 3
    rows = {(r["engine"], r["n_jobs"]): r for r in report["rows"]}
    assert len(rows) == len(report["rows"]) == 4
    first = rows[("partrain", 1)]
    assert first["windows"] == [1001.0, 1005.0, 1009.0]
    assert first["examples_per_s"] == 1005.0 and first["step_ms"] == 5.0
    assert (first["examples_per_s_min"], first["examples_per_s_max"]) == (1001.0, 1009.0)
    assert rows[("partrain", 2)]["engine_efficiency"] == pytest.approx(
        rows[("partrain", 2)]["examples_per_s"] / rows[("ceiling", 2)]["examples_per_s"])


def test_bench_compares_chunk_plans_each_against_its_own_rows(tmp_path):
    """--chunk-plan auto,max4: partrain and ceiling rows for each plan (signs_cnn batch 128:
    chunks of 16 and of 32), speedup and engine efficiency against the same plan's rows, and
    only the shipped plan in the best-partrain lines."""
    proc = run_partrain("bench", "--model", "signs-cnn", "--batch-size", "128", "--n-jobs", "1,2",
                        "--chunk-plan", "auto,max4", "--repeats", "1", "--duration", "0.05",
                        "--warmup", "0", "--json", "p.json", "--quiet", cwd=tmp_path)
    assert_ok(proc)
    rows = json.loads((tmp_path / "p.json").read_text())["rows"]
    by = {(r["engine"].split("-")[0], r["n_jobs"], r["chunk_plan"]): r for r in rows}
    assert set(by) == {(e, n, p) for e in ("partrain", "ceiling") for n in (1, 2)
                       for p in ("auto", "max4")}
    assert {p: by[("partrain", 2, p)]["chunk_size"] for p in ("auto", "max4")} == {
        "auto": 16, "max4": 32}
    for plan in ("auto", "max4"):
        two, one = by[("partrain", 2, plan)], by[("partrain", 1, plan)]
        assert two["speedup"] == pytest.approx(two["examples_per_s"] / one["examples_per_s"])
        assert two["engine_efficiency"] == pytest.approx(
            two["examples_per_s"] / by[("ceiling", 2, plan)]["examples_per_s"])
    assert "partrain-loky max4" in proc.stdout


def test_bench_refuses_a_chunk_plan_with_a_fixed_chunk_size(tmp_path):
    proc = run_partrain("bench", *TINY, "--chunk-size", "8", "--chunk-plan", "auto,max4",
                        "--quiet", cwd=tmp_path)
    assert_usage_error(proc, "leaves no chunk plan to compare")
