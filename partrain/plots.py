"""PNG figures (matplotlib is an optional extra: pip install "partrain[plot]")."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .io import write_file


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            'Plots need matplotlib: pip install "partrain[plot]".'
        ) from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def require_matplotlib() -> None:
    """Raise the install hint now, before a long run, if plotting will be impossible."""
    _pyplot()


def plot_history(history: dict, path: str | Path, title: str | None = None) -> Path:
    """Loss and accuracy per epoch (training, and validation when present), ticks on whole
    epochs (numbered from 1), under `title` (e.g. "digits-cnn on digits")."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    epochs = np.arange(1, len(history["loss"]) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, history[metric], "o-", label=f"train {metric}")
        if history.get(f"val_{metric}"):
            values = history[f"val_{metric}"]  # (a run resumed with validation: the last ones)
            ax.plot(epochs[len(epochs) - len(values):], values, "s--",
                    label=f"validation {metric}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_confusion(confusion: np.ndarray, class_names, path: str | Path,
                   title: str | None = None) -> Path:
    """Confusion matrix (rows: true class, columns: predicted) with counts in the cells,
    under `title` (the CLI gives model, dataset, split and accuracy)."""
    plt = _pyplot()
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(max(4, 1 + 0.6 * k), max(4, 1 + 0.6 * k)))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(k), class_names)
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = confusion.max() / 2 if confusion.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if confusion[i, j] > threshold else "black")
    if title:
        ax.set_title(title, fontsize=9, wrap=True)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_recall(recall: np.ndarray, class_names, path: str | Path,
                title: str | None = None) -> Path:
    """Per-class recall as bars, under `title`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(class_names) + 2), 3.5))
    ax.bar(range(len(recall)), recall, color="tab:blue")
    ax.set_xticks(range(len(recall)), class_names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("recall")
    ax.set_xlabel("class")
    if title:
        ax.set_title(title, fontsize=9, wrap=True)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig, plt, path) -> Path:
    path = Path(path)
    try:  # atomically, and never over a device (see io.special_file)
        write_file(path, lambda f: fig.savefig(f, format=path.suffix[1:].lower() or "png", dpi=110))
    finally:
        plt.close(fig)
    return path


def plot_scaling(report: dict, path: str | Path) -> Path:
    """examples/s and speedup against n_jobs per model and batch size, with ideal scaling;
    strong and weak scaling as separate curves, the machine's ceiling dotted."""
    plt = _pyplot()
    rows = [r for r in report["rows"]
            if r["engine"].startswith("partrain") or r["engine"] == "ceiling"]
    fig, (ax_rate, ax_speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    max_jobs = max(r["n_jobs"] for r in rows)

    def curve(r: dict) -> tuple:
        per_process = r["batch_size"] // r["n_jobs"] if r["scaling"] == "weak" else \
            r["batch_size"]
        plan = r.get("chunk_plan")
        engine = r["engine"].replace("-loky", "")
        return r["model"], per_process, r["scaling"], \
            engine if plan in (None, "auto") else f"{engine}, {plan} plan"

    for key in sorted({curve(r) for r in rows}):
        sel = sorted((r for r in rows if curve(r) == key), key=lambda r: r["n_jobs"])
        jobs = [r["n_jobs"] for r in sel]
        model, batch, scaling, engine = key
        batch = f"batch {batch}" + (" per process" if scaling == "weak" else "")
        label = f"{model}, {batch}" + ("" if engine == "partrain" else f" ({engine})")
        style = ":" if engine.startswith("ceiling") else ("o--" if scaling == "weak" else "o-")
        ax_rate.errorbar(jobs, [r["examples_per_s"] for r in sel], fmt=style, label=label,
                         yerr=[[r["examples_per_s"] - r["examples_per_s_min"] for r in sel],
                               [r["examples_per_s_max"] - r["examples_per_s"] for r in sel]])
        if not engine.startswith("ceiling"):
            ax_speed.plot(jobs, [r["speedup"] or np.nan for r in sel], style, label=label)
    ax_speed.plot([1, max_jobs], [1, max_jobs], "k--", label="ideal")
    ax_rate.set(xlabel="n_jobs", ylabel="examples/s", yscale="log", title="throughput")
    ax_speed.set(xlabel="n_jobs", ylabel="speedup vs n_jobs=1", title="scaling")
    for ax in (ax_rate, ax_speed):
        ax.set_xticks(range(1, max_jobs + 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, plt, path)
