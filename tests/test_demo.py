"""The demo (`python -m scn_scale.demo`): its ground-truth join, and the whole job at the tiny scale.

The end-to-end test runs the real entry point in-process and then checks the report
against the files the run left (crawl summary, noise table, metrics files, evaluation
reports, relabel audit), that every picture opens, and that no process the demo started
is still running. A second slow test interrupts a demo while it trains and checks the
same of its clean-up.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from scn_scale import demo, demo_report
from scn_scale.checkpoint import read_metrics
from scn_scale.noise import load_ground_truth, load_overrides
from shards import BASIC7, CANONICAL
from tests.test_evaluate import check_report_against_predictions

ROOT = Path(__file__).resolve().parents[1]


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (the demo's children all name its --out)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if text in cmdline and state not in ("Z", "X"):
                found.append(int(entry.name))
    return found


def _assert_nothing_left(out: Path) -> dict:
    record = json.loads((out / "logs" / "processes.json").read_text())
    assert record["left_running"] == {}
    assert record["children"], "the demo recorded no child process"
    for child in record["children"]:
        assert child["status"] is not None, f"{child['name']} has no exit status"
        assert demo.session_members(child["session"]) == [], f"{child['name']} left processes in its session"
    assert _processes_mentioning(str(out)) == []
    return record


def test_default_scale_is_the_demo_config():
    """The sizes in cluster/configs/demo.yaml are the default scale's (one recipe, two places to read it)."""
    cfg = yaml.safe_load(demo.DEFAULT_CONFIG.read_text())
    s = demo.SCALES["default"]
    assert (cfg["epochs"], cfg["image_size"], cfg["batch_size"] * cfg["num_workers"], cfg["num_workers"],
            cfg["scn"]["warmup_epochs"], cfg["scn"]["relabel_epoch"]) == (
        s.epochs, s.image_size, s.batch_size, s.workers, s.warmup_epochs, s.relabel_epoch)
    for scale in demo.SCALES.values():
        scale.validate()
    with pytest.raises(ValueError, match="relabel_epoch must come after the warmup_epochs"):
        dataclasses.replace(s, warmup_epochs=s.relabel_epoch).validate()
    with pytest.raises(ValueError, match="must split evenly over 2 ranks"):
        dataclasses.replace(s, batch_size=63).validate()


def test_crawl_noise_joins_the_manifest_to_the_ground_truth_by_url():
    classes = ["neutral", "happiness", "sadness"]
    truth = {"images": {
        "a": {"url": "http://127.0.0.1:1/images/a.jpg", "class": "happiness"},
        "b": {"url": "http://127.0.0.1:1/images/b.jpg", "class": "sadness"},
        "c": {"url": "http://127.0.0.1:1/images/c.jpg", "class": "neutral"},
    }}
    manifest = {"key": ["ka", "kb", "kc"], "url": [truth["images"][k]["url"] for k in "abc"], "label": [1, 0, 0]}
    table, stats = demo.crawl_noise(manifest, truth, classes)
    assert table.to_pydict() == {"key": ["kb"], "label": [0], "true_label": [2]}
    assert (stats["samples"], stats["noisy"]) == (3, 1)
    assert stats["per_class"]["neutral"] == {"samples": 2, "noisy": 1, "noise": 0.5}
    assert stats["per_class"]["sadness"]["noise"] is None
    with pytest.raises(demo.StageError, match="unknown to the embedded web"):
        demo.crawl_noise({"key": ["x"], "url": ["http://elsewhere/x.jpg"], "label": [0]}, truth, classes)


