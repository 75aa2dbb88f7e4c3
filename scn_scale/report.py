"""Reports: PNG plots, contact sheets and a markdown page that embeds them, with its HTML twin.

Three kinds: an evaluation (`scn_scale.evaluate` builds the report dict, `write_markdown`
writes its page), a training run and a crawl (`python -m scn_scale.report DIR`, which
tells them apart by their files). Figures are drawn with matplotlib's object API on the
Agg canvas (no pyplot), so a library call never touches the process-wide backend or
figure state; contact sheets come from `scn_scale.gallery`. Every file is written
atomically; each report.md gets a self-contained report.html beside it
(`scn_scale.report_html`).
"""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from scn_scale import gallery, tracking
from scn_scale.checkpoint import (
    CLASSES_FILE,
    COMPLETE_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    STATE_FILE,
    TABLE_FILE,
    CheckpointError,
    latest_checkpoint,
)
from scn_scale.metrics import alpha_epoch_url, alpha_part_url
from scn_scale.noise import load_ground_truth, load_overrides
from scn_scale.relabel_table import RelabelTable
from scn_scale.report_html import write_html
from shards.atomic import write_bytes, write_text
from shards.cli import ArgumentParser, add_log_level, bad_input, configure_logging
from shards.fs import join, local_dir, open_fs, read_parquet
from shards.manifest import read_manifest

REPORT_MD = "report.md"
#: Every report.md names its HTML twin (`write_page` writes it beside).
HTML_LINE = "- the same page with its images inline, in one file: [report.html](report.html)"
CONFUSION_PNG = "confusion_matrix.png"
ALPHA_PNG = "alpha_histogram.png"
EPOCHS_PNG = "accuracy_per_epoch.png"
FLOW_PNG = "relabel_flow.png"
ERRORS_PNG = "confident_errors.png"
LOWEST_ALPHA_PNG = "lowest_alpha.png"
RELABELS_PNG = "relabels.png"
DUPLICATES_PNG = "duplicates.png"
STEP_CURVES_PNG = "curves_per_step.png"
EPOCH_CURVES_PNG = "curves_per_epoch.png"
#: What `crawler.build` writes beside a crawl's shard set (the crawler and scn_scale meet only in files).
CRAWL_SUMMARY = "crawl_summary.json"
CRAWL_DUPLICATES = "duplicates.parquet"
#: Where `python -m scn_scale.report DIR` writes, inside DIR, unless told otherwise.
REPORT_DIR = "report"


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


def relabel_flow(table: Mapping[str, Sequence[int]], num_classes: int) -> np.ndarray:
    """[C, C] counts of the relabeled samples of a relabel table's columns, original label (row) -> current (column)."""
    flow = np.zeros((num_classes, num_classes), dtype=np.int64)
    for original, current in zip(table["original_label"], table["current_label"]):
        if original != current:
            flow[original, current] += 1
    return flow


def relabel_summary(checkpoint_dir: str, classes: list[str]) -> dict | None:
    """Original -> current label counts of the relabeled samples in the checkpoint's relabel table."""
    path = join(checkpoint_dir, TABLE_FILE)
    fs, fs_path = open_fs(path)
    if not fs.isfile(fs_path):
        return None
    flow = relabel_flow(RelabelTable.load(path).to_pydict(), len(classes))
    return {"table": path, "changed": int(flow.sum()), "flow": flow.tolist(), "classes": classes}


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
        HTML_LINE,
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
    galleries = report.get("galleries")
    if galleries:
        lines += [
            "## Galleries",
            "",
            "Per true class, the wrong predictions the model was surest of: mislabeled test samples, "
            "ambiguous faces, or what the model confuses.",
            "",
            f"![confident errors]({galleries['confident_errors']})",
            "",
            "The test samples of lowest alpha, the ones SCN would weigh least.",
            "",
            f"![lowest alpha]({galleries['lowest_alpha']})",
            "",
        ]
    write_page(Path(path), lines)


def write_page(path: Path, lines: Sequence[str]) -> Path:
    """A report's markdown, then its self-contained HTML twin beside it; returns the markdown's path."""
    write_text(path, "\n".join(lines) + "\n")
    write_html(path)
    return path


