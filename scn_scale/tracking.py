"""Experiment tracking on rank 0: TensorBoard event files in the run directory, an MLflow run, or nothing.

Two kinds of scalars, each on its own axis:
- per step (`step/...`), at every `log_every_steps` read of the step loop's running sums and
  at the epoch end: means over rank 0's samples since the previous read, at the run's global
  step (rank 0's optimizer steps since epoch 1, so a resumed run continues the axis);
- per epoch (`epoch/...`), from the epoch's metrics line (every rank's samples), at the epoch.

TensorBoard gets one directory per axis, `run/tensorboard/steps` and `run/tensorboard/epochs`,
because a resumed attempt tells TensorBoard to drop what the failed one logged past its
checkpoint (`purge_step`), and that purge is by step across every tag of a directory. In
object storage the event files are written to a local temporary directory and copied into
the run at every epoch end. MLflow (`tracking: mlflow`, the `mlflow` extra) is imported only
when chosen; its default store is an SQLite file in the run directory.

The step loop hands this module floats it has already read back, so tracking adds no wait
for the device; `read_scalars` reads the event files back with TensorBoard's own reader.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Mapping, Protocol

from torch.utils.tensorboard import SummaryWriter

from scn_scale.config import ConfigError, TrainConfig, config_to_dict
from scn_scale.metrics import RunningSums
from shards.fs import is_local, join, open_fs

TENSORBOARD_DIR = "tensorboard"
STEPS_DIR = "steps"
EPOCHS_DIR = "epochs"
MLFLOW_DB = "mlflow.db"
MLFLOW_EXPERIMENT = "scn-scale"
#: The tag by which a resumed run finds its MLflow run again.
RUN_DIR_TAG = "scn_scale.run_dir"
MLFLOW_HINT = "tracking=mlflow needs MLflow: pip install 'scn-scale[mlflow]' (or pip install mlflow)"
#: The per-step scalars, as `StepMeter.read` names them.
STEP_TAGS = ("step/loss", "step/wce", "step/rr", "step/lr", "step/alpha_mean", "step/alpha_std", "step/images_per_s")


class StepMeter:
    """Per-step scalars from successive reads of `metrics.RunningSums`: means over the samples
    trained since the previous read, so each point shows that interval, not the epoch so far."""

    def __init__(self, lr: float, world: int) -> None:
        self.lr, self.world = lr, world
        self.sums = dict.fromkeys(RunningSums.FIELDS, 0.0)
        self.samples = 0
        self.time = time.perf_counter()

    def read(self, sums: Mapping[str, float], samples: int) -> dict[str, float] | None:
        """The interval's scalars from rank 0's running `sums` after `samples` samples; None if
        nothing was trained since the last read. images/s is rank 0's rate times the world size:
        the gradient all-reduce of every step keeps the ranks in step."""
        n = samples - self.samples
        if n <= 0:
            return None
        now = time.perf_counter()
        delta = {k: sums[k] - self.sums[k] for k in RunningSums.FIELDS}
        mean = delta["alpha"] / n
        scalars = {
            "step/loss": delta["loss"] / n,
            "step/wce": delta["wce"] / n,
            "step/rr": delta["rr"] / n,
            "step/lr": self.lr,
            "step/alpha_mean": mean,
            "step/alpha_std": max(delta["alpha_sq"] / n - mean * mean, 0.0) ** 0.5,
            "step/images_per_s": n * self.world / max(now - self.time, 1e-9),
        }
        self.sums, self.samples, self.time = dict(sums), samples, now
        return scalars


def epoch_scalars(line: Mapping) -> dict[str, float]:
    """The per-epoch scalars of a metrics line; noisy/clean alpha and relabel precision/recall only
    when the run knows the true labels (a noise table with `true_label`) and they are defined."""
    alpha = line["alpha"]
    scalars = {f"epoch/{k}": line[k] for k in (
        "loss", "wce", "rr", "lr", "train_accuracy", "val_accuracy", "val_mean_class_accuracy", "relabels",
        "relabels_total", "images_per_s")}
    scalars.update({"epoch/alpha_mean": alpha.get("mean"), "epoch/alpha_std": alpha.get("std")})
    for group in ("noisy", "clean"):
        scalars[f"epoch/alpha_{group}_mean"] = alpha.get(group, {}).get("mean")
    audit = line.get("audit") or {}
    scalars.update({"epoch/relabel_precision": audit.get("precision"), "epoch/relabel_recall": audit.get("recall")})
    return {k: float(v) for k, v in scalars.items() if v is not None}


class Sink(Protocol):
    """Where scalars go: per-step ones at the global step, per-epoch ones at the epoch."""

    def log_step(self, scalars: Mapping[str, float], step: int) -> None: ...

    def log_epoch(self, scalars: Mapping[str, float], epoch: int) -> None: ...

    def flush(self) -> None: ...

    def close(self, finished: bool) -> None: ...


class TensorBoardSink:
    """Event files under `run/tensorboard/{steps,epochs}`, straight into a local run directory, or
    into a local temporary directory copied to an object-store run at every flush (S3 and GCS
    objects cannot be appended to, and TensorBoard's own remote writers cover only some stores)."""

    def __init__(self, run_dir: str, first_step: int, first_epoch: int) -> None:
        fs, path = open_fs(join(run_dir, TENSORBOARD_DIR))
        self.remote = None if is_local(fs) else (fs, path)
        self.local = tempfile.mkdtemp(prefix="scn-tensorboard-") if self.remote else path
        # purge_step: TensorBoard drops what an earlier attempt logged at these steps or later,
        # so epochs replayed after a failure show once. flush_secs: the files follow the run within 30 s.
        self.steps = SummaryWriter(os.path.join(self.local, STEPS_DIR), purge_step=first_step, flush_secs=30)
        self.epochs = SummaryWriter(os.path.join(self.local, EPOCHS_DIR), purge_step=first_epoch, flush_secs=30)

    def log_step(self, scalars: Mapping[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.steps.add_scalar(tag, value, step)

    def log_epoch(self, scalars: Mapping[str, float], epoch: int) -> None:
        for tag, value in scalars.items():
            self.epochs.add_scalar(tag, value, epoch)

    def flush(self) -> None:
        self.steps.flush()
        self.epochs.flush()
        if self.remote:
            fs, path = self.remote
            for sub in (STEPS_DIR, EPOCHS_DIR):  # this attempt's own files, whole: earlier attempts' stay
                for name in os.listdir(os.path.join(self.local, sub)):
                    fs.put_file(os.path.join(self.local, sub, name), join(path, f"{sub}/{name}"))

    def close(self, finished: bool) -> None:
        self.steps.close()
        self.epochs.close()
        self.flush()
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


def _import_mlflow():
    """The MLflow client, or a ConfigError with the install command."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as e:
        raise ConfigError(f"{MLFLOW_HINT} ({e})") from e
    return MlflowClient


def mlflow_uri(cfg: TrainConfig, run_dir: str) -> str:
    """`cfg.mlflow_uri`, or an SQLite store in a local run directory (MLflow 3 refuses its plain file store)."""
    return cfg.mlflow_uri or f"sqlite:///{os.path.abspath(join(run_dir, MLFLOW_DB))}"


def _flat(config: Mapping, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: dotted keys, values as text within MLflow's length limit."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = str(value)[:6000]
    return flat


class MLflowSink:
    """One MLflow run per training run: created with the config as its params, found again by its
    run-directory tag when the run resumes. A replayed epoch's steps are logged again (MLflow keeps both)."""

    def __init__(self, cfg: TrainConfig, run_dir: str) -> None:
        from mlflow.entities import Metric, Param

        self.metric = Metric
        self.client = _import_mlflow()(tracking_uri=mlflow_uri(cfg, run_dir))
        experiment = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(MLFLOW_EXPERIMENT)
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{run_dir}'", max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=cfg.run_name, tags={RUN_DIR_TAG: run_dir}).info.run_id
            params = _flat(config_to_dict(cfg))
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])

    def _log(self, scalars: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.metric(k, v, now, step) for k, v in scalars.items()])

    def log_step(self, scalars: Mapping[str, float], step: int) -> None:
        self._log(scalars, step)

    def log_epoch(self, scalars: Mapping[str, float], epoch: int) -> None:
        self._log(scalars, epoch)

    def flush(self) -> None:
        """Nothing to do: every batch is written to the store when logged."""

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "FAILED")


