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
    """A bench report as two panels against n_jobs: examples/s, and speedup vs n_jobs=1.

    One colour per network and batch size in both panels; partrain solid (weak scaling
    dashed, Dask with square markers), the machine's ceiling dotted, the ideal (n x the
    n_jobs=1 rate; speedup = n) thin grey. A series with no parallel point (every n_jobs > 1
    clamped to one process, or only n_jobs=1 measured) is left out. The report's warnings
    (a busy machine, forced kernels) are printed under the panels.
    """
    from matplotlib.lines import Line2D

    plt = _pyplot()
    rows = [r for r in report["rows"]
            if r["engine"].startswith("partrain") or r["engine"] == "ceiling"]
    notes = [f"WARNING: {note}" for note in report.get("warnings", [])]
    fig, (ax_rate, ax_speed) = plt.subplots(1, 2)

    def per_process(r: dict) -> int:
        return r["batch_size"] // r["n_jobs"] if r["scaling"] == "weak" else r["batch_size"]

    def curve(r: dict) -> tuple:
        plan = r.get("chunk_plan")
        engine = r["engine"].replace("-loky", "")
        return r["model"], per_process(r), r["scaling"], \
            engine if plan in (None, "auto") else f"{engine}, {plan} plan"

    series = {}
    for key in sorted({curve(r) for r in rows}):
        sel = sorted((r for r in rows if curve(r) == key), key=lambda r: r["n_jobs"])
        if any(r["n_jobs"] > 1 and r["processes"] > 1 for r in sel):  # a parallel point
            series[key] = sel
    groups = sorted({key[:2] for key in series})  # (network, batch): one colour each
    left_out = sorted({key[:2] for r in rows if (key := curve(r))[:2] not in groups})
    if left_out:
        notes.append("left out, no parallel point (one chunk per step, see --chunk-size): " +
                     ", ".join(f"{model} batch {batch}" for model, batch in left_out))
    colours = {group: f"C{i % 10}" for i, group in enumerate(groups)}
    max_jobs = max([r["n_jobs"] for sel in series.values() for r in sel], default=1)
    for (model, batch, scaling, engine), sel in series.items():
        colour = colours[model, batch]
        jobs = np.array([r["n_jobs"] for r in sel])
        rate = np.array([r["examples_per_s"] for r in sel])
        ceiling = engine.startswith("ceiling")
        style = dict(color=colour, linestyle=":" if ceiling else "--" if scaling == "weak"
                     else "-", marker="" if ceiling else "s" if "dask" in engine else "o")
        name = f"{model}, batch {batch}, {scaling}, {engine}"  # (the lines' gid)
        ax_rate.errorbar(jobs, rate, yerr=[rate - [r["examples_per_s_min"] for r in sel],
                                           [r["examples_per_s_max"] for r in sel] - rate],
                         **style).lines[0].set_gid(name)
        base = next((r["examples_per_s"] for r in rows if r["engine"] == "partrain"
                     and r["n_jobs"] == 1 and curve(r)[:3] == (model, batch, scaling)), None)
        if ceiling and base:
            ax_speed.plot(jobs, rate / base, gid=name, **style)
        elif not ceiling:
            ax_speed.plot(jobs, [r["speedup"] or np.nan for r in sel], gid=name, **style)
            if sel[0]["n_jobs"] == 1 and "dask" not in engine:  # ideal: n x the 1-process rate
                ax_rate.plot(jobs, rate[0] * jobs, color="0.6", linewidth=0.8, zorder=0,
                             gid=f"ideal: {name}")
    ax_speed.plot([1, max_jobs], [1, max_jobs], color="0.6", linewidth=0.8, zorder=0,
                  gid="ideal")
    ax_rate.set(xlabel="n_jobs", ylabel="examples/s", yscale="log", title="throughput")
    ax_speed.set(xlabel="n_jobs", ylabel="speedup vs n_jobs=1", title="scaling")
    for ax in (ax_rate, ax_speed):
        ax.set_xticks(range(1, max_jobs + 1))
        ax.grid(alpha=0.3)
    ax_speed.legend(handles=[Line2D([], [], color=colours[g], marker="o",
                                    label=f"{g[0]}, batch {g[1]}") for g in groups],
                    fontsize=7, title="network, batch (per process for weak)",
                    title_fontsize=7)
    kinds = [("partrain", "-", "o"), ("weak scaling", "--", "o"), ("dask", "-", "s"),
             ("ceiling: no engine", ":", "")]
    shown = {"partrain": True, "weak scaling": any(k[2] == "weak" for k in series),
             "dask": any("dask" in k[3] for k in series),
             "ceiling: no engine": any(k[3].startswith("ceiling") for k in series)}
    handles = [Line2D([], [], color="k", linestyle=ls, marker=m, label=label)
               for label, ls, m in kinds if shown[label]]
    handles.append(Line2D([], [], color="0.6", linewidth=0.8, label="ideal: n x n_jobs=1"))
    ax_rate.legend(handles=handles, fontsize=7)
    fig.set_size_inches(11, 4.4 + 0.2 * len(notes))
    for i, note in enumerate(notes):
        fig.text(0.01, 0.01 + 0.04 * (len(notes) - 1 - i), note, fontsize=8, va="bottom",
                 color="tab:red" if note.startswith("WARNING") else "0.3")
    fig.tight_layout(rect=(0, 0.045 * len(notes), 1, 1))
    return _save(fig, plt, path)
