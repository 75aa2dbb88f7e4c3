"""The demo's report: what SCN did on a noisy crawl, measured against the embedded web's ground truth.

`report.md` leads with the numbers SCN exists for (the crawl's real label noise, alpha of
noisy versus clean samples, relabel precision and recall, SCN against the baseline on a
clean test set, the fine-tuning gain of crawl pretraining) and states each plainly,
whichever way it came out: the demo is a measurement, not an advertisement. Then the
curves and the details. `results.json` holds every number the page shows; the PNGs are
drawn on the Agg canvas, with scn_scale.report's helpers where they fit.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from scn_scale import report as plots
from scn_scale.metrics import alpha_gap
from scn_scale.predictions import paired_gap
from shards.atomic import write_json, write_text

REPORT_MD = "report.md"
RESULTS_JSON = "results.json"
ACCURACY_PNG = "accuracy_per_epoch.png"
ALPHA_PNG = "alpha_noisy_vs_clean.png"
TRAINING_PNG = "scn_during_training.png"
FLOW_PNG = "relabel_flow.png"
NOISE_PNG = "crawl_label_noise.png"
INTENSITY_PNG = "alpha_by_intensity.png"
PNGS = (ACCURACY_PNG, ALPHA_PNG, INTENSITY_PNG, TRAINING_PNG, FLOW_PNG, NOISE_PNG)


def _curve(metrics: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for line in metrics:
        value: Any = line
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        xs.append(line["epoch"])
        ys.append(math.nan if value is None else float(value))
    return xs, ys


def _epoch_axis(ax) -> None:
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_accuracy(runs: dict, scale: dict, path: Path) -> None:
    """Test accuracy per epoch: SCN against the baseline on the crawl; pretrained against scratch on RAF-DB layout.

    SCN's warm-up (plain cross-entropy, so the same curve as the baseline's) is shaded, and
    the first epoch it relabels in marked.
    """
    fig = Figure(figsize=(11, 4), layout="constrained")
    panels = (
        (("scn", "baseline"), "trained on the crawl: clean test set", scale.get("warmup_epochs", 0),
         scale["relabel_epoch"]),
        (("finetune-crawl", "finetune-scratch"), "RAF-DB layout: its test split", scale.get("finetune_warmup_epochs", 0),
         scale["finetune_relabel_epoch"]),
    )
    for i, (names, title, warmup, relabel) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        for name, style in zip(names, ("-o", "--s")):
            xs, ys = _curve(runs[name]["metrics"], "val_accuracy")
            ax.plot(xs, ys, style, label=f"{runs[name]['title']} (last {ys[-1]:.1%})" if ys else name)
        last = max((m["epoch"] for n in names for m in runs[n]["metrics"]), default=1)
        if warmup:
            ax.axvspan(0.5, min(warmup, last) + 0.5, color="tab:gray", alpha=0.12,
                       label="SCN's cross-entropy warm-up (" + (f"epochs 1-{warmup})" if warmup > 1 else "epoch 1)"))
        if relabel <= last:
            ax.axvline(relabel, color="tab:gray", linestyle=":", label=f"SCN relabels from epoch {relabel}")
        _epoch_axis(ax)
        ax.set_ylabel("accuracy")
        ax.set_title(title)
        ax.legend(fontsize=7)
    plots.save_figure(fig, path)


def plot_training(metrics: Sequence[dict], path: Path) -> None:
    """SCN during training: alpha of noisy and clean samples, and the relabel audit, epoch by epoch."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax = fig.add_subplot(1, 2, 1)
    for key, name, color in (("alpha.clean.mean", "clean", "tab:blue"), ("alpha.noisy.mean", "noisy", "tab:red")):
        xs, ys = _curve(metrics, key)
        ax.plot(xs, ys, "-o", color=color, label=f"{name} samples")
    _epoch_axis(ax)
    ax.set_ylabel("mean alpha over the epoch")
    ax.set_title("importance (alpha) by ground truth")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 2, 2)
    for key, name, style in (("audit.precision", "precision", "-o"), ("audit.recall", "recall", "--s")):
        xs, ys = _curve(metrics, key)
        ax.plot(xs, ys, style, label=f"relabel {name}")
    ax.set_ylim(-0.02, 1.02)
    _epoch_axis(ax)
    ax.set_ylabel("share")
    twin = ax.twinx()
    xs, ys = _curve(metrics, "relabels_total")
    twin.bar(xs, ys, alpha=0.2, color="tab:gray", label="samples relabeled (total)")
    twin.set_ylabel("samples relabeled (total)")
    ax.set_title("relabeling against the ground truth")
    handles = ax.get_legend_handles_labels()
    extra = twin.get_legend_handles_labels()
    ax.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8, loc="upper left")
    plots.save_figure(fig, path)


