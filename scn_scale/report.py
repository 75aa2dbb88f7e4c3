"""Evaluation reports: PNG plots and a markdown page that embeds them, from a report dict.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot), so a
library call never touches the process-wide backend or figure state. Every file is
written atomically.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from shards.atomic import write_bytes, write_text

CONFUSION_PNG = "confusion_matrix.png"
ALPHA_PNG = "alpha_histogram.png"
EPOCHS_PNG = "accuracy_per_epoch.png"
FLOW_PNG = "relabel_flow.png"


def save_figure(fig: Figure, path: Path) -> None:
    """A figure as a PNG, written atomically."""
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    write_bytes(path, buf.getvalue())


def _matrix(ax, counts: np.ndarray, classes: Sequence[str], shade: np.ndarray, xlabel: str, ylabel: str) -> None:
    ax.imshow(shade, cmap="Blues", vmin=0.0, vmax=max(1e-9, float(shade.max())))
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            ax.text(j, i, str(int(counts[i, j])), ha="center", va="center",
                    color="white" if shade[i, j] > 0.6 * shade.max() else "black", fontsize=8)


def plot_confusion(confusion: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str) -> None:
    """Counts in the cells, shaded by the share of the true class (row) so small classes stay readable."""
    counts = np.asarray(confusion, dtype=np.int64)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    fig = Figure(figsize=(1.0 + 0.75 * len(classes), 0.8 + 0.7 * len(classes)), layout="constrained")
    ax = fig.add_subplot()
    _matrix(ax, counts, classes, shares, "predicted", "true")
    ax.set_title(title)
    save_figure(fig, path)


def plot_alpha(alpha: np.ndarray, path: Path, noisy: np.ndarray | None = None) -> None:
    """The importance weights; noisy and clean samples apart when the ground truth is known."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    bins = np.linspace(0.0, 1.0, 41)
    if noisy is None:
        ax.hist(alpha, bins=bins, color="tab:blue")
        ax.set_ylabel("samples")
    else:
        for mask, name, color in ((~noisy, "clean", "tab:blue"), (noisy, "noisy", "tab:red")):
            if mask.any():
                ax.hist(alpha[mask], bins=bins, density=True, alpha=0.6, color=color,
                        label=f"{name} (n={int(mask.sum())}, mean {alpha[mask].mean():.3f})")
        ax.set_ylabel("density")
        ax.legend()
    ax.set_xlabel("alpha (importance)")
    ax.set_title("alpha distribution")
    save_figure(fig, path)


def plot_epochs(epochs: Sequence[dict], path: Path, split: str, best: int, last: int) -> None:
    """Accuracy and mean class accuracy per epoch, with the best (selected on `split`) and last epoch marked."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    xs = [e["epoch"] for e in epochs]
    for name, style in (("accuracy", "-o"), ("mean_class_accuracy", "--s")):
        ys = [e.get(name) for e in epochs]
        if any(y is not None for y in ys):
            ax.plot(xs, [math.nan if y is None else y for y in ys], style, label=name.replace("_", " "))
    ax.axvline(best, color="tab:green", linestyle=":", label=f"best epoch {best} (on {split})")
    ax.axvline(last, color="tab:gray", linestyle=":", label=f"last epoch {last}")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{split} accuracy")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_flow(flow: Sequence[Sequence[int]], classes: Sequence[str], path: Path) -> None:
    """Relabeled samples from their original class (rows) to their current one (columns)."""
    counts = np.asarray(flow, dtype=np.int64)
    fig = Figure(figsize=(1.0 + 0.75 * len(classes), 0.8 + 0.7 * len(classes)), layout="constrained")
    ax = fig.add_subplot()
    _matrix(ax, counts, classes, counts.astype(float), "current label", "original label")
    ax.set_title(f"relabel flow ({int(counts.sum())} samples relabeled)")
    save_figure(fig, path)


def _pct(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}%"


def write_markdown(report: dict, path: Path) -> None:
    """report.md: the numbers of report.json in tables, with the plots embedded."""
    lines = [
        "# Evaluation report",
        "",
        f"- checkpoint: `{report['checkpoint']}` (epoch {report.get('epoch', '-')})",
        f"- shard set: `{report['shards']}`, {report['samples']} samples evaluated",
    ]
    lines += [f"- note: {note}" for note in report.get("notes", [])]
    lines += [
        "",
        "| metric | value |",
        "|---|---|",
        f"| accuracy | {_pct(report['accuracy'])} |",
        f"| mean class accuracy | {_pct(report['mean_class_accuracy'])} |",
        "",
        "| class | samples | accuracy |",
        "|---|---|---|",
    ]
    for name, row in zip(report["classes"], report["confusion_matrix"]):
        lines.append(f"| {name} | {sum(row)} | {_pct(report['per_class_accuracy'][name])} |")
    lines += ["", "## Confusion matrix", "", f"![confusion matrix]({report['plots']['confusion']})", ""]
    alpha = report["alpha"]
    lines += ["## alpha (importance)", ""]
    for group in ("all", "clean", "noisy"):
        stats = alpha if group == "all" else alpha.get(group)
        if stats and stats.get("n"):
            lines.append(
                f"- {group}: n={stats['n']}, mean {stats['mean']:.4f}, median {stats['q50']:.4f}, "
                f"share above 0.99 {stats['above_0_99']:.3f}"
            )
    lines += ["", f"![alpha histogram]({report['plots']['alpha']})", ""]
    run = report.get("run")
    if run:
        best, last = run["best"], run["last"]
        lines += [
            "## Training run",
            "",
            f"Run `{run['dir']}`. The best epoch is selected on the run's **{run['selection_split']}** "
            f"(`{run['selection_shards'] or 'not recorded'}`).",
            "",
        ]
        if run["selected_on_evaluated_set"]:
            lines += [
                "**The selection set is the set evaluated here**: the best epoch is chosen on the test data "
                "(best-on-test, as the released SCN code reports), an optimistic number; the last epoch's is not.",
                "",
            ]
        lines += [
            "| | epoch | accuracy | mean class accuracy |",
            "|---|---|---|---|",
            f"| best (selected on {run['selection_split']}) | {best['epoch']} | {_pct(best.get('accuracy'))} | "
            f"{_pct(best.get('mean_class_accuracy'))} |",
            f"| last | {last['epoch']} | {_pct(last.get('accuracy'))} | {_pct(last.get('mean_class_accuracy'))} |",
            "",
            f"![accuracy per epoch]({report['plots']['epochs']})",
            "",
        ]
    relabel = report.get("relabel")
    if relabel:
        lines += [
            "## Relabeling",
            "",
            f"{relabel['changed']} samples carry a label other than their original one in `{relabel['table']}`.",
            "",
            f"![relabel flow]({report['plots']['flow']})",
            "",
        ]
    write_text(path, "\n".join(lines))
