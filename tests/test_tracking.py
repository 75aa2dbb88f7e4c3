"""Tracking without Ray: TensorBoard event files (local and in object storage) read back with
TensorBoard's own reader, a resumed attempt purging what the failed one logged, an MLflow run in
a local store, the install hint, the per-step means, and the run report's curves.

A real training run's event files are checked in tests/test_train.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from scn_scale import report, tracking
from scn_scale.config import ConfigError, TrainConfig
from scn_scale.metrics import RunningSums
from scn_scale.train import prepare
from tests.conftest import write_shard_set
from tests.test_report import check_page, lay_out_run, linked_images

STEPS = 5  # steps per epoch in these made-up runs


def epoch_line(epoch: int, audited: bool = True) -> dict:
    """A metrics line as the trainer writes it, with the fields tracking reads."""
    line = {
        "epoch": epoch, "steps_per_rank": STEPS, "loss": 1.0 / epoch, "wce": 0.8 / epoch, "rr": 0.2 / epoch, "lr": 1e-3,
        "train_accuracy": 0.3 * epoch, "val_accuracy": 0.25 * epoch, "val_mean_class_accuracy": 0.2 * epoch,
        "relabels": epoch, "relabels_total": epoch * (epoch + 1) // 2, "images_per_s": 100.0,
        "alpha": {"n": 10, "mean": 0.5, "std": 0.1},
    }
    if audited:
        line["alpha"].update(noisy={"n": 3, "mean": 0.4}, clean={"n": 7, "mean": 0.6})
        line["audit"] = {"precision": 0.75, "recall": None}  # undefined values are left out
    return line


def train_epoch(tracker: tracking.RunTracker, epoch: int, loss: float, steps: tuple[int, ...] = (2, 4, 5)) -> None:
    for step in steps:
        tracker.log_interval(step, {tag: loss for tag in tracking.STEP_TAGS})


def _scalars(directory: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(directory))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_event_files_hold_step_and_epoch_scalars_and_a_resume_purges_the_replayed_steps(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    cfg = TrainConfig()
    tracker = tracking.open_tracker(cfg, run, [], first_epoch=1)
    train_epoch(tracker, 1, loss=1.0)
    tracker.end_epoch(epoch_line(1))
    train_epoch(tracker, 2, loss=9.0, steps=(2, 4))  # then the worker dies: no end of epoch 2
    tracker.close()

    tracker = tracking.open_tracker(cfg, run, [epoch_line(1)], first_epoch=2)  # resumed after epoch 1
    train_epoch(tracker, 2, loss=0.5)
    tracker.end_epoch(epoch_line(2))
    tracker.close()

    steps_dir = tmp_path / "run" / tracking.TENSORBOARD_DIR / tracking.STEPS_DIR
    assert _scalars(steps_dir, "step/loss") == [(2, 1.0), (4, 1.0), (5, 1.0), (7, 0.5), (9, 0.5), (10, 0.5)]
    epochs_dir = tmp_path / "run" / tracking.TENSORBOARD_DIR / tracking.EPOCHS_DIR
    assert [(s, round(v, 4)) for s, v in _scalars(epochs_dir, "epoch/val_accuracy")] == [(1, 0.25), (2, 0.5)]
    scalars = tracking.read_scalars(run)
    assert set(tracking.STEP_TAGS) <= set(scalars)
    assert {"epoch/relabel_precision", "epoch/alpha_noisy_mean", "epoch/alpha_clean_mean"} <= set(scalars)
    assert "epoch/relabel_recall" not in scalars


def test_event_files_of_a_run_in_object_storage_are_copied_at_each_epoch_end(s3) -> None:
    run = f"s3://{s3.bucket}/runs/tracked"
    tracker = tracking.open_tracker(TrainConfig(), run, [], first_epoch=1)
    train_epoch(tracker, 1, loss=2.0)
    assert tracking.read_scalars(run) == {}  # nothing copied before the epoch ends
    tracker.end_epoch(epoch_line(1, audited=False))
    assert tracking.read_scalars(run)["step/loss"] == ([2, 4, 5], [2.0, 2.0, 2.0])
    train_epoch(tracker, 2, loss=1.0)
    tracker.close()
    assert tracking.read_scalars(run)["step/loss"] == ([2, 4, 5, 7, 9, 10], [2.0] * 3 + [1.0] * 3)


def test_mlflow_writes_one_run_to_a_local_store_and_a_resume_continues_it(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run = str(tmp_path / "run")
    cfg = TrainConfig(tracking="mlflow", run_name="tracked")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'run' / tracking.MLFLOW_DB}")
    tracker = tracking.open_tracker(cfg, run, [], first_epoch=1)
    train_epoch(tracker, 1, loss=1.0)
    tracker.end_epoch(epoch_line(1))
    tracker.close(finished=False)  # the attempt failed in epoch 2
    assert client.get_run(tracker.sink.run_id).info.status == "FAILED"
    tracker = tracking.open_tracker(cfg, run, [epoch_line(1)], first_epoch=2)
    train_epoch(tracker, 2, loss=0.5)
    tracker.end_epoch(epoch_line(2))
    tracker.close()

    [found] = client.search_runs([client.get_experiment_by_name(tracking.MLFLOW_EXPERIMENT).experiment_id])
    assert found.info.run_name == "tracked" and found.info.status == "FINISHED"
    assert found.data.params["scn.delta1"] == "0.07" and found.data.params["tracking"] == "mlflow"
    history = client.get_metric_history(found.info.run_id, "step/loss")
    assert sorted((m.step, m.value) for m in history) == [(2, 1.0), (4, 1.0), (5, 1.0), (7, 0.5), (9, 0.5), (10, 0.5)]
    assert [m.step for m in client.get_metric_history(found.info.run_id, "epoch/val_accuracy")] == [1, 2]


def test_mlflow_missing_is_a_config_error_with_the_install_command(tmp_path: Path, monkeypatch) -> None:
    write_shard_set(tmp_path / "set", [4] * 4)
    cfg = TrainConfig(train_shards=str(tmp_path / "set"), val_shards=str(tmp_path / "set"), num_workers=1,
                      loader_workers=0, batch_size=4, out_dir=str(tmp_path / "runs"), tracking="mlflow")
    for module in ("mlflow", "mlflow.tracking"):  # an import of either now fails, as when not installed
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ConfigError, match=r"pip install 'scn-scale\[mlflow\]'"):
        prepare(cfg)
    assert not (tmp_path / "runs").exists()


def test_step_meter_gives_the_means_of_each_interval() -> None:
    meter = tracking.StepMeter(lr=0.01, world=2)
    first = dict(zip(RunningSums.FIELDS, (8.0, 6.0, 2.0, 3.0, 2.0, 1.2)))  # sums over 4 samples
    scalars = meter.read(first, 4)
    assert scalars.pop("step/images_per_s") > 0  # 4 samples x 2 ranks over the clock's interval
    assert scalars == pytest.approx({"step/loss": 2.0, "step/wce": 1.5, "step/rr": 0.5, "step/lr": 0.01,
                                     "step/alpha_mean": 0.5, "step/alpha_std": (1.2 / 4 - 0.25) ** 0.5})
    more = {"loss": 2.0, "alpha": 0.2, "alpha_sq": 0.02}  # 2 more samples, each alpha 0.1
    scalars = meter.read({k: v + more.get(k, 0.0) for k, v in first.items()}, 6)
    assert scalars["step/loss"] == pytest.approx(1.0) and scalars["step/alpha_mean"] == pytest.approx(0.1)
    assert scalars["step/alpha_std"] == pytest.approx(0.0, abs=1e-6)


def test_run_report_draws_the_curves_from_the_event_files(tmp_path: Path) -> None:
    run, _ = lay_out_run(tmp_path)
    assert report.main([str(run), "--out", str(tmp_path / "before")]) == 0
    assert "wrote no TensorBoard event files" in (tmp_path / "before" / "report.md").read_text()

    tracker = tracking.open_tracker(TrainConfig(), str(run), [], first_epoch=1)
    for epoch in (1, 2):
        train_epoch(tracker, epoch, loss=1.0 / epoch)
        tracker.end_epoch(epoch_line(epoch))
    tracker.close()
    assert report.main([str(run), "--samples", "4"]) == 0
    md = run / "report" / "report.md"
    assert {report.STEP_CURVES_PNG, report.EPOCH_CURVES_PNG} <= set(linked_images(md))
    check_page(md)