def test_alpha_by_intensity_groups_the_scores_by_the_ground_truth():
    images = {  # id: (true class, intensity)
        "n1": ("neutral", 0.0), "w1": ("anger", 0.1), "w2": ("anger", 0.2), "m1": ("fear", 0.5),
        "s1": ("fear", 0.9), "s2": ("anger", 1.0), "x1": ("fear", None),
    }
    truth = {"images": {i: {"url": f"http://127.0.0.1:1/{i}.jpg", "class": c, "intensity": v}
                        for i, (c, v) in images.items()}}
    keys = list(images)
    alpha = np.array([0.2, 0.1, 0.3, 0.5, 0.8, 0.9, 0.4])
    noisy = np.array([False, True, False, False, True, False, False])
    scored = demo.AlphaScores(keys, alpha, noisy, {})
    result = demo.alpha_by_intensity(scored, {k: f"http://127.0.0.1:1/{k}.jpg" for k in keys}, truth)
    rows = {r["faces"]: r for r in result["rows"]}
    assert list(rows) == ["neutral", "intensity 0.00-0.25", "intensity 0.25-0.50", "intensity 0.50-0.75",
                          "intensity 0.75-1.00"]
    assert rows["neutral"] == {"faces": "neutral", "n": 1, "noisy": 0, "alpha_mean": 0.2, "alpha_clean": 0.2,
                               "alpha_noisy": None}
    weak = rows["intensity 0.00-0.25"]
    assert (weak["n"], weak["noisy"], weak["alpha_clean"], weak["alpha_noisy"]) == (2, 1, 0.3, 0.1)
    assert weak["alpha_mean"] == pytest.approx(0.2)
    assert rows["intensity 0.25-0.50"]["n"] == 0 and rows["intensity 0.25-0.50"]["alpha_mean"] is None
    assert (rows["intensity 0.50-0.75"]["n"], rows["intensity 0.75-1.00"]["n"]) == (1, 2)  # 1.0 is in the last bin
    assert result["without_intensity"] == 1
    expressive = [(0.1, 0.1), (0.2, 0.3), (0.5, 0.5), (0.9, 0.8), (1.0, 0.9)]
    assert result["correlation"] == pytest.approx(np.corrcoef(np.array(expressive).T)[0, 1])


