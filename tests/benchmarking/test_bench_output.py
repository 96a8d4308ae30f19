"""The bench table, JSON and CSV name the two efficiencies apart (parallel = speedup / n_jobs,
engine = partrain / ceiling), define them under the table, and old reports (whose key was
"efficiency") still render."""

import copy
import json

import pytest
from conftest import ROOT

from partrain.bench import format_table, parallel_efficiency

COMMITTED = ROOT / "benchmarks" / "results" / "bench.json"


@pytest.fixture(scope="module")
def old_report() -> dict:
    """A report written before the rename: rows carry "efficiency"."""
    report = json.loads(COMMITTED.read_text())
    assert "efficiency" in report["rows"][0] and "parallel_efficiency" not in report["rows"][0]
    return report


def renamed(report: dict) -> dict:
    new = copy.deepcopy(report)
    for row in new["rows"]:
        row["parallel_efficiency"] = row.pop("efficiency")
    return new


def cell(table: str, header: str, row_start: str, column: str) -> str:
    """The text of `column` in the first line starting with `row_start` (right-aligned
    columns: a cell ends where its header ends)."""
    head = next(line for line in table.splitlines() if line.startswith("model"))
    end = head.index(column) + len(column)
    start = max(head.rfind(" ", 0, head.index(column)), 0)
    line = next(line for line in table.splitlines() if line.startswith(row_start))
    return line[start:end].strip()


@pytest.mark.parametrize("convert", [lambda r: r, renamed], ids=["old key", "new key"])
def test_each_efficiency_has_its_own_column_and_definition(old_report, convert):
    report = convert(old_report)
    table = format_table(report)
    head = next(line for line in table.splitlines() if line.startswith("model"))
    for column in ("speedup", "par. eff", "eng. eff", "step ms", "compute ms", "engine ms",
                   "adam ms", "runner"):
        assert head.count(column) == 1, head
    assert "vs ceil" not in head and "eff. " not in head
    row = "signs-cnn      32  strong       partrain-loky    2"
    want = next(r for r in report["rows"] if r["model"] == "signs-cnn" and r["n_jobs"] == 2
                and r["batch_size"] == 32 and r["engine"] == "partrain-loky")
    assert cell(table, head, row, "speedup") == f"{want['speedup']:.2f}"
    assert cell(table, head, row, "par. eff") == f"{parallel_efficiency(want):.2f}"
    assert cell(table, head, row, "eng. eff") == f"{want['engine_efficiency']:.2f}"
    assert parallel_efficiency(want) == pytest.approx(want["speedup"] / 2)
    definitions = [line for line in table.splitlines() if " = " in line and
                   line.split(" = ")[0] in ("speedup", "par. eff", "eng. eff")]
    assert len(definitions) == 3, table
    assert "speedup / n_jobs" in definitions[1] and "ceiling" in definitions[2]
