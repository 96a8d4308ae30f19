"""Figures: history ticks on whole epochs; titles naming model, dataset, split and accuracy."""

import numpy as np
import pytest

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
