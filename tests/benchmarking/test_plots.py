"""Figures: history ticks on whole epochs; titles naming model, dataset, split and accuracy."""

import numpy as np
import pytest
from conftest import ROOT

pytest.importorskip("matplotlib", reason="plots need matplotlib")
from matplotlib.figure import Figure  # noqa: E402

from partrain.plots import plot_confusion, plot_history, plot_recall  # noqa: E402


@pytest.fixture
def figures(monkeypatch):
    """Every figure saved during the test (savefig still writes the file)."""
    saved = []
    original = Figure.savefig

    def savefig(self, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


@pytest.mark.parametrize("n_epochs", [2, 3, 7])
def test_history_ticks_are_whole_epochs(n_epochs, figures, tmp_path):
    """Matplotlib's default ticks for 2 or 3 epochs are 1.0, 1.25, 1.5, ...: not epochs."""
    history = {"loss": list(np.linspace(2, 1, n_epochs)),
               "accuracy": list(np.linspace(0.3, 0.9, n_epochs)),
               "val_loss": list(np.linspace(2.1, 1.2, n_epochs)),
               "val_accuracy": list(np.linspace(0.2, 0.8, n_epochs))}
    plot_history(history, tmp_path / "h.png", title="digits-cnn on digits")
    (fig,) = figures
    assert fig.get_suptitle() == "digits-cnn on digits"
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert (tmp_path / "h.png").stat().st_size > 1000


def test_confusion_and_recall_are_titled(figures, tmp_path):
    title = "digits-cnn on digits, test split: accuracy 0.9721"
    cm = np.array([[5, 1], [2, 7]])
    plot_confusion(cm, ["a", "b"], tmp_path / "c.png", title)
    plot_recall(np.array([5 / 6, 7 / 9]), ["a", "b"], tmp_path / "r.png", title)
    assert [fig.axes[0].get_title() for fig in figures] == [title, title]


def test_scaling_plot_keeps_colours_marks_ceiling_and_ideal_and_warns(figures, tmp_path):
    """The committed report (2 cores): one colour per network and batch in both panels, the
    mlp series (one chunk per step: no parallel point) left out and named, the ceiling
    dotted, the ideal drawn, and a load warning printed on the figure."""
    import json

    from matplotlib.colors import to_hex

    from partrain.plots import plot_scaling

    report = json.loads((ROOT / "benchmarks" / "results" /
                         "bench.json").read_text())
    report["warnings"] = ["the machine was busy: load average 1.90 before the run (> 0.5)"]
    plot_scaling(report, tmp_path / "s.png")
    (fig,) = figures
    rate, speed = fig.axes[:2]

    def series(ax) -> dict:
        return {line.get_gid(): line for line in ax.lines if line.get_gid()}

    on_rate, on_speed = series(rate), series(speed)
    data = {gid: line for gid, line in on_rate.items() if not gid.startswith("ideal")}
    assert set(data) == set(on_speed) - {"ideal"}
    groups = {}
    for gid, line in data.items():
        assert to_hex(line.get_color()) == to_hex(on_speed[gid].get_color()), gid
        groups.setdefault(gid.split(", strong")[0], set()).add(to_hex(line.get_color()))
    assert sorted(groups) == ["mnist-cnn, batch 32", "mnist-cnn, batch 64",
                              "signs-cnn, batch 32", "signs-cnn, batch 64"]
    assert all(len(colours) == 1 for colours in groups.values())
    assert len({c for colours in groups.values() for c in colours}) == 4
    ceilings = [line for gid, line in data.items() if gid.endswith("ceiling")]
    assert len(ceilings) == 4 and all(line.get_linestyle() == ":" for line in ceilings)
    assert "ideal" in on_speed and sum(g.startswith("ideal: ") for g in on_rate) == 4
    texts = [t.get_text() for t in fig.texts]
    assert any(t.startswith("WARNING: the machine was busy") for t in texts), texts
    assert any("left out" in t and "mlp batch 32" in t for t in texts), texts
