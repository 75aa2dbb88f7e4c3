"""The paper's synthetic-noise table through the product's own trainer: cross-entropy vs SCN at 0-30% noise.

For each noise rate, `scn_scale.noise`'s protocol (that share of the training samples,
each given a random label other than its own, frozen for the run) and two runs of
`scn_scale.train` with the same budget, seeds, input size and init: `method=baseline`
(plain cross-entropy) and `method=scn`. The test set is clean and of other people; it is
the runs' validation set, so best-epoch figures are selected on it and printed only
beside the last-epoch ones, which are the result. Prints a table and writes
`noise_robustness.md`, `noise_robustness.png` and `results.json` under `--out`.

Both methods start from the same pretrained weights, as in the paper (ResNet-18 from
MS-Celeb-1M face recognition; the GPU preset's config starts from torchvision's ImageNet
weights). The CPU preset has no such file here, so it makes one: cross-entropy on clean
synthetic faces of a third set of people, once per bench run. From random weights a short
CPU run learns too little for either method's behaviour under noise to show (bench/README.md).

    python bench/noise_robustness.py --preset cpu                     # synthetic faces, about 30 min on 2 cores
    python bench/noise_robustness.py --preset gpu --train DIR --test DIR  # RAF-DB imported by scn_scale.importers
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import ray
from matplotlib.figure import Figure

from crawler.synthetic import CorpusConfig, generate_corpus
from scn_scale.config import TrainConfig, load_config
from scn_scale.importers import import_imagefolder
from scn_scale.metrics import accuracy_gap, alpha_gap
from scn_scale.noise import make_noise, save_overrides
from scn_scale.report import save_figure
from scn_scale.train import LOCAL_NODE_IP, train
from shards import read_manifest
from shards.atomic import write_json, write_text
from shards.cli import add_set

REPO = Path(__file__).resolve().parents[1]
RATES = (0.0, 0.1, 0.2, 0.3)
METHODS = {"baseline": "cross-entropy", "scn": "SCN"}
COLORS = {"baseline": "tab:blue", "scn": "tab:orange"}


@dataclass(frozen=True)
class Preset:
    """A training config and its overrides; the CPU preset also makes its own data and start."""

    config: str
    overrides: tuple[str, ...]
    # Synthetic faces per class (0: --train and --test are required), three sets of people.
    train_per_class: int = 0
    test_per_class: int = 0
    start_per_class: int = 0  # clean faces for the common start (0: the config's own init)
    start_overrides: tuple[str, ...] = ()
    intensity_range: tuple[float, float] = (0.0, 1.0)  # expression intensities of the synthetic faces


PRESETS = {
    # One rank on the 2-core VM (torch on both cores); the 9 runs take about 30 minutes (bench/README.md).
    # delta1 0.15, the paper's margin; alpha's own spread within a batch meets it (and the released code's
    # 0.07) without help, so the rank loss stays near 0 either way (bench/README.md).
    "cpu": Preset(
        config="cluster/configs/cpu-small.yaml",
        overrides=("num_workers=1", "cpus_per_worker=2", "loader_workers=1", "image_size=48", "batch_size=64",
                   "epochs=8", "scn.relabel_epoch=3", "scn.delta1=0.15", "scn.rank_scope=local",
                   "keep_checkpoints=1"),
        train_per_class=150,
        test_per_class=120,
        start_per_class=600,
        start_overrides=("method=baseline", "epochs=6"),
        intensity_range=(0.5, 1.0),
    ),
    # The released code's RAF-DB recipe on one GPU (cluster/configs/rafdb-finetune.yaml), from torchvision:resnet18.
    "gpu": Preset(config="cluster/configs/rafdb-finetune.yaml", overrides=("num_workers=1",)),
}


def synthetic_sets(out: Path, preset: Preset, seed: int) -> dict[str, str]:
    """Training, test and start sets of synthetic faces, each of other people (corpora of different seeds)."""
    sets = {}
    for split, per_class, corpus_seed in (("train", preset.train_per_class, 3 * seed + 1),
                                          ("test", preset.test_per_class, 3 * seed + 2),
                                          ("start", preset.start_per_class, 3 * seed + 3)):
        if not per_class:
            continue
        shards = out / "data" / split
        if not (shards / "stats.json").exists():
            faces = out / "data" / f"{split}-faces"
            generate_corpus(CorpusConfig(out=str(faces), per_class=per_class, seed=corpus_seed,
                                         intensity_range=preset.intensity_range))
            import_imagefolder(faces, shards, split=split, dataset=f"bench-{split}")
        sets[split] = str(shards)
    return sets


def common_start(start_set: str, test_set: str, preset: Preset, overrides: Sequence[str], out: Path,
                 seed: int) -> str:
    """The weights both methods start from: cross-entropy on the clean start set (rerunning finds it done)."""
    cfg = load_config(TrainConfig, str(REPO / preset.config), [
        *overrides, *preset.start_overrides, f"train_shards={start_set}", f"val_shards={test_set}",
        f"seed={seed}", f"out_dir={out / 'runs'}", f"run_name=start-seed{seed}",
    ])
    result = train(cfg)
    print(f"common start: {result.model_file} (test accuracy {result.metrics[-1]['val_accuracy']:.1%})")
    return str(result.model_file)


def run_summary(metrics: list[dict]) -> dict:
    """What the table reports of one run: its last epoch, its best epoch on the test set, and the curves."""
    last = metrics[-1]
    best = max(metrics, key=lambda m: m["val_accuracy"])
    alpha = last.get("alpha", {})
    audit = last.get("audit", {})
    gap = alpha_gap(alpha)
    return {
        "last": last["val_accuracy"],
        "best": best["val_accuracy"],
        "best_epoch": best["epoch"],
        "test_samples": last["val"]["samples"],
        "per_epoch": [m["val_accuracy"] for m in metrics],
        "alpha_noisy": alpha.get("noisy", {}).get("mean"),
        "alpha_clean": alpha.get("clean", {}).get("mean"),
        "alpha_gap": None if gap is None else gap[0],  # clean - noisy, and twice its standard error
        "alpha_gap_2se": None if gap is None else gap[1],
        "alpha_gap_per_epoch": [None if (g := alpha_gap(m.get("alpha", {}))) is None else g[0] for m in metrics],
        "rank_loss": last.get("rr"),  # the last epoch's mean: 0 when alpha's spread already meets delta1
        "relabel_precision": audit.get("precision"),
        "relabel_recall": audit.get("recall"),
        "relabeled": audit.get("changed"),
        "wrong_before": audit.get("noisy"),  # wrong labels given, and left after the relabel table
        "wrong_after": audit.get("wrong_after"),
        "images_per_s": last["images_per_s"],
    }


def run_rate(rate: float, train_set: str, test_set: str, preset: Preset, overrides: Sequence[str], out: Path,
             seed: int) -> dict:
    """Both methods at one noise rate; the label table is drawn once and shared."""
    manifest = read_manifest(train_set, columns=["key", "label"]).to_pydict()
    num_classes = max(manifest["label"]) + 1
    table = out / "noise" / f"noise-{round(100 * rate):02d}.parquet"
    save_overrides(make_noise(manifest["key"], manifest["label"], num_classes, rate=rate, seed=seed), str(table))
    result = {}
    for method in METHODS:
        name = f"{method}-noise{round(100 * rate):02d}-seed{seed}"
        cfg = load_config(TrainConfig, str(REPO / preset.config), [
            *overrides, f"train_shards={train_set}", f"val_shards={test_set}", f"label_overrides={table}",
            f"method={method}", f"seed={seed}", f"out_dir={out / 'runs'}", f"run_name={name}",
        ])
        started = time.monotonic()
        result[method] = {**run_summary(train(cfg).metrics), "wall_s": time.monotonic() - started}
    scn, base = result["scn"], result["baseline"]
    result["gap"], result["gap_2se"] = accuracy_gap(scn["last"], base["last"], scn["test_samples"])
    return result


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def table(results: dict) -> list[str]:
    lines = [
        "| noise | method | last epoch | best epoch (on test) | relabel precision / recall | wrong labels before -> after "
        "| alpha noisy / clean | alpha clean - noisy (2 SE) | rank loss | SCN - CE, last (2 SE) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rate, r in results["rates"].items():
        for method, label in METHODS.items():
            m = r[method]
            gap = f"{100 * r['gap']:+.1f} (±{100 * r['gap_2se']:.1f})" if method == "scn" else ""
            relabel = f"{_pct(m['relabel_precision'])} / {_pct(m['relabel_recall'])}" if method == "scn" else ""
            alpha = f"{_num(m['alpha_noisy'])} / {_num(m['alpha_clean'])}" if method == "scn" else ""
            separation = (f"{m['alpha_gap']:+.4f} (±{m['alpha_gap_2se']:.4f})"
                          if method == "scn" and m["alpha_gap"] is not None else "")
            rank_loss = f"{m['rank_loss']:.4f}" if method == "scn" else ""
            wrong = f"{m['wrong_before']} -> {m['wrong_after']}" if method == "scn" else ""
            lines.append(f"| {100 * float(rate):.0f}% | {label} | {_pct(m['last'])} | {_pct(m['best'])} (epoch {m['best_epoch']}) | "
                         f"{relabel} | {wrong} | {alpha} | {separation} | {rank_loss} | {gap} |")
    return lines


def plot(results: dict, path: Path) -> None:
    """Last-epoch accuracy per noise rate with two standard errors, the per-epoch curves at the highest
    rate, and SCN's alpha separation (clean - noisy) per epoch at each noisy rate."""
    rates = list(results["rates"])
    fig = Figure(figsize=(15, 4), layout="constrained")
    ax, curves, separation = fig.add_subplot(1, 3, 1), fig.add_subplot(1, 3, 2), fig.add_subplot(1, 3, 3)
    x = np.array([float(r) for r in rates])
    for method, label in METHODS.items():
        last = np.array([results["rates"][r][method]["last"] for r in rates])
        n = np.array([results["rates"][r][method]["test_samples"] for r in rates])
        ax.errorbar(100 * x, 100 * last, yerr=200 * np.sqrt(last * (1 - last) / n), marker="o", capsize=3,
                    color=COLORS[method], label=f"{label}, last epoch")
        ax.plot(100 * x, [100 * results["rates"][r][method]["best"] for r in rates], linestyle=":", marker=".",
                color=COLORS[method], label=f"{label}, best epoch (selected on test)")
        per_epoch = results["rates"][rates[-1]][method]["per_epoch"]
        curves.plot(range(1, len(per_epoch) + 1), [100 * a for a in per_epoch], marker=".", color=COLORS[method],
                    label=label)
    ax.set_xlabel("symmetric label noise (%)")
    ax.set_ylabel("clean test accuracy (%)")
    ax.set_title("last epoch, ±2 standard errors")
    ax.legend(fontsize=8)
    curves.set_xlabel("epoch")
    curves.set_ylabel("clean test accuracy (%)")
    curves.set_title(f"per epoch at {100 * float(rates[-1]):.0f}% noise")
    curves.legend(fontsize=8)
    for rate in rates:
        gaps = results["rates"][rate]["scn"]["alpha_gap_per_epoch"]
        if any(g is not None for g in gaps):
            separation.plot(range(1, len(gaps) + 1), [np.nan if g is None else g for g in gaps], marker=".",
                            label=f"{100 * float(rate):.0f}% noise")
    separation.axhline(0.0, color="grey", linewidth=0.8)
    separation.set_xlabel("epoch")
    separation.set_ylabel("mean alpha, clean - noisy")
    separation.set_title("SCN: mean alpha, clean - noisy (> 0 intended)")
    separation.legend(fontsize=8)
    save_figure(fig, path)