# -- training runs --------------------------------------------------------------------------


def _read_text(url: str) -> str:
    fs, path = open_fs(url)
    with fs.open(path, "r") as f:
        return f.read()


def read_alpha(run: str, epoch: int) -> pa.Table | None:
    """Per-sample alpha of one epoch (columns key, alpha) from every rank's part, one row per key;
    None when the run recorded none for that epoch.

    Readers revisit samples to give every rank the same number of batches, so two ranks
    may both hold a key; the lowest rank's value is kept.
    """
    directory = alpha_epoch_url(run, epoch)
    fs, path = open_fs(directory)
    parts = sorted(fs.glob(join(path, "rank_*.parquet")))
    if not parts:
        return None
    tables = []
    for part in parts:
        with fs.open(part, "rb") as f:
            tables.append(pq.read_table(f, columns=["key", "alpha"]))
    table = pa.concat_tables(tables)
    table = table.append_column("row", pa.array(np.arange(table.num_rows)))
    first = table.group_by("key", use_threads=False).aggregate([("row", "min")]).column("row_min").to_numpy()
    return table.take(pa.array(np.sort(first))).select(["key", "alpha"])


def _training_labels(train_shards: str, label_overrides: str, keys: Sequence[str]) -> tuple[dict, dict | None]:
    """For `keys` of a training set: (key -> the label trained on, before any relabel; key -> the true
    label, or None when unknown: known only from a noise table with a `true_label` column)."""
    manifest = read_manifest(train_shards, columns=["key", "label"])
    rows = manifest.filter(pc.is_in(manifest.column("key"), value_set=pa.array(list(keys), pa.string()))).to_pydict()
    labels = dict(zip(rows["key"], rows["label"]))
    truth = None
    if label_overrides:
        if "true_label" in read_parquet(label_overrides).column_names:
            truth = {**labels, **{k: v for k, v in load_ground_truth(label_overrides).items() if k in labels}}
        labels.update((k, v) for k, v in load_overrides(label_overrides).items() if k in labels)
    return labels, truth


def write_run_report(run: str, out: Path, n: int = 16) -> Path:
    """report.md and report.html for a training run, in `out`, from its latest checkpoint: the
    lowest-alpha training samples of that epoch, the relabels (a sheet and the flow); and the
    run's curves from its TensorBoard event files."""
    checkpoint_dir = latest_checkpoint(run)
    if checkpoint_dir is None:
        raise CheckpointError(f"{run}: no complete checkpoint (checkpoint_epoch_NNNN/ with its {COMPLETE_FILE})")
    epoch = json.loads(_read_text(join(checkpoint_dir, STATE_FILE)))["epoch"]
    cfg = yaml.safe_load(_read_text(join(checkpoint_dir, CONFIG_FILE)))
    classes = json.loads(_read_text(join(checkpoint_dir, CLASSES_FILE)))
    table = RelabelTable.load(join(checkpoint_dir, TABLE_FILE)).to_pydict()
    relabeled = {k: c for k, o, c in zip(table["key"], table["original_label"], table["current_label"]) if o != c}
    alpha = read_alpha(run, epoch)
    values = np.zeros(0) if alpha is None else alpha.column("alpha").to_numpy()
    order = np.argsort(values, kind="stable")[:n]
    lowest = [] if alpha is None else alpha.column("key").take(pa.array(order)).to_pylist()
    labels, truth = _training_labels(cfg["train_shards"], cfg.get("label_overrides") or "", [*lowest, *relabeled])
    images = gallery.SampleImages(cfg["train_shards"])
    out = Path(out)
    lines = [
        "# Training run report",
        "",
        f"- run: `{run}`, method {cfg.get('method', 'scn')}; last checkpoint `{checkpoint_dir}` (epoch {epoch})",
        f"- training set: `{cfg['train_shards']}`"
        + (f", labels overridden by `{cfg['label_overrides']}`" if cfg.get("label_overrides") else ""),
        "- frames: " + ("green where a label is right, red where it is wrong (the noise table knows the truth)"
                        if truth is not None else "none (nothing here knows the true labels)"),
        HTML_LINE,
        "",
        "## Lowest-alpha training samples",
        "",
    ]
    if alpha is None:
        lines += [f"The run recorded no per-sample alpha for epoch {epoch} (`{alpha_part_url(run, epoch, 0)}`).", ""]
    else:
        strangers = [k for k in lowest if k not in labels]
        if strangers:
            raise ValueError(f"{run}: epoch {epoch}'s alpha names samples {strangers[:3]} that the training set "
                             f"{cfg['train_shards']} does not hold")
        fig = gallery.lowest_alpha(images, lowest, values[order], [labels[k] for k in lowest], classes, n=n,
                                   truth=truth, relabeled=relabeled, title=f"Lowest-alpha training samples, epoch {epoch}")
        save_figure(fig, out / LOWEST_ALPHA_PNG)
        lines += [
            f"The {len(lowest)} of {alpha.num_rows} samples trained in epoch {epoch} with the lowest alpha "
            f"(mean alpha {values.mean():.3f}); a relabeled sample shows its original -> current label."
            + (f" The {cfg.get('method')} method does not train alpha: these are its untrained importance branch's values."
               if cfg.get("method") in ("baseline", "eac") else ""),
            "",
            f"![lowest-alpha training samples]({LOWEST_ALPHA_PNG})",
            "",
        ]
    flow = relabel_flow(table, len(classes))
    plot_flow(flow.tolist(), classes, out / FLOW_PNG)
    save_figure(gallery.relabels(images, table, classes, n=n, truth=truth, title=f"Relabels up to epoch {epoch}"),
                out / RELABELS_PNG)
    lines += ["## Relabels", "", f"{len(relabeled)} samples carry a label other than their original one."]
    if truth is not None and relabeled:
        right = sum(truth.get(k) == c for k, c in relabeled.items())
        lines.append(f"Against the noise table's true labels, {right} relabels are right and "
                     f"{len(relabeled) - right} wrong.")
    lines += ["", f"![relabel flow]({FLOW_PNG})", "", f"![relabels]({RELABELS_PNG})", ""]
    lines += curves_section(run, out)
    return write_page(out / REPORT_MD, lines)


