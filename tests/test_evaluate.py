"""Evaluation reports: numbers recounted from the predictions, checkpoint resolution, classes by name,
several workers counting each sample once, and the plots of a training run."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from scn_scale import checkpoint
from scn_scale.data import eval_transform
from scn_scale.checkpoint import CheckpointError
from scn_scale.evaluate import EvalConfig, Workers, evaluate, find_model_file, predict_set
from scn_scale.model import SCNModel
from scn_scale.noise import make_noise, save_overrides
from scn_scale.weights import save_model_file
from shards import BASIC7, CANONICAL, open_shard_set, read_manifest
from tests.conftest import write_shard_set

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


def save_checkpoint(directory: Path, classes, epoch: int, seed: int = 0) -> SCNModel:
    """A model file in `directory`, marked complete as the trainer marks its checkpoints."""
    torch.manual_seed(seed)
    model = SCNModel(len(classes))
    save_model_file(str(directory / "model.pt"), model, classes, {"epoch": epoch, "image_size": SIZE})
    checkpoint.mark_complete(str(directory))
    return model.eval()


def reference_outputs(model: SCNModel, shards: Path, model_classes, set_classes) -> dict[str, tuple[int, float]]:
    """key -> (predicted index in the shared class list, alpha), computed directly from the tar members."""
    import tarfile

    shared = [c for c in model_classes if c in set_classes]
    columns = [model_classes.index(c) for c in shared]
    transform = eval_transform(SIZE)
    out = {}
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext != "jpg":
                    continue
                image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                with torch.no_grad():
                    result = model(transform(image)[None])
                out[key] = (int(result.logits[0, columns].argmax()), float(result.alpha[0]))
    return out


def recount(pred_path: Path, n_classes: int) -> dict:
    table = pq.read_table(pred_path).to_pydict()
    labels, preds = np.array(table["label"]), np.array(table["pred"])
    confusion = np.zeros((n_classes, n_classes), dtype=int)
    for t, p in zip(labels, preds):
        confusion[t, p] += 1
    per_class = [confusion[i, i] / confusion[i].sum() if confusion[i].sum() else None for i in range(n_classes)]
    present = [v for v in per_class if v is not None]
    return {
        "keys": table["key"],
        "labels": labels,
        "preds": preds,
        "alpha": np.array(table["alpha"]),
        "accuracy": float((labels == preds).mean()),
        "mean_class_accuracy": float(np.mean(present)),
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }


def check_report_against_predictions(out: Path, classes) -> dict:
    report = json.loads((out / "report.json").read_text())
    counted = recount(out / "predictions.parquet", len(classes))
    assert report["classes"] == list(classes)
    assert report["samples"] == len(counted["keys"]) == len(set(counted["keys"]))
    assert report["accuracy"] == pytest.approx(counted["accuracy"])
    assert report["mean_class_accuracy"] == pytest.approx(counted["mean_class_accuracy"])
    assert report["confusion_matrix"] == counted["confusion"]
    for name, value in zip(classes, counted["per_class"]):
        assert report["per_class_accuracy"][name] == (None if value is None else pytest.approx(value))
    assert report["alpha"]["n"] == len(counted["keys"])
    assert report["alpha"]["mean"] == pytest.approx(counted["alpha"].mean())
    md = (out / "report.md").read_text()
    assert f"{100 * counted['accuracy']:.2f}%" in md and f"{100 * counted['mean_class_accuracy']:.2f}%" in md
    for png in report["plots"].values():
        assert f"]({png})" in md
        with Image.open(out / png) as im:
            im.load()
    return report


def test_report_recounts_and_matches_the_model(tmp_path: Path) -> None:
    shards = tmp_path / "set"
    write_shard_set(shards, [5, 4, 3], classes=BASIC7, size=SIZE)
    model = save_checkpoint(tmp_path / "ckpt", list(CANONICAL), epoch=2)
    report = evaluate(EvalConfig(checkpoint=str(tmp_path / "ckpt"), shards=str(shards), out=str(tmp_path / "out"),
                                 batch_size=4, loader_workers=1))
    assert report is not None
    check_report_against_predictions(tmp_path / "out", BASIC7)
    assert report["samples"] == 12 and report["epoch"] == 2 and report["world_size"] == 1
    assert report["model_classes"] == list(CANONICAL) and report["set_classes"] == list(BASIC7)
    assert any("share" in note for note in report["notes"])
    # Every sample once, against its manifest label, with the model's own output.
    manifest = read_manifest(str(shards), columns=["key", "label"]).to_pydict()
    counted = recount(tmp_path / "out" / "predictions.parquet", 7)
    assert sorted(counted["keys"]) == sorted(manifest["key"])
    truth = dict(zip(manifest["key"], manifest["label"]))
    assert [truth[k] for k in counted["keys"]] == counted["labels"].tolist()
    reference = reference_outputs(model, shards, list(CANONICAL), list(BASIC7))
    for key, pred, alpha in zip(counted["keys"], counted["preds"], counted["alpha"]):
        assert pred == reference[key][0]
        assert alpha == pytest.approx(reference[key][1], abs=1e-5)


def test_a_bar_over_the_batches_on_a_terminal_only(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_shard_set(tmp_path / "set", [4, 4], classes=BASIC7, size=SIZE)
    cfg = EvalConfig(checkpoint="", shards=str(tmp_path / "set"), out="", batch_size=4, loader_workers=0)
    model, shard_set, one = SCNModel(len(BASIC7)).eval(), open_shard_set(cfg.shards), Workers(0, 1, False)
    assert len(predict_set(model, shard_set, cfg, SIZE, one, torch.device("cpu"))) == 8
    assert capsys.readouterr().err == ""  # stderr is no terminal here (nor in logs, nor under Ray): no bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    predict_set(model, shard_set, cfg, SIZE, one, torch.device("cpu"))
    assert "evaluate" in capsys.readouterr().err


def test_set_classes_the_model_lacks_are_left_out_and_noisy_alpha_split(tmp_path: Path) -> None:
    shards = tmp_path / "set"
    write_shard_set(shards, [10], classes=CANONICAL, size=SIZE)
    save_checkpoint(tmp_path / "ckpt", list(BASIC7), epoch=1)
    manifest = read_manifest(str(shards), columns=["key", "label"]).to_pydict()
    noise = tmp_path / "noise.parquet"
    save_overrides(make_noise(manifest["key"], manifest["label"], 8, 0.5, seed=0), str(noise))
    report = evaluate(EvalConfig(checkpoint=str(tmp_path / "ckpt" / "model.pt"), shards=str(shards),
                                 out=str(tmp_path / "out"), batch_size=4, loader_workers=0, label_overrides=str(noise)))
    contempt = manifest["label"].count(7)
    assert report["samples"] == 10 - contempt
    assert report["classes"] == list(BASIC7)
    assert any(f"{contempt} samples" in note for note in report["notes"]) == bool(contempt)
    assert report["alpha"]["noisy"]["n"] + report["alpha"]["clean"]["n"] == report["samples"]
    check_report_against_predictions(tmp_path / "out", BASIC7)


def test_latest_checkpoint_of_a_run(tmp_path: Path) -> None:
    from scn_scale.checkpoint import checkpoint_dir_name

    run = tmp_path / "run"
    for epoch in (9, 10, 2):  # by epoch number, not by name order
        (run / checkpoint_dir_name(epoch)).mkdir(parents=True)
        save_checkpoint(run / checkpoint_dir_name(epoch), list(BASIC7), epoch=epoch)
    (run / checkpoint_dir_name(11)).mkdir()  # a checkpoint still being written: no model file yet
    assert find_model_file(run) == str(run / "checkpoint_epoch_0010" / "model.pt")
    assert find_model_file(f"{run}/") == str(run / "checkpoint_epoch_0010" / "model.pt")
    assert find_model_file(run / "checkpoint_epoch_0002") == str(run / "checkpoint_epoch_0002" / "model.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no model.pt"):
        find_model_file(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        find_model_file(tmp_path / "nowhere")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_workers_count_each_sample_once(tmp_path: Path) -> None:
    """Two processes as torchrun starts them (WORLD_SIZE, RANK, MASTER_*): gathered by key, same numbers
    as one process, though the shards are uneven and the loader repeats samples to equalize batches."""
    shards = tmp_path / "set"
    write_shard_set(shards, [7, 2, 4, 1], classes=BASIC7, size=SIZE)
    save_checkpoint(tmp_path / "ckpt", list(BASIC7), epoch=1)
    single = evaluate(EvalConfig(checkpoint=str(tmp_path / "ckpt"), shards=str(shards), out=str(tmp_path / "one"),
                                 batch_size=3, loader_workers=0))
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "scn_scale.evaluate", "--checkpoint", str(tmp_path / "ckpt"),
             "--shards", str(shards), "--out", str(tmp_path / "two"), "--batch-size", "3", "--loader-workers", "0"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    double = check_report_against_predictions(tmp_path / "two", BASIC7)
    assert double["world_size"] == 2
    assert double["samples"] == single["samples"] == 14
    for name in ("accuracy", "mean_class_accuracy", "confusion_matrix"):
        assert double[name] == single[name]
    one = pq.read_table(tmp_path / "one" / "predictions.parquet").to_pydict()
    two = pq.read_table(tmp_path / "two" / "predictions.parquet").to_pydict()
    assert one["key"] == two["key"] and one["pred"] == two["pred"]
    assert np.allclose(one["alpha"], two["alpha"], atol=1e-5)


def test_run_directory_report_states_best_and_last_epoch_and_relabel_flow(tmp_path: Path) -> None:
    """A run laid out by the trainer's own writers (metrics file, config, relabel table, model files)."""
    from scn_scale.config import TrainConfig, save_config
    from scn_scale.relabel import Proposal
    from scn_scale.relabel_table import RelabelTable

    val, test = tmp_path / "val", tmp_path / "test"
    write_shard_set(val, [4, 4], classes=BASIC7, size=SIZE, seed=1)
    write_shard_set(test, [6], classes=BASIC7, size=SIZE, seed=2)
    run = tmp_path / "runs" / "ft"
    accuracies = [0.30, 0.55, 0.50]
    metrics_file = checkpoint.MetricsFile(str(run), first_epoch=1)
    table = RelabelTable()
    for epoch, acc in enumerate(accuracies, start=1):
        directory = run / checkpoint.checkpoint_dir_name(epoch)
        directory.mkdir(parents=True)
        save_checkpoint(directory, list(BASIC7), epoch=epoch, seed=epoch)
        train_cfg = TrainConfig(train_shards="unused", val_shards=str(val), run_name="ft")
        save_config(train_cfg, directory / checkpoint.CONFIG_FILE)
        table.merge([Proposal(f"k{epoch}a", 0, 2, 0.5, epoch), Proposal(f"k{epoch}b", 1, 2, 0.4, epoch)])
        table.save(str(directory / checkpoint.TABLE_FILE))
        metrics_file.append({"epoch": epoch, "val_accuracy": acc, "val_mean_class_accuracy": acc - 0.1})

    report = evaluate(EvalConfig(checkpoint=str(run), shards=str(test), out=str(tmp_path / "out"), loader_workers=0))
    check_report_against_predictions(tmp_path / "out", BASIC7)
    assert report["epoch"] == 3 and report["checkpoint"].endswith("checkpoint_epoch_0003/model.pt")
    best, last = report["run"]["best"], report["run"]["last"]
    assert (best["epoch"], best["accuracy"]) == (2, 0.55) and (last["epoch"], last["accuracy"]) == (3, 0.50)
    assert report["run"]["selection_shards"] == str(val) and report["run"]["selection_split"] == "validation set"
    assert not report["run"]["selected_on_evaluated_set"]
    flow = np.array(report["relabel"]["flow"])
    assert flow.sum() == report["relabel"]["changed"] == 6 and flow[0, 2] == 3 and flow[1, 2] == 3
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| best (selected on validation set) | 2 | 55.00% | 45.00% |" in md
    assert "| last | 3 | 50.00% | 40.00% |" in md

    # Selecting on the set that is evaluated is said out loud.
    report = evaluate(EvalConfig(checkpoint=str(run), shards=str(val), out=str(tmp_path / "out2"), loader_workers=0))
    assert report["run"]["selected_on_evaluated_set"]
    assert "best-on-test" in (tmp_path / "out2" / "report.md").read_text()