def plot_noise(noise: dict, path: Path) -> None:
    """The crawl's measured label noise per crawl label (the query's class)."""
    names = [c for c, v in noise["per_class"].items() if v["samples"]]
    shares = [noise["per_class"][c]["noise"] for c in names]
    counts = [noise["per_class"][c]["samples"] for c in names]
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    bars = ax.bar(names, shares, color="tab:red")
    for bar, n in zip(bars, counts):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"n={n}", ha="center", va="bottom", fontsize=7)
    ax.axhline(noise["noise"], color="black", linestyle=":", label=f"overall {noise['noise']:.1%}")
    ax.set_ylabel("share of samples whose crawl label is wrong")
    ax.set_title("label noise of the crawl, by crawl label")
    ax.tick_params(axis="x", labelrotation=45)
    ax.legend()
    plots.save_figure(fig, path)


def plot_intensity(by_intensity: dict, path: Path) -> None:
    """Mean alpha of clean and noisy crawled faces by expression intensity (neutral first)."""
    rows = by_intensity["rows"]
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.add_subplot()
    xs = np.arange(len(rows))
    for offset, key, name, color in ((-0.2, "alpha_clean", "clean", "tab:blue"), (0.2, "alpha_noisy", "noisy", "tab:red")):
        values = [math.nan if r[key] is None else r[key] for r in rows]
        ax.bar(xs + offset, values, width=0.4, color=color, label=f"{name} samples")
    ax.set_xticks(xs, [f"{r['faces']}\nn={r['n']}, {r['noisy']} noisy" for r in rows], fontsize=8)
    ax.set_ylabel("mean alpha")
    corr = by_intensity["correlation"]
    ax.set_title("importance (alpha) by how strongly a face shows its expression"
                 + (f" (r = {corr:+.2f})" if corr is not None else ""))
    ax.legend(fontsize=8)
    plots.save_figure(fig, path)


# -- the page ---------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def _points(diff: float) -> str:
    return f"{100 * diff:+.1f} points"


def headline(results: dict) -> dict:
    """The numbers the report leads with, derived from the results (and saved with them)."""
    runs, alpha, audit = results["runs"], results["alpha"], results["audit"]
    scn, base = runs["scn"]["eval"], runs["baseline"]["eval"]
    pre, scratch = runs["finetune-crawl"]["eval"], runs["finetune-scratch"]["eval"]
    diff, margin = paired_gap(*(str(Path(runs[n]["eval_dir"]) / "predictions.parquet") for n in ("scn", "baseline")))
    gain, gain_margin = paired_gap(*(str(Path(runs[n]["eval_dir"]) / "predictions.parquet")
                                     for n in ("finetune-crawl", "finetune-scratch")))
    noisy, clean = alpha.get("noisy", {}), alpha.get("clean", {})
    gap = alpha_gap(alpha)
    return {
        "label_noise": results["noise"]["noise"],
        "alpha_noisy_mean": noisy.get("mean"),
        "alpha_clean_mean": clean.get("mean"),
        "alpha_gap": None if gap is None else gap[0],
        "alpha_gap_2se": None if gap is None else gap[1],
        "relabel_precision": audit["precision"],
        "relabel_recall": audit["recall"],
        "relabeled": audit["changed"],
        "scn_accuracy": scn["accuracy"],
        "baseline_accuracy": base["accuracy"],
        "scn_minus_baseline": diff,
        "scn_minus_baseline_95": margin,
        "pretrained_accuracy": pre["accuracy"],
        "scratch_accuracy": scratch["accuracy"],
        "finetune_gain": gain,
        "finetune_gain_95": gain_margin,
    }