def _plot_series(ax, scalars: Mapping[str, tuple[list[int], list[float]]], tags: Sequence[str], marker: str = "") -> None:
    for tag in tags:
        if tag in scalars:
            ax.plot(*scalars[tag], marker=marker, label=tag.split("/", 1)[1].replace("_", " "))
    ax.legend(fontsize=8)


def plot_step_curves(scalars: Mapping[str, tuple[list[int], list[float]]], path: Path) -> None:
    """Per-step loss, WCE and RR, and alpha's mean with a band of one standard deviation."""
    fig = Figure(figsize=(8, 6), layout="constrained")
    losses, alpha = fig.subplots(2, 1, sharex=True)
    _plot_series(losses, scalars, ("step/loss", "step/wce", "step/rr"))
    losses.set_ylabel("loss (per sample)")
    losses.set_title("per step: means over rank 0's samples since the previous point")
    if "step/alpha_mean" in scalars:
        steps, mean = (np.asarray(v) for v in scalars["step/alpha_mean"])
        alpha.plot(steps, mean, color="tab:blue", label="alpha mean")
        if "step/alpha_std" in scalars and scalars["step/alpha_std"][0] == scalars["step/alpha_mean"][0]:
            std = np.asarray(scalars["step/alpha_std"][1])
            alpha.fill_between(steps, mean - std, mean + std, color="tab:blue", alpha=0.2, label="± 1 std")
        alpha.legend(fontsize=8)
    alpha.set_ylabel("alpha")
    alpha.set_xlabel("global step (rank 0's optimizer steps)")
    alpha.xaxis.get_major_locator().set_params(integer=True)
    save_figure(fig, path)