def write_outputs(results: dict, out: Path) -> None:
    lines = [
        f"# Label noise: cross-entropy vs SCN through `scn_scale.train` ({results['preset']} preset)",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}; {results['wall_s'] / 60:.1f} minutes in all.  ",
        f"Training set: {results['train']}; clean test set: {results['test']} ({results['test_samples']} faces).  ",
        f"Recipe: `{results['config']}` with {' '.join(results['overrides'])}; training seed {results['seed']}.",
        "",
        *table(results),
        "",
        "![accuracy per noise rate](noise_robustness.png)",
        "",
    ]
    write_text(out / "noise_robustness.md", "\n".join(lines))
    write_json(out / "results.json", results)
    plot(results, out / "noise_robustness.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--train", help="training shard set (default for the cpu preset: synthetic faces)")
    parser.add_argument("--test", help="clean test shard set of other people (default for cpu: synthetic faces)")
    parser.add_argument("--rates", default=",".join(str(r) for r in RATES), help="noise rates, comma-separated")
    parser.add_argument("--seed", type=int, default=0, help="training seed (the noise draw uses it too)")
    parser.add_argument("--out", default="bench-out/noise_robustness", help="output directory")
    add_set(parser, "lr=0.0005, over the preset's config and settings")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    out = Path(args.out).resolve()
    started = time.monotonic()
    sets = {"train": args.train, "test": args.test} if args.train and args.test else {}
    if not sets and preset.train_per_class:
        sets = synthetic_sets(out, preset, args.seed)
    if not sets:
        print(f"error: the {args.preset} preset needs --train and --test shard sets", file=sys.stderr)
        return 2
    overrides = (*preset.overrides, *args.set)
    ray.init(address="local", include_dashboard=False, _node_ip_address=LOCAL_NODE_IP)
    try:
        if "start" in sets:
            overrides = (*overrides, f"init={common_start(sets['start'], sets['test'], preset, overrides, out, args.seed)}")
        rates = {rate: run_rate(float(rate), sets["train"], sets["test"], preset, overrides, out, args.seed)
                 for rate in args.rates.split(",")}
    finally:
        ray.shutdown()
    train_set, test_set = sets["train"], sets["test"]
    results = {
        "preset": args.preset, "command": " ".join(["python bench/noise_robustness.py", *(argv or sys.argv[1:])]),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "config": preset.config, "overrides": list(overrides), "seed": args.seed, "train": train_set, "test": test_set,
        "test_samples": next(iter(rates.values()))["scn"]["test_samples"], "wall_s": time.monotonic() - started,
        "rates": rates,
    }
    write_outputs(results, out)
    print("\n".join(table(results)))
    print(f"written: {out / 'noise_robustness.md'}, {out / 'noise_robustness.png'}, {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
