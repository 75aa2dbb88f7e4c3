"""`python -m scn_scale.train --config FILE [--ray-address ADDR] [--set KEY=VALUE ...]`: SCN on shard sets, Ray Train + DeepSpeed.

`train(cfg)` checks the whole configuration first (shard sets and their sizes
against ranks x loader workers, the DeepSpeed config against the trainer's settings,
label overrides, init weights), because an error found by a worker costs a cluster
start and arrives buried in worker logs. Then it attaches to the Ray cluster named by
`cfg.address` or RAY_ADDRESS (as under `ray job submit`), or starts a local one, and
runs a TorchTrainer whose workers each drive a DeepSpeed engine (scn_scale.loop).

A run lives in `out_dir/run_name/` (Ray's storage_path/name). Starting the same run again
resumes it from its last checkpoint, as does Ray after a worker failure (max_failures).
While it runs, the driver holds the run directory's lock (`shards.lock`): a second start of
the same run is refused, naming the first one's pid and host.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Sequence

import pyarrow as pa
import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from scn_scale import checkpoint, tracking
from scn_scale.config import ConfigError, TrainConfig, load_config
from scn_scale.config_reference import setting_names
from scn_scale.faults import FaultPlan
from scn_scale.loop import WorkerSpec, deepspeed_config, train_worker
from scn_scale.model import build_model
from scn_scale.noise import load_overrides
from scn_scale.weights import load_weights
from shards import ShardSet, ShardSetError, open_shard_set, plan_epoch
from shards.cli import ArgumentParser, add_log_level, add_set, bad_input, configure_logging
from shards.lock import OutputLock, OutputLocked

log = logging.getLogger(__name__)

LOCAL_NODE_IP = "127.0.0.2"


@dataclass
class TrainResult:
    run_dir: str  # out_dir/run_name
    checkpoint: str | None  # the last epoch's checkpoint directory
    metrics: list[dict]  # metrics.jsonl, one dict per epoch

    @property
    def model_file(self) -> str | None:
        return None if self.checkpoint is None else f"{self.checkpoint}/{checkpoint.MODEL_FILE}"


def _open_set(setting: str, url: str) -> ShardSet:
    if not url:
        raise ConfigError(f"{setting} is not set: give the shard set directory or URL, e.g. {setting}=/data/shards/train")
    try:
        return open_shard_set(url)
    except ShardSetError as e:
        raise ConfigError(f"{setting}: {e}") from e
    except ValueError as e:  # a set file that is not JSON
        raise ConfigError(f"{setting}: shard set {url}: {e}") from e


def _check_plan(setting: str, shard_set: ShardSet, cfg: TrainConfig) -> int:
    """Batches per rank in an epoch; ConfigError when the set has fewer samples than readers."""
    try:
        plan = plan_epoch(shard_set, cfg.num_workers, cfg.loader_workers, cfg.batch_size, cfg.seed, 1, cfg.reader.interleave)
    except ShardSetError as e:
        raise ConfigError(f"{setting}: {e}") from e
    return plan.batches_per_rank


def _check_overrides(cfg: TrainConfig, num_classes: int) -> None:
    try:
        overrides = load_overrides(cfg.label_overrides)
    except (OSError, pa.ArrowException) as e:
        raise ConfigError(f"label_overrides: cannot read {cfg.label_overrides!r} as a label override table: {e}") from e
    bad = [k for k, label in overrides.items() if not 0 <= label < num_classes]
    if bad:
        raise ConfigError(f"label_overrides: {len(bad)} labels outside [0, {num_classes}), e.g. {bad[:3]}")


def _check_init(cfg: TrainConfig, classes: Sequence[str]) -> None:
    """Load the init weights once on the driver, so a wrong file fails here with its load report."""
    try:
        load_weights(build_model(cfg.model, len(classes)), cfg.init, classes, cfg.allow_partial_init)
    except (OSError, ValueError) as e:
        raise ConfigError(f"init: {e}") from e


def prepare(cfg: TrainConfig) -> tuple[dict, tuple[str, ...]]:
    """Check everything that can be checked without workers; return (resolved DeepSpeed config, class names)."""
    cfg.validate()
    if not cfg.run_name or "/" in cfg.run_name:
        raise ConfigError(f"run_name must be a non-empty name without '/', got {cfg.run_name!r}")
    if "://" not in cfg.out_dir and os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise ConfigError(f"out_dir {cfg.out_dir} exists and is not a directory")
    FaultPlan.parse(cfg.fail_at, cfg.num_workers)
    tracking.check(cfg)
    if not ray.is_initialized():
        _check_address(cfg.address or os.environ.get("RAY_ADDRESS", ""))
    train_set = _open_set("train_shards", cfg.train_shards)
    val_set = _open_set("val_shards", cfg.val_shards)
    if train_set.classes != val_set.classes:
        raise ConfigError(f"train_shards has classes {list(train_set.classes)} but val_shards has {list(val_set.classes)}")
    batches = _check_plan("train_shards", train_set, cfg)
    if batches < cfg.grad_accum:
        raise ConfigError(f"grad_accum={cfg.grad_accum} exceeds the {batches} batches each rank gets per epoch")
    _check_plan("val_shards", val_set, cfg)
    ds = deepspeed_config(cfg)
    if cfg.label_overrides:
        _check_overrides(cfg, len(train_set.classes))
    if cfg.init:
        _check_init(cfg, train_set.classes)
    try:
        checkpoint.check_resume(cfg, checkpoint.run_dir(cfg.out_dir, cfg.run_name), ds.get("zero_optimization", {}).get("stage", 0))
    except checkpoint.CheckpointError as e:
        raise ConfigError(str(e)) from e
    return ds, train_set.classes


def checkpoint_config(cfg: TrainConfig) -> CheckpointConfig:
    """Ray Train keeps the latest checkpoint and the `keep_checkpoints` best by val_accuracy (0: every one),
    through the reported `checkpoint_score`: an epoch's val_accuracy, below any for a mid-epoch checkpoint.

    Ray records the run's checkpoints and refuses to resume a run whose record names a
    deleted one, so retention is left to it rather than done beside it. What it can express
    is "the k best, and always the latest" (ranked by rank 0's reported metrics), not "the last k".
    """
    return CheckpointConfig(num_to_keep=cfg.keep_checkpoints or None, checkpoint_score_attribute="checkpoint_score",
                            checkpoint_score_order="max")


def _check_address(address: str) -> None:
    """A cluster address HOST:PORT must answer now: ray.init would retry an unreachable one for minutes."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "", "auto", "local", "ray://...": Ray resolves those itself
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ConfigError(f"address {address}: no Ray cluster answers there ({e})") from e


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together, so they differ)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _connect(address: str) -> bool:
    """Attach to `address` or RAY_ADDRESS, or start a local cluster on loopback; False if Ray was already initialized."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address)
    else:
        # "local" rather than None: None would attach to any cluster found on this machine.
        # Ray swaps 127.0.0.1 for the machine's network address; another loopback address it
        # keeps, so a local cluster never talks over the network. The dashboard (on loopback) serves
        # Ray's state API: without it, Ray Train's PlacementGroupCleaner fails to query the
        # controller every second and logs "Failed to query Ray Train Controller actor state"
        # each time (ray/train/v2/_internal/execution/controller/placement_group_cleaner.py).
        # Ray Train's cleaner finds the state API by the local Ray instances when told nothing, and
        # with another instance on the machine fails with "Found multiple active Ray instances" (a
        # traceback, and a cleaner gone); told the API server's address, it asks this cluster's.
        (port,) = free_ports(1)
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                 _node_ip_address=LOCAL_NODE_IP,
                 runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})
    return True


def train(cfg: TrainConfig, *, progress: bool = False, log_level: int | None = None) -> TrainResult:
    """Train (or resume) the run `cfg.out_dir/cfg.run_name`; return where it lives and its metrics.

    `progress` and `log_level` are the CLI's choices of what rank 0 prints: progress as a bar
    when this process's stderr is a terminal, else as a log line per `log_every_steps` (scn_scale.progress).
    """
    cfg = cfg.with_absolute_paths()  # the workers run elsewhere; Ray's storage_path must be absolute too
    ds_config, classes = prepare(cfg)
    storage = cfg.out_dir
    run = checkpoint.run_dir(storage, cfg.run_name)
    spec = WorkerSpec(cfg=cfg, deepspeed=ds_config, classes=classes, storage=storage, progress=progress,
                      terminal=sys.stderr.isatty(), log_level=log_level)
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    # Only RAY_TRAIN_* variables reach workers by themselves; DeepSpeed reads DS_ACCELERATOR at import.
    worker_env = None if cfg.use_gpu else {"env_vars": {"DS_ACCELERATOR": "cpu"}}
    # One start of a run at a time; the lock is taken after every check, so a refused start writes nothing.
    with OutputLock(run):
        for path in checkpoint.remove_temp_files(run):
            log.info("removed %s, left by an interrupted write", path)
        started = _connect(cfg.address)
        try:
            trainer = TorchTrainer(
                train_worker,
                train_loop_config={"spec": spec},
                scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
                run_config=RunConfig(
                    name=cfg.run_name,
                    storage_path=storage,
                    failure_config=FailureConfig(max_failures=cfg.max_failures),
                    checkpoint_config=checkpoint_config(cfg),
                    worker_runtime_env=worker_env,
                ),
            )
            result = trainer.fit()
        finally:
            if started:
                ray.shutdown()
    return TrainResult(
        run_dir=run,
        checkpoint=None if result.checkpoint is None else result.checkpoint.path,
        metrics=checkpoint.read_metrics(run),
    )


def summary(result: TrainResult) -> str:
    """What the CLI prints at the end: last and best epoch (selected on the validation set) and where the files are."""
    lines = [f"run: {result.run_dir}"]
    if result.metrics:
        last = result.metrics[-1]
        best = max(result.metrics, key=lambda m: m["val_accuracy"])
        lines += [
            f"last epoch {last['epoch']}: val accuracy {last['val_accuracy']:.4f}, val mean class accuracy "
            f"{last['val_mean_class_accuracy']:.4f}, train accuracy {last['train_accuracy']:.4f}, "
            f"relabeled {last['relabels_total']} samples (table {last['table_digest'][:12]}), {last['images_per_s']:.1f} images/s",
            f"best val accuracy {best['val_accuracy']:.4f} at epoch {best['epoch']} (selected on the validation set)",
        ]
        if "audit" in last:
            audit = last["audit"]
            lines.append(f"relabel audit: precision {audit['precision']}, recall {audit['recall']} ({audit['restored']} of {audit['noisy']} noisy labels restored)")
    lines += [f"checkpoint: {result.checkpoint}", f"model file: {result.model_file}"]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The command line; parse it with `parse_intermixed_args`, so KEY=VALUE settings may stand between flags."""
    p = ArgumentParser(
        prog="python -m scn_scale.train",
        description=__doc__.splitlines()[0],
        epilog="settings (type, default and meaning of each: docs/config.md): " + ", ".join(setting_names()),
    )
    p.add_argument("--config", required=True, help="YAML training config, e.g. cluster/configs/cpu-small.yaml")
    p.add_argument("--ray-address", "--address", dest="address", default="", metavar="ADDR",
                   help="Ray cluster address (default: RAY_ADDRESS, else a new local cluster)")
    add_set(p, "epochs=5 scn.relabel_epoch=3 over the file's (keys below)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="settings as --set takes them, without the flag; applied before the --set ones")
    add_log_level(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    configure_logging(args.log_level, "%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(TrainConfig, args.config, [*args.overrides, *args.set])
        if args.address:
            cfg = dataclasses.replace(cfg, address=args.address)
        result = train(cfg, progress=True, log_level=logging.getLevelName(args.log_level))
    except (ConfigError, OutputLocked) as e:  # OutputLocked: this run is being trained elsewhere
        return bad_input(e)
    print(summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
