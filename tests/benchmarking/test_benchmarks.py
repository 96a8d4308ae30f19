"""The measurement tools in benchmarks/: their models on hand-worked numbers, short real runs,
their errors."""

import json

import pytest
from conftest import ROOT, assert_ok, run_python

TOOLS = ROOT / "benchmarks"


def run_tool(name: str, *args, cwd, timeout: float = 180):
    return run_python(TOOLS / name, *args, cwd=cwd, timeout=timeout)

def test_optimizer_placement_help(tmp_path):
    proc = run_tool("optimizer_placement.py", "--help", cwd=tmp_path)
    assert_ok(proc)
    for option in ("--model", "--batch-size", "--phases", "--steps", "--json"):
        assert option in proc.stdout


def test_scaling_model_predicts_a_step_by_hand():
    """benchmarks/scaling_model.py's step model on numbers worked out by hand: 4 chunks on 2
    processes make 2 chunks each (2 x 1.0 x slowdown 1.5, plus the addition inside each
    group), the master the one addition across groups, the scaling, Adam and the copy."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("scaling_model", TOOLS / "scaling_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pieces = {"add": 0.1, "adam": 1.0, "scale": 0.5, "copy": 0.2}
    assert module.predict(1.0, 4, 2, 1.5, pieces) == pytest.approx(3.0 + 0.1 + 0.1 + 1.5 + 0.2)
    # one process: no slowdown, no copy; its own 3 additions
    assert module.predict(1.0, 4, 1, 1.5, pieces) == pytest.approx(4.0 + 0.3 + 1.5)
    # 3 chunks on 2 processes: groups [0, 2) and [2, 3); the slower group decides
    assert module.predict(1.0, 3, 2, 1.0, pieces) == pytest.approx(2.0 + 0.1 + 0.1 + 1.5 + 0.2)


def test_optimizer_placement_times_each_mode(tmp_path):
    """Every mode gets a positive step time, 'free' is its own reference, and a batch of one
    chunk is refused in one line."""
    proc = run_tool("optimizer_placement.py", "--model", "digits-cnn", "--batch-size", 64,
                      "--chunk-size", 16, "--phases", 1, "--steps", 2, "--json", "out.json",
                      cwd=tmp_path)
    assert_ok(proc)
    (row,) = json.loads((tmp_path / "out.json").read_text())
    assert (row["model"], row["batch_size"], row["chunk_size"]) == ("digits-cnn", 64, 16)
    assert set(row["step_ms"]) == {"free", "none", "master", "sharded"}
    assert all(ms > 0 for ms in row["step_ms"].values())
    assert row["vs_free"]["free"] == 1.0
    assert "sharded" in proc.stdout and "x1.000 of free" in proc.stdout
    proc = run_tool("optimizer_placement.py", "--model", "digits-cnn", "--batch-size", 16,
                      "--chunk-size", 16, cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "error: batch 16 at chunk 16 is one chunk: nothing for a second process"]
    for bad in (["--batch-size", "0"], ["--model", "resnet"], ["--phases", "x"],
                ["--json", "missing/out.json"]):
        proc = run_tool("optimizer_placement.py", *bad, cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "optimizer_placement.py: error: " in proc.stderr.strip().splitlines()[-1]