def plot_epoch_curves(scalars: Mapping[str, tuple[list[int], list[float]]], path: Path) -> None:
    """Per-epoch accuracies; and, when the noise table knows the truth, noisy vs clean alpha and relabel precision/recall."""
    known = ("epoch/alpha_noisy_mean", "epoch/alpha_clean_mean", "epoch/relabel_precision", "epoch/relabel_recall")
    audited = any(tag in scalars for tag in known)
    fig = Figure(figsize=(8, 6 if audited else 3.5), layout="constrained")
    axes = fig.subplots(2 if audited else 1, 1, sharex=True, squeeze=False)[:, 0]
    _plot_series(axes[0], scalars, ("epoch/train_accuracy", "epoch/val_accuracy", "epoch/val_mean_class_accuracy"), "o")
    axes[0].set_ylabel("accuracy")
    if audited:
        _plot_series(axes[1], scalars, known, "o")
        axes[1].set_ylabel("against the true labels")
    axes[-1].set_xlabel("epoch")
    axes[-1].xaxis.get_major_locator().set_params(integer=True)
    save_figure(fig, path)


def curves_section(run: str, out: Path) -> list[str]:
    """The run report's curves, drawn from its TensorBoard event files (scn_scale.tracking)."""
    lines = ["## Curves", ""]
    scalars = tracking.read_scalars(run)
    if not scalars:
        return lines + [f"The run wrote no TensorBoard event files (`{join(run, tracking.TENSORBOARD_DIR)}`): "
                        "it was trained with another `tracking` setting.", ""]
    if any(tag.startswith("step/") for tag in scalars):
        plot_step_curves(scalars, out / STEP_CURVES_PNG)
        lines += [f"![per-step curves]({STEP_CURVES_PNG})", ""]
    if any(tag.startswith("epoch/") for tag in scalars):
        plot_epoch_curves(scalars, out / EPOCH_CURVES_PNG)
        lines += [f"![per-epoch curves]({EPOCH_CURVES_PNG})", ""]
    return lines


# -- crawls ---------------------------------------------------------------------------------


def _duplicate_pairs(crawl: str, manifest: Mapping[str, list], n: int) -> Figure | None:
    """The sheet of up to `n` dropped faces, each beside the face it duplicated; None for a crawl
    without a duplicates file.

    Near duplicates come first, farthest first: those just inside the distance threshold
    are where the dedupe could drop a different face, so they are the ones worth a look.
    Dropped faces' crops are gone from the crawl's work files, so their pictures come from
    the thumbnails the crawl keeps in its duplicates file.
    """
    fs, path = open_fs(join(crawl, CRAWL_DUPLICATES))
    if not fs.isfile(path):
        return None
    with fs.open(path, "rb") as f:
        dropped = pq.read_table(f).to_pylist()
    thumbs = {r["key"]: r.get("thumbnail") for r in dropped}
    dropped.sort(key=lambda r: (r["reason"] != "near", -(r["distance"] or 0), r["key"]))
    shown = dropped[:n]
    kept = gallery.SampleImages(crawl).fetch(r["duplicate_of"] for r in shown if r["duplicate_of"])
    label_of = dict(zip(manifest["key"], manifest["label_name"]))
    tiles = []
    for r in shown:
        of = r["duplicate_of"] or ""
        tiles.append(gallery.Tile(r.get("thumbnail"), f"dropped {gallery.clip(r['key'], 12)}\n{r['label']}\n"
                                                       f"{r['reason']}, distance {r['distance']}"))
        tiles.append(gallery.Tile(kept.get(of) or thumbs.get(of), f"kept {gallery.clip(of, 12)}\n"
                                                                   f"{label_of.get(of, 'dropped later')}"))
    note = f"{len(shown)} of {len(dropped)} dropped faces (left) beside the face each duplicated (right)"
    return gallery.contact_sheet(gallery.in_rows(tiles, 8), "Duplicates the dedupe dropped", note=note)