def _verdicts(results: dict, h: dict) -> list[str]:
    """One plain sentence per claim, true to the numbers whichever way they came out."""
    noise = results["noise"]
    lines = [
        f"**The crawl was noisy.** {_pct(noise['noise'])} of the {noise['samples']} crawled samples "
        f"({noise['noisy']}) carry the label of a query whose class they do not show, measured against "
        "the embedded web's ground truth."
        if noise["noisy"] else
        "**The crawl had no label noise** against the embedded web's ground truth, so SCN had nothing to "
        "find here: the comparisons below measure no noise robustness."
    ]
    if h["alpha_gap"] is None:
        lines.append("**alpha, noisy vs clean:** not measurable (one of the two groups is empty).")
    elif h["alpha_gap"] > 0:
        within = h["alpha_gap"] <= h["alpha_gap_2se"]
        lines.append(f"**SCN gave the noisy samples lower importance:** mean alpha {h['alpha_noisy_mean']:.3f} for "
                     f"noisy samples against {h['alpha_clean_mean']:.3f} for clean ones (gap {h['alpha_gap']:.3f}"
                     + (f"; within about two standard errors, ±{h['alpha_gap_2se']:.3f}, so a weak separation)."
                        if within else f", more than two standard errors, ±{h['alpha_gap_2se']:.3f})."))
    else:
        lines.append(f"**SCN did not give the noisy samples lower importance in this run:** mean alpha "
                     f"{h['alpha_noisy_mean']:.3f} for noisy samples against {h['alpha_clean_mean']:.3f} for clean ones.")
    audit = results["audit"]
    if audit["changed"]:
        net = ("restored more labels than it broke" if audit["wrong_after"] < audit["noisy"] else
               "broke as many labels as it restored" if audit["wrong_after"] == audit["noisy"] else
               "broke more labels than it restored")
        lines.append(f"**Relabeling {net}:** the crawl had {audit['noisy']} wrong labels, {audit['wrong_after']} after "
                     f"SCN's relabel table. SCN changed {audit['changed']} labels; {audit['restored']} of them to the true "
                     f"class (precision {_pct(audit['precision'])}, recall {_pct(audit['recall'])} of the wrong labels); "
                     f"{audit['corrupted']} clean labels were changed away from the truth.")
    else:
        lines.append(f"**Relabeling:** SCN changed no label in this run (recall 0 of {audit['noisy']} wrong labels).")
    diff, margin = h["scn_minus_baseline"], h["scn_minus_baseline_95"]
    scn, base = _pct(h["scn_accuracy"]), _pct(h["baseline_accuracy"])
    if diff > 0:
        verdict = f"**SCN beat the baseline** on the clean test set: {scn} against {base} ({_points(diff)})"
    elif diff < 0:
        verdict = f"**SCN did not beat the baseline** on the clean test set: {scn} against {base} ({_points(diff)})"
    else:
        verdict = f"**SCN and the baseline tied** on the clean test set: {scn} each"
    within = abs(diff) <= margin
    lines.append(verdict + (f"; a difference within its paired 95% interval (±{100 * margin:.1f} points, the two "
                            "models scored on the same test faces), so not a clear result." if within and diff else
                            f" (paired 95% interval ±{100 * margin:.1f} points)."))
    gain, gain_margin = h["finetune_gain"], h["finetune_gain_95"]
    pre, scratch = _pct(h["pretrained_accuracy"]), _pct(h["scratch_accuracy"])
    word = "helped" if gain > 0 else ("did not help" if gain < 0 else "made no difference")
    lines.append(f"**Crawl pretraining {word}** on the RAF-DB-layout benchmark: {pre} fine-tuned from the crawl-"
                 f"pretrained SCN against {scratch} from scratch with the same budget ({_points(gain)})"
                 + (f"; within its paired 95% interval (±{100 * gain_margin:.1f} points)." if abs(gain) <= gain_margin
                    and gain else f" (paired 95% interval ±{100 * gain_margin:.1f} points)."))
    return lines