class RunTracker:
    """Rank 0's tracking of one run: keeps the global step across epochs and attempts."""

    def __init__(self, sink: Sink, done: int) -> None:
        self.sink = sink
        self.done = done  # global steps finished before the current epoch

    def log_interval(self, step: int, scalars: Mapping[str, float]) -> None:
        """Per-step scalars after `step` (1-based) steps of the current epoch."""
        self.sink.log_step(scalars, self.done + step)

    def end_epoch(self, line: Mapping) -> None:
        """The epoch's metrics line as per-epoch scalars; then everything logged is made durable."""
        self.sink.log_epoch(epoch_scalars(line), line["epoch"])
        self.done += line["steps_per_rank"]
        self.sink.flush()

    def close(self, finished: bool = True) -> None:
        """Flush and close; `finished` False for an attempt that failed (MLflow marks its run FAILED until a resume)."""
        self.sink.close(finished)


def check(cfg: TrainConfig) -> None:
    """On the driver, before any worker starts: the chosen tracker's package is installed."""
    if cfg.tracking == "mlflow":
        _import_mlflow()


def open_tracker(
    cfg: TrainConfig, run_dir: str, earlier: list[Mapping], first_epoch: int, start_step: int = 0
) -> RunTracker | None:
    """Rank 0's tracker for `cfg.tracking` (None for "none"); `earlier` are the metrics lines of the
    epochs before `first_epoch`, whose steps the global step continues from, and `start_step` the
    steps of `first_epoch` already trained (a mid-epoch resume): what was logged after them is purged."""
    if cfg.tracking == "none":
        return None
    done = sum(line["steps_per_rank"] for line in earlier)
    if cfg.tracking == "mlflow":
        return RunTracker(MLflowSink(cfg, run_dir), done)
    return RunTracker(TensorBoardSink(run_dir, done + start_step + 1, first_epoch), done)


def read_scalars(run_dir: str) -> dict[str, tuple[list[int], list[float]]]:
    """Every scalar of a run's TensorBoard event files, by tag: (steps, values), read with
    TensorBoard's own reader (which applies the purge of replayed steps); {} when there are none."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    fs, path = open_fs(join(run_dir, TENSORBOARD_DIR))
    if not fs.isdir(path):
        return {}
    scalars: dict[str, tuple[list[int], list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="scn-tensorboard-") as tmp:
        local = path
        if not is_local(fs):
            for remote in fs.find(path):
                target = os.path.join(tmp, remote[len(path) + 1:])
                os.makedirs(os.path.dirname(target), exist_ok=True)
                fs.get_file(remote, target)
            local = tmp
        for sub in (STEPS_DIR, EPOCHS_DIR):
            if not os.path.isdir(os.path.join(local, sub)):
                continue
            events = EventAccumulator(os.path.join(local, sub), size_guidance={SCALARS: 0})  # 0: keep every point
            events.Reload()
            for tag in events.Tags()["scalars"]:
                points = events.Scalars(tag)
                scalars[tag] = ([p.step for p in points], [p.value for p in points])
    return scalars
