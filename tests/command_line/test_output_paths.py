"""Every command that writes files checks their paths before any work (a missing folder is
created), and a write that still fails after the work is rescued next to the intended path,
else in the working directory, with exit status 1 and one line saying where."""

import json

import pytest
from conftest import assert_ok, assert_usage_error, run_partrain

from partrain import bench, cli

QUICK = ["--model", "mlp", "--batch-size", "16", "--n-jobs", "1", "--repeats", "1",
         "--duration", "0.05", "--warmup", "0", "--no-ceiling", "--quiet"]


def test_bench_creates_a_missing_output_folder(tmp_path):
    """The issue's case: `--json nofolder/b.json` lost the whole measurement."""
    proc = run_partrain("bench", *QUICK, "--json", "nofolder/b.json", "--csv", "other/b.csv",
                        cwd=tmp_path)
    assert_ok(proc)
    report = json.loads((tmp_path / "nofolder" / "b.json").read_text())
    assert [r["n_jobs"] for r in report["rows"]] == [1]
    assert (tmp_path / "other" / "b.csv").read_text().startswith("model,")


@pytest.mark.parametrize("option", ["--json", "--csv", "--plot"])
def test_bench_refuses_an_unwritable_output_before_timing(option, tmp_path, monkeypatch,
                                                          capsys):
    """A path under a file cannot be written: one line, exit 2, and nothing was timed."""
    (tmp_path / "afile").write_text("in the way")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("bench ran"))
    if option == "--plot":
        pytest.importorskip("matplotlib")
    status = cli.main(["bench", *QUICK, option, "afile/out"])
    err = capsys.readouterr().err
    assert status == 2, err
    assert f"{option} afile/out" in err and "is a file" in err and "Traceback" not in err


def test_bench_rescues_its_output_when_the_folder_breaks_after_timing(tmp_path, monkeypatch,
                                                                      capsys):
    """out/ could be created before the run; after it, out is a file: the JSON goes to the
    working directory, stderr says where, exit 1."""
    monkeypatch.chdir(tmp_path)
    run = bench.run_bench

    def run_then_break(*args, **kwargs):
        report = run(*args, **kwargs)
        (tmp_path / "out").write_text("in the way")
        return report

    monkeypatch.setattr(bench, "run_bench", run_then_break)
    status = cli.main(["bench", *QUICK, "--json", "out/b.json"])
    out, err = capsys.readouterr()
    assert status == 1, err
    rescued = json.loads((tmp_path / "b.json").read_text())
    assert [r["n_jobs"] for r in rescued["rows"]] == [1]
    assert "out/b.json" in err and "wrote it to" in err and "Traceback" not in err
    assert f"wrote {tmp_path / 'b.json'}" in out


def test_evaluate_refuses_an_unwritable_plot_folder_before_loading(tmp_path):
    (tmp_path / "afile").write_text("in the way")
    proc = run_partrain("evaluate", "missing.npz", "--plot", "afile", cwd=tmp_path)
    if "matplotlib" in proc.stderr:
        pytest.skip("--plot needs matplotlib")
    assert_usage_error(proc, "--plot afile", "not a folder")