def _alpha_row(name: str, stats: dict) -> str:
    if not stats or not stats.get("n"):
        return f"| {name} | 0 | - | - | - |"
    return f"| {name} | {stats['n']} | {stats['mean']:.3f} | {stats['q50']:.3f} | {stats['above_0_99']:.3f} |"


def _epoch_table(runs: dict, names: Sequence[str]) -> list[str]:
    lines = ["| epoch | " + " | ".join(runs[n]["title"] for n in names) + " |",
             "|---|" + "---|" * len(names)]
    by_epoch: dict[int, dict[str, float]] = {}
    for n in names:
        for m in runs[n]["metrics"]:
            by_epoch.setdefault(m["epoch"], {})[n] = m["val_accuracy"]
    for epoch in sorted(by_epoch):
        lines.append(f"| {epoch} | " + " | ".join(_pct(by_epoch[epoch].get(n)) for n in names) + " |")
    return lines


#: How the embedded web chose the images it filed under a wrong query (crawler.localweb's noise_pick).
_PICKS = {
    "ambiguous": "The images filed under a wrong query were drawn in proportion to their ambiguity (1 - expression "
                 "intensity), as on the web, where a faint smile is filed under \"neutral\" far more often than a "
                 "grin under \"angry\": the noise follows the image, which is what SCN's importance weight can see. ",
    "uniform": "The images filed under a wrong query were drawn uniformly, whatever they show: noise independent "
               "of the image, which alpha (a function of the image) can only find by memorising samples. ",
}


def _intensity_section(by_intensity: dict) -> list[str]:
    """alpha by expression intensity: does SCN's importance fall on the ambiguous faces, as it is meant to?"""
    lines = ["### alpha and ambiguity", "",
             "SCN's importance weight is meant to discount ambiguous samples. The ground truth knows how strongly "
             "each face shows its true expression (its intensity; neutral faces show none), so the same scores, "
             "grouped by intensity:", "",
             "| faces | n | noisy | mean alpha | clean | noisy |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['faces']} | {r['n']} | {r['noisy']} | {_fmt(r['alpha_mean'])} | {_fmt(r['alpha_clean'])} | "
              f"{_fmt(r['alpha_noisy'])} |" for r in by_intensity["rows"]]
    corr = by_intensity["correlation"]
    lines += ["", "Correlation of alpha with intensity over the faces that show an expression: "
              + ("not measurable (the corpus records no intensities)." if corr is None else
                 f"r = {corr:+.2f} (positive when alpha rises with how clearly a face shows its expression)."), ""]
    if by_intensity["without_intensity"]:
        lines += [f"{by_intensity['without_intensity']} faces have no intensity in the ground truth and are left out.", ""]
    return lines + [f"![alpha by intensity]({INTENSITY_PNG})", ""]