def write_crawl_report(crawl: str, out: Path, per_class: int = 16, pairs: int = 16, seed: int = 0) -> Path:
    """report.md and report.html for a crawl, in `out`: a contact sheet per class (a random sample of
    `per_class` of its faces, drawn from `seed`) and the faces the dedupe dropped beside what they duplicated."""
    summary = json.loads(_read_text(join(crawl, CRAWL_SUMMARY)))
    manifest = read_manifest(crawl, columns=["key", "label_name", "query"]).to_pydict()
    rows_of: dict[str, list[int]] = {name: [] for name in summary["classes"]}
    for i, name in enumerate(manifest["label_name"]):
        rows_of[name].append(i)
    rng = random.Random(seed)
    chosen = {name: sorted(rng.sample(rows, min(per_class, len(rows)))) for name, rows in rows_of.items()}
    images = gallery.SampleImages(crawl).fetch(manifest["key"][i] for rows in chosen.values() for i in rows)
    out = Path(out)
    noise = summary.get("label_noise")
    lines = [
        "# Crawl report",
        "",
        f"- crawl: `{crawl}`, provider {summary.get('provider')}: {summary['candidates']} candidates, "
        f"{summary['fetched']} fetched, {summary['written']} faces written",
        f"- duplicates dropped: {sum(summary['duplicates'].values())} "
        f"({', '.join(f'{reason} {n}' for reason, n in summary['duplicates'].items()) or 'none'})",
    ]
    if noise:
        lines.append(f"- label noise measured against the source's ground truth: {noise['noise']:.1%} "
                     f"({noise['noisy']} of {noise['samples']} faces)")
    lines += [HTML_LINE, "",
              "## Faces per class", "", "| class | faces written |", "|---|---|"]
    lines += [f"| {name} | {len(rows)} |" for name, rows in rows_of.items()]
    lines.append("")
    for name, rows in chosen.items():
        png = f"crawl_{name}.png"
        keys = [manifest["key"][i] for i in rows]
        captions = [f"{gallery.clip(manifest['key'][i])}\n{gallery.clip(manifest['query'][i] or '-', 18)}" for i in rows]
        title = f"{name}: {len(rows)} of {len(rows_of[name])} faces (random sample, seed {seed})"
        save_figure(gallery.samples(images, keys, captions, title=title, note="caption: key, search query"), out / png)
        lines += [f"### {name}", "", f"![{name}]({png})", ""]
    lines += ["## Duplicates", ""]
    duplicates = _duplicate_pairs(crawl, manifest, pairs)
    if duplicates is None:
        lines += [f"The crawl has no `{CRAWL_DUPLICATES}`.", ""]
    else:
        save_figure(duplicates, out / DUPLICATES_PNG)
        lines += ["Faces dropped as copies of a face kept earlier. Exact: the same fetched bytes; near: the "
                  "perceptual hash of the crop (or of its mirror) within the distance threshold.",
                  "", f"![duplicates]({DUPLICATES_PNG})", ""]
    return write_page(out / REPORT_MD, lines)


# -- the command line -----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m scn_scale.report DIR`: the report of a training run or of a crawl (told apart by their files)."""
    parser = ArgumentParser(
        prog="python -m scn_scale.report",
        description="Report of a training run (its run directory) or of a crawl (its output directory): "
                    "contact sheets, plots, report.md and a self-contained report.html.")
    parser.add_argument("dir", help="a training run directory (out_dir/run_name) or a crawl's --out directory")
    parser.add_argument("--out", default="",
                        help=f"report directory or object-store URL (default: DIR/{REPORT_DIR})")
    parser.add_argument("--samples", type=int, default=16, help="samples per sheet (per class for a crawl)")
    parser.add_argument("--seed", type=int, default=0, help="seed of a crawl's per-class samples")
    add_log_level(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    directory = args.dir.rstrip("/")
    out = args.out or join(directory, REPORT_DIR)
    try:
        fs, path = open_fs(directory)
        open_fs(out)  # a --out that cannot be opened is refused before any work
        crawl = fs.isfile(join(path, CRAWL_SUMMARY))
        if not crawl and not fs.isfile(join(path, METRICS_FILE)) and latest_checkpoint(directory) is None:
            raise ValueError(f"{directory}: neither a training run ({METRICS_FILE}, checkpoint_epoch_NNNN/) "
                             f"nor a crawl ({CRAWL_SUMMARY})")
        with local_dir(out) as local:
            page = (write_crawl_report(directory, local, per_class=args.samples, pairs=args.samples, seed=args.seed)
                    if crawl else write_run_report(directory, local, n=args.samples))
    except (ValueError, OSError, CheckpointError) as exc:
        return bad_input(exc)
    print(f"report written to {join(out, page.name)} and {join(out, page.with_suffix('.html').name)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