def test_prepare_out_never_empties_a_directory_it_did_not_write(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(demo.StageError, match="not a demo's output"):
        demo.prepare_out(tmp_path)
    assert (tmp_path / "precious.txt").exists()
    out = tmp_path / "out"
    demo.prepare_out(out)
    (out / "old-result").write_text("from the last run")
    demo.prepare_out(out)
    assert sorted(p.name for p in out.iterdir()) == [demo.MARKER]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    started = time.monotonic()
    assert demo.main(["--out", str(out), "--scale", "tiny"]) == 0
    print(f"tiny demo: {time.monotonic() - started:.0f} s")
    _assert_nothing_left(out)

    report = out / "report"
    results = json.loads((report / demo_report.RESULTS_JSON).read_text())
    h = results["headline"]

    # The crawl's noise: the crawler's own measurement, the noise table and the report agree.
    summary = json.loads((out / "crawl" / "crawl_summary.json").read_text())
    table = pq.read_table(out / "labels" / "crawl_noise.parquet").to_pydict()
    assert results["noise"]["noisy"] == summary["label_noise"]["noisy"] == len(table["key"])
    assert results["noise"]["samples"] == summary["label_noise"]["samples"] == summary["written"]
    assert h["label_noise"] == pytest.approx(summary["label_noise"]["noise"])
    assert all(a != b for a, b in zip(table["label"], table["true_label"]))

    # Every run: its accuracy per epoch is its metrics file's, its final accuracy its evaluation's.
    for name in demo.RUNS:
        run = results["runs"][name]
        metrics = read_metrics(str(out / "runs" / name))
        evaluated = json.loads((out / "eval" / name / "report.json").read_text())
        assert run["val_accuracy_per_epoch"] == [m["val_accuracy"] for m in metrics]
        assert run["eval"]["accuracy"] == evaluated["accuracy"]
        assert Path(run["model"]).is_file()
    tiny = demo.SCALES["tiny"]
    assert len(results["runs"]["scn"]["val_accuracy_per_epoch"]) == tiny.epochs
    assert len(results["runs"]["finetune-crawl"]["val_accuracy_per_epoch"]) == tiny.finetune_epochs
    assert h["scn_accuracy"] == results["runs"]["scn"]["eval"]["accuracy"]
    assert h["baseline_accuracy"] == results["runs"]["baseline"]["eval"]["accuracy"]
    assert h["finetune_gain"] == pytest.approx(
        results["runs"]["finetune-crawl"]["eval"]["accuracy"] - results["runs"]["finetune-scratch"]["eval"]["accuracy"])

    # Fine-tuning: 7 classes, the pretrained run started from SCN's final crawl model, the other from nothing.
    finetuned = json.loads((out / "eval" / "finetune-crawl" / "report.json").read_text())
    assert len(finetuned["classes"]) == 7 and "contempt" not in finetuned["classes"]
    ckpt = Path(results["runs"]["finetune-crawl"]["model"]).parent
    assert yaml.safe_load((ckpt / "config.yaml").read_text())["init"] == str(demo.final_model(out / "runs" / "scn"))
    ckpt = Path(results["runs"]["finetune-scratch"]["model"]).parent
    assert yaml.safe_load((ckpt / "config.yaml").read_text())["init"] == ""
    # Trained on a shard set (the crawl), fine-tuned on the RAF-DB layout, evaluated: every report's
    # numbers are a recount of its predictions file, and its pictures open.
    for name in demo.RUNS:
        check_report_against_predictions(out / "eval" / name, BASIC7 if name.startswith("finetune") else CANONICAL)

    # The relabel audit is the trainer's own audit of its last epoch; the alpha split covers the crawl.
    last = read_metrics(str(out / "runs" / "scn"))[-1]
    for key in ("samples", "noisy", "changed", "restored", "corrupted", "precision", "recall"):
        assert results["audit"][key] == last["audit"][key], key
    assert results["audit"]["noisy"] == results["noise"]["noisy"]
    alpha = results["alpha"]
    assert alpha["noisy"].get("n", 0) == results["noise"]["noisy"]
    assert alpha["noisy"].get("n", 0) + alpha["clean"]["n"] == results["noise"]["samples"]
    assert h["alpha_clean_mean"] == alpha["clean"]["mean"]
    noisy_keys = set(load_ground_truth(str(out / "labels" / "crawl_noise.parquet")))
    assert noisy_keys == set(load_overrides(str(out / "labels" / "crawl_noise.parquet")))
    # alpha by intensity covers the same samples; the synthetic corpus records every intensity.
    by_intensity = results["alpha_by_intensity"]
    assert sum(r["n"] for r in by_intensity["rows"]) == results["noise"]["samples"]
    assert sum(r["noisy"] for r in by_intensity["rows"]) == results["noise"]["noisy"]
    assert by_intensity["without_intensity"] == 0
    assert h["alpha_gap_2se"] > 0

    # The page: its headline numbers as the results hold them, every picture there and readable.
    text = (report / demo_report.REPORT_MD).read_text()
    for value in (h["label_noise"], h["scn_accuracy"], h["baseline_accuracy"], h["pretrained_accuracy"],
                  h["scratch_accuracy"]):
        assert f"{100 * value:.1f}%" in text
    assert ("SCN beat the baseline" in text) == (h["scn_minus_baseline"] > 0)
    assert ("SCN did not beat the baseline" in text) == (h["scn_minus_baseline"] < 0)
    for png in (*demo_report.PNGS, *results["galleries"].values()):
        assert f"]({png})" in text
        with Image.open(report / png) as image:
            image.verify()
    audit = results["audit"]  # wrong crawl labels before and after SCN's table, recounted
    assert audit["wrong_after"] == audit["noisy"] - audit["restored"] + audit["corrupted"]
    assert f"| {audit['noisy']} / {audit['wrong_after']} |" in text
    assert results["report"] == str(report / demo_report.REPORT_MD)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_interrupted_demo_stops_everything_it_started(tmp_path):
    """SIGINT while the Ray cluster is up and a training run is under way: the demo unwinds and stops it all."""
    out = tmp_path / "demo"
    errors = tmp_path / "stderr.txt"
    with open(errors, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "scn_scale.demo", "--out", str(out), "--scale", "tiny"],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 400
        train_log = out / "logs" / "train-scn.log"
        while not (train_log.exists() and train_log.stat().st_size > 0):
            assert proc.poll() is None, f"the demo ended before training: {errors.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "training did not start in time"
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    record = _assert_nothing_left(out)
    names = {child["name"] for child in record["children"]}
    assert {"localweb", "crawl", "ray-head", "train-scn"} <= names