def markdown(results: dict, h: dict) -> str:
    runs, audit, alpha = results["runs"], results["audit"], results["alpha"]
    scale = results["scale"]
    crawl = results["crawl"]
    lines = [
        "# scn-scale demo: SCN on a noisy web crawl",
        "",
        "Self-Cure Network (SCN) learns a per-sample importance alpha, ranks samples by it so that "
        "doubtful ones weigh less, and relabels samples the model confidently disagrees with. This "
        "run crawled an embedded web whose search results are partly wrong, trained SCN and a plain "
        "cross-entropy baseline on the crawl, and measured what SCN did against the web's ground truth. "
        f"Scale `{scale['name']}`, training seed {results.get('seed', '-')}; every number below is what this run "
        "measured.",
        "",
        "## What SCN did",
        "",
        "| measured | value |",
        "|---|---|",
        f"| label noise of the crawl (against the ground truth) | {_pct(h['label_noise'])} "
        f"({results['noise']['noisy']} of {results['noise']['samples']}) |",
        f"| mean alpha, noisy samples | {_fmt(h['alpha_noisy_mean'])} |",
        f"| mean alpha, clean samples | {_fmt(h['alpha_clean_mean'])} |",
        f"| relabel precision | {_pct(h['relabel_precision'])} ({audit['restored']} of {audit['changed']} changes) |",
        f"| relabel recall | {_pct(h['relabel_recall'])} ({audit['restored']} of {audit['noisy']} wrong labels) |",
        f"| wrong crawl labels, before / after SCN's relabel table | {audit['noisy']} / {audit['wrong_after']} |",
        f"| clean test accuracy, SCN (last epoch) | {_pct(h['scn_accuracy'])} |",
        f"| clean test accuracy, baseline (last epoch) | {_pct(h['baseline_accuracy'])} |",
        f"| SCN minus baseline | {_points(h['scn_minus_baseline'])} (paired 95% interval: "
        f"±{100 * h['scn_minus_baseline_95']:.1f}) |",
        f"| RAF-DB-layout accuracy, fine-tuned from the crawl | {_pct(h['pretrained_accuracy'])} |",
        f"| RAF-DB-layout accuracy, from scratch | {_pct(h['scratch_accuracy'])} |",
        f"| fine-tuning gain of crawl pretraining | {_points(h['finetune_gain'])} (paired 95% interval: "
        f"±{100 * h['finetune_gain_95']:.1f}) |",
        "",
        *[f"- {line}" for line in _verdicts(results, h)],
        "",
        "Accuracies are the last epoch's, evaluated by `scn_scale.evaluate`; no epoch was selected on a test set. "
        "The per-epoch curves are the trainer's validation on the same test sets. SCN and the baseline both "
        "start from random weights (the paper starts from a face-recognition model), with the same epochs, "
        "images, input size and seeds; " + _recipe(scale) + " The fine-tuning runs compare crawl pretraining "
        "with no pretraining.",
        "",
        f"![accuracy per epoch]({ACCURACY_PNG})",
        "",
        "## alpha: importance of noisy and clean samples",
        "",
        "The trained SCN model scored every crawled sample once (no augmentation); the ground truth "
        "splits them into samples whose crawl label is right (clean) and wrong (noisy).",
        "",
        "| samples | n | mean alpha | median | share above 0.99 |",
        "|---|---|---|---|---|",
        _alpha_row("clean", alpha.get("clean", {})),
        _alpha_row("noisy", alpha.get("noisy", {})),
        "",
        f"![alpha histogram]({ALPHA_PNG})",
        "",
        *_intensity_section(results["alpha_by_intensity"]),
        "During training (means over each epoch's training passes, with augmentation), and the relabel audit "
        "after each epoch's merge:",
        "",
        f"![SCN during training]({TRAINING_PNG})",
        "",
        "## Faces",
        "",
        "What SCN doubted and what it changed, framed green where the label shown is the web's truth and red "
        "where it is not:",
        "",
        f"![lowest alpha]({results['galleries']['lowest_alpha']})",
        "",
        f"![relabeled]({results['galleries']['relabeled']})",
        "",
        "## Relabeling",
        "",
        f"The final relabel table (`{audit['table']}`) against the ground truth: {audit['changed']} samples "
        f"relabeled, {audit['restored']} restored to their true class, {audit['corrupted']} clean samples "
        f"changed away from it. Flow from the crawl label (rows) to the current one (columns):",
        "",
        f"![relabel flow]({FLOW_PNG})",
        "",
        "| true class | samples | noisy | changed | restored | precision | recall |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in audit["per_class"].items():
        lines.append(f"| {name} | {row['samples']} | {row['noisy']} | {row['changed']} | {row['restored']} | "
                     f"{_pct(row['precision'])} | {_pct(row['recall'])} |")
    lines += [
        "",
        "## The crawl",
        "",
        f"The embedded web served a pool of synthetic faces ({scale['pool_per_class']} per class) with "
        f"{_pct(scale['noise'])} of each query's results drawn from other classes, {_pct(scale['broken'])} broken "
        f"links and {_pct(scale['duplicates'])} duplicates. {_PICKS.get(scale.get('noise_pick'), '')}"
        f"`crawler.build` crawled it with the default query taxonomy: {crawl.get('candidates', '-')} candidates, "
        f"{crawl.get('fetched', '-')} fetched, {crawl['written']} written.",
        "",
        f"![crawl label noise]({NOISE_PNG})",
        "",
        "## Accuracy per epoch",
        "",
        "On the crawl (clean test set):",
        "",
        *_epoch_table(runs, ("scn", "baseline")),
        "",
        "On the RAF-DB layout (its test split):",
        "",
        *_epoch_table(runs, ("finetune-crawl", "finetune-scratch")),
        "",
        "## Runs and files",
        "",
        "The trainer validates on every rank with that rank's own copy of the model; `scn_scale.evaluate` "
        "scores the saved model file. Where the two differ in the last epoch, the report's final numbers are "
        "the evaluation's.",
        "",
        "Every epoch each rank merges the relabels of all ranks into its copy of the relabel table and "
        "checks its digest against the others'; the ranks column says whether the copies were identical "
        "after every epoch.",
        "",
        "| run | epochs | ranks (relabel table identical on all) | test accuracy (evaluate) | trainer's last "
        "validation | mean class accuracy | evaluation | model |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs.values():
        last = run["metrics"][-1]["val_accuracy"] if run["metrics"] else None
        lines.append(f"| {run['title']} | {len(run['metrics'])} | {_ranks(run['metrics'])} | "
                     f"{_pct(run['eval']['accuracy'])} | {_pct(last)} | "
                     f"{_pct(run['eval']['mean_class_accuracy'])} | `{run['eval_dir']}` | `{run['model']}` |")
    lines += ["", "| stage | wall time |", "|---|---|"]
    lines += [f"| {title} | {seconds:.0f} s |" for title, seconds in results["timings"].items()]
    lines += [f"| total, to this report | {results['elapsed_s']:.0f} s |", "",
              f"Sizes: `{scale}`; training config `{results['config']}`.", ""]
    return "\n".join(lines)


def _recipe(scale: dict) -> str:
    """SCN's schedule on the crawl, in words: the warm-up is a deviation from the released code."""
    if not scale.get("warmup_epochs"):
        return f"SCN relabels from epoch {scale['relabel_epoch']}."
    return (f"SCN trains as plain cross-entropy for its first {scale['warmup_epochs']} epochs (alpha held at 1, no "
            f"rank loss: `scn.warmup_epochs`, a deviation from the released code, which starts from a face-recognition "
            f"model) and relabels from epoch {scale['relabel_epoch']}.")


def _ranks(metrics: Sequence[dict]) -> str:
    """'2 (yes)': the run's ranks, and whether every epoch's relabel table digest was the same on all of them."""
    digests = [m.get("table_digests") for m in metrics]
    if not digests or not all(digests):
        return "-"
    same = all(len(set(d)) == 1 for d in digests)
    return f"{len(digests[-1])} ({'yes' if same else 'NO'})"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def write_report(results: dict, alpha: np.ndarray, noisy: np.ndarray, out: Path) -> Path:
    """Write results.json, the PNGs and report.md into `out`; returns report.md's path.

    `alpha` and `noisy` are the trained SCN's alpha per crawled sample and whether its
    crawl label is wrong (the histogram's data; their summary is `results["alpha"]`).
    """
    out = Path(out)
    h = headline(results)
    results = {**results, "headline": h, "pngs": list(PNGS)}
    runs, scale = results["runs"], results["scale"]
    plot_accuracy(runs, scale, out / ACCURACY_PNG)
    plots.plot_alpha(np.asarray(alpha), out / ALPHA_PNG, np.asarray(noisy, dtype=bool))
    plot_intensity(results["alpha_by_intensity"], out / INTENSITY_PNG)
    plot_training(runs["scn"]["metrics"], out / TRAINING_PNG)
    plots.plot_flow(results["audit"]["flow"], results["audit"]["classes"], out / FLOW_PNG)
    plot_noise(results["noise"], out / NOISE_PNG)
    write_json(out / RESULTS_JSON, _without_metrics(results))
    path = out / REPORT_MD
    write_text(path, markdown(results, h))
    return path


def _without_metrics(results: dict) -> dict:
    """results.json keeps each run's per-epoch accuracy, not its whole metrics file (which is beside the run)."""
    runs = {}
    for name, run in results["runs"].items():
        run = dict(run)
        run["val_accuracy_per_epoch"] = [m["val_accuracy"] for m in run.pop("metrics")]
        run["eval"] = {k: run["eval"][k] for k in ("accuracy", "mean_class_accuracy", "samples", "per_class_accuracy")}
        runs[name] = run
    return {**results, "runs": runs}
