"""Everything a run leaves under `out_dir/run_name/`: checkpoints and the metrics file.

One checkpoint directory per epoch (`checkpoint_epoch_NNNN`), and with `checkpoint_every_steps`
one every so many steps within an epoch (`checkpoint_epoch_NNNN_step_SSSSSS`: epoch NNNN
after SSSSSS of its steps), holds every piece of state, so model and relabel table can never
come from different points of training:

    deepspeed/<tag>/...        DeepSpeed's files: rank 0's model states, every rank's
                               ZeRO optimizer partition (each rank writes its own)
    relabel_table.parquet      the relabel table after the epoch's merge
    config.yaml                the resolved TrainConfig
    classes.json               the class names, in output order
    model.pt                   plain fp32 weights and buffers (scn_scale.weights; the engine is
                               fp32 under precision=bf16 too), loads with weights_only=True;
                               epoch checkpoints only (a validated model, buffers averaged)
    partial/rank_RRRR.pt       mid-epoch checkpoints only, one per rank, written by that rank:
                               what the rank has of the epoch so far (scn_scale.loop.EpochState)
    state.json                 epoch, step, tag, table digest, world size; rank 0's last file
    complete.json              every file of every rank with its size: written into the
                               run's copy once all ranks' files are there (`mark_complete`)

There is no separate scheduler or data-order state to save: the learning rate is a function
of the epoch (exponential decay), the data order is planned from (seed, epoch), augmentation
is seeded per batch (shards.reader), and the trainer reseeds torch from (seed, epoch, rank) at
the start of every epoch. So (epoch, step) is the whole data position: an epoch checkpoint
resumes at the next epoch's start, a mid-epoch one by passing over the epoch's first `step`
batches (read and decoded, not trained) and restoring each rank's epoch state.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch
import yaml

from scn_scale.config import TrainConfig, config_to_dict, save_config
from scn_scale.relabel_table import RelabelTable, SampleIndex
from scn_scale.weights import load_error, save_model_file
from shards.atomic import remove_temp_files as remove_local_temp_files
from shards.atomic import write_json, write_text
from shards.fs import is_local, join, open_fs
from shards.fs import remove as fs_remove

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

DEEPSPEED_DIR = "deepspeed"
TABLE_FILE = "relabel_table.parquet"
CONFIG_FILE = "config.yaml"
CLASSES_FILE = "classes.json"
MODEL_FILE = "model.pt"
PARTIAL_DIR = "partial"
STATE_FILE = "state.json"
COMPLETE_FILE = "complete.json"
#: state.json's `layout` from which a checkpoint has a COMPLETE_FILE; one without `layout` predates it.
MARKED_LAYOUT = 2
METRICS_FILE = "metrics.jsonl"


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete or does not fit the run that tries to resume from it."""


def checkpoint_dir_name(epoch: int, step: int | None = None) -> str:
    """`checkpoint_epoch_NNNN` after epoch NNNN; `checkpoint_epoch_NNNN_step_SSSSSS` after SSSSSS of its steps."""
    return f"checkpoint_epoch_{epoch:04d}" + ("" if step is None else f"_step_{step:06d}")


def deepspeed_tag(epoch: int, step: int | None = None) -> str:
    return f"epoch_{epoch:04d}" + ("" if step is None else f"_step_{step:06d}")


_NAME = re.compile(r"checkpoint_epoch_(\d+)(?:_step_(\d+))?$")


def position(name: str) -> tuple[int, float] | None:
    """Where in training a checkpoint directory's name puts it, as a sort key: (epoch, step), an
    epoch's own checkpoint after all its steps; None for a name that is no checkpoint's."""
    m = _NAME.search(name.rstrip("/"))
    if m is None:
        return None
    return int(m.group(1)), math.inf if m.group(2) is None else int(m.group(2))


def partial_file(rank: int) -> str:
    return f"{PARTIAL_DIR}/rank_{rank:04d}.pt"


def run_dir(out_dir: str, run_name: str) -> str:
    """Where Ray Train keeps the run (storage_path/name); a local path or a URL."""
    return join(out_dir.rstrip("/"), run_name)


#: Settings a run cannot change when it resumes (`check_resume` refuses, naming them), besides the
#: ZeRO stage of its DeepSpeed config: what fixes its data order (the reader plans each epoch from seed,
#: shard set, ranks, loader workers, batch size, input size and its mixing settings), its labels, its
#: method and its recipe (`eac.lam` weighs EAC's loss; `scn.warmup_epochs` places the importance branch's optimizer reset,
#: `scn.relabel_epoch` and the margins decide what the relabel table holds: a run changed halfway is a run
#: of neither recipe), the shape of its model and optimizer state (a checkpoint of another backbone or
#: optimizer does not load, or loads into the wrong state: Adam's moments are no SGD momentum), and the
#: set its best checkpoints are chosen on.
RESUME_FIXED = (
    "method", "seed", "train_shards", "label_overrides", "batch_size", "grad_accum", "num_workers",
    "loader_workers", "balanced_sampler", "reader", "image_size", "val_shards", "scn", "eac", "model", "optimizer",
)

#: Settings a resumed run may change, each sound to change between two starts: how long and how it runs
#: (epochs, checkpointing, logging, resources, where Ray is), the schedule's numbers (the learning rate,
#: decay, weight decay and momentum are applied from the settings at every epoch's start, from the first
#: epoch the new start trains, mid-epoch included), `precision` (bf16 is autocast around the same fp32
#: engine, so a checkpoint holds fp32 state either way: scn_scale.loop.autocast), the memory format, and
#: the init weights (a resume starts from its checkpoint, never from `init`). The DeepSpeed file may change
#: except its ZeRO stage (checked apart: the optimizer state is partitioned by it).
RESUME_FREE = (
    "epochs", "keep_checkpoints", "checkpoint_every_steps", "max_failures", "fail_at", "log_every_steps",
    "tracking", "mlflow_uri", "out_dir", "run_name", "address", "cpus_per_worker", "use_gpu", "lr", "lr_decay",
    "weight_decay", "momentum", "precision", "channels_last", "deepspeed", "init", "allow_partial_init",
)


def checkpoints(run: str) -> list[str]:
    """The run's (local path or URL) checkpoint directories, complete or not, in training order."""
    fs, root = open_fs(run)
    named = [(key, path.rstrip("/").rsplit("/", 1)[-1]) for path in fs.glob(join(root, "checkpoint_epoch_*"))
             if (key := position(path)) is not None]
    return [join(run.rstrip("/"), name) for _, name in sorted(named)]


def latest_checkpoint(run: str, mid_epoch: bool = False) -> str | None:
    """The run's (local path or URL) latest complete checkpoint directory (`is_complete`), or None:
    the latest epoch's, or with `mid_epoch` the latest of any (where a resume starts).

    Ray copies a checkpoint into the run file by file, every rank its own: a kill in between leaves
    a directory that may hold a state.json, or a model.pt cut short. Those are passed over.
    """
    for directory in reversed(checkpoints(run)):
        if (mid_epoch or position(directory)[1] == math.inf) and is_complete(directory):
            return directory
    return None


def resume_point(run: str, registered: str | None) -> str | None:
    """The checkpoint a (re)starting attempt of `run` resumes from: its latest complete one, of any kind.

    `registered` is the directory name of the checkpoint Ray Train hands the attempt
    (`ray.train.get_checkpoint`), the last whose reports from every rank its controller took in.
    The controller takes reports in when it polls the workers, so after a kill right after a report
    it may name an older checkpoint than the run holds complete: the run's own is newer. It
    registers a checkpoint once every rank's files are copied, which is before rank 0 marks it
    complete: one it names is marked here if the kill came in between. Directories after the
    chosen one are what kills during copies left: they are removed, so that this attempt's copies
    of them start empty.
    """
    if registered is not None:
        named = join(run.rstrip("/"), registered)
        fs, path = open_fs(named)
        if fs.isdir(path) and not is_complete(named):
            mark_complete(named)
    chosen = latest_checkpoint(run, mid_epoch=True)
    after = position(chosen) if chosen is not None else (0, -1)
    for directory in checkpoints(run):
        if position(directory) > after:
            fs_remove(directory, recursive=True)
    return chosen


def is_complete(directory: str) -> bool:
    """Whether a checkpoint directory (local path or URL) holds every file its ranks wrote, each whole:
    its COMPLETE_FILE lists them with their sizes. A checkpoint from before that file existed counts as
    complete when its state.json (then written last) is there."""
    fs, root = open_fs(directory)
    try:
        marker = json.loads(fs.read_text(join(root, COMPLETE_FILE)))
    except FileNotFoundError:
        try:
            state = json.loads(fs.read_text(join(root, STATE_FILE)))
        except (FileNotFoundError, ValueError):
            return False
        return "layout" not in state
    except ValueError:  # a marker cut short
        return False
    sizes = _file_sizes(fs, root)
    return all(sizes.get(name) == size for name, size in marker["files"].items())


def _file_sizes(fs: Any, root: str) -> dict[str, int]:
    """Every file under `root` by its path relative to it, with its size."""
    return {path[len(root) + 1:]: int(info["size"]) for path, info in fs.find(root, detail=True).items()}


def mark_complete(directory: str) -> None:
    """Write the run's copy of a checkpoint its COMPLETE_FILE, listing every file there; call it once
    every rank's `ray.train.report` of the checkpoint has returned (each rank's files are then copied)."""
    fs, root = open_fs(directory)
    files = {name: size for name, size in _file_sizes(fs, root).items() if name != COMPLETE_FILE}
    write_text(join(directory, COMPLETE_FILE), json.dumps({"files": files}, sort_keys=True))


def check_resume(cfg: TrainConfig, run: str, zero_stage: int) -> None:
    """Refuse to resume `run` under settings it cannot continue with (RESUME_FIXED, and the ZeRO stage
    `zero_stage` of the DeepSpeed config this start resolved); the others may change (RESUME_FREE).

    Ray Train resumes any run whose name it finds in storage, whatever the new settings;
    a resumed run with another seed or batch size would silently train on another data order,
    one with another optimizer or ZeRO stage fail deep inside DeepSpeed.
    """
    last = latest_checkpoint(run, mid_epoch=True)
    if last is None:
        return
    fs, path = open_fs(join(last, CONFIG_FILE))
    saved = _flat(yaml.safe_load(fs.read_text(path)))
    fs, path = open_fs(join(last, STATE_FILE))
    saved["zero_stage"] = json.loads(fs.read_text(path)).get("zero_stage")
    # A setting added since the checkpoint was written counts as its default there.
    defaults, now = _flat(config_to_dict(TrainConfig())), {**_flat(config_to_dict(cfg)), "zero_stage": zero_stage}
    fixed = [k for group in (*RESUME_FIXED, "zero_stage") for k in now if k == group or k.startswith(f"{group}.")]
    changed = [k for k in fixed if saved.get(k, defaults.get(k)) != now[k]]
    if changed:
        was = ", ".join(f"{k}={saved.get(k, defaults.get(k))!r}" for k in changed)
        asked = ", ".join(f"{k}={now[k]!r}" for k in changed)
        raise CheckpointError(
            f"run {run} resumes from {last}, which was trained with {was}; this start asks for {asked}. "
            f"Resume with the run's settings, or start a new run_name (init= its model file to continue from its weights)"
        )


def _flat(settings: dict, prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys: `{"scn": {"delta2": 0.2}}` -> `{"scn.delta2": 0.2}`."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict) and key != "deepspeed":  # an inline DeepSpeed config is one setting
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def save(
    directory: str,
    engine: DeepSpeedEngine,
    *,
    epoch: int,
    table: RelabelTable,
    cfg: TrainConfig,
    classes: Sequence[str],
    rank: int,
    world_size: int,
    step: int | None = None,
    partial: dict | None = None,
) -> None:
    """Write a checkpoint into the local `directory`; every rank must call it. After epoch `epoch`, or
    with `step` after that many of its steps, each rank giving its `partial` epoch state (tensors and
    plain values: it loads with weights_only=True).

    Every rank writes its DeepSpeed files and its partial state (its own directory on its own
    node; Ray merges them at report time); rank 0 writes the rest, state.json last.
    """
    tag = deepspeed_tag(epoch, step)
    digest = table.digest()
    client_state = {"epoch": epoch, "step": step, "table_digest": digest}
    engine.save_checkpoint(os.path.join(directory, DEEPSPEED_DIR), tag=tag, client_state=client_state)
    if step is not None:
        os.makedirs(os.path.join(directory, PARTIAL_DIR), exist_ok=True)
        torch.save(partial, os.path.join(directory, partial_file(rank)))
    if rank != 0:
        return
    table.save(os.path.join(directory, TABLE_FILE))
    save_config(cfg, os.path.join(directory, CONFIG_FILE))
    write_json(os.path.join(directory, CLASSES_FILE), list(classes))
    if step is None:  # mid-epoch, the ranks' BatchNorm statistics differ: no model to evaluate yet
        extra = {"epoch": epoch, "run_name": cfg.run_name, "method": cfg.method, "image_size": cfg.image_size, "table_digest": digest}
        save_model_file(os.path.join(directory, MODEL_FILE), engine.module, classes, extra=extra)
    state = {
        "layout": MARKED_LAYOUT,
        "epoch": epoch,
        "step": step,
        "tag": tag,
        "table_digest": digest,
        "table_size": len(table),
        "world_size": world_size,
        "zero_stage": engine.zero_optimization_stage(),
        "optimizer_groups": len(engine.optimizer.param_groups),
        "seed": cfg.seed,
        "data_order": "shards dealt by (seed, epoch), augmentation seeded per batch; torch reseeded from (seed, epoch, rank) each epoch",
    }
    write_json(os.path.join(directory, STATE_FILE), state)


def load_weights_only(path: str, map_location: Any = None) -> Any:
    """A checkpoint's torch file with weights_only=True: DeepSpeed's checkpoint-engine `load`, and a rank's epoch state.

    DeepSpeed loads its own files with weights_only=False, which runs whatever a file
    pickled; its files hold tensors, plain types and the DeepSpeed state classes allowed here.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    try:
        with torch.serialization.safe_globals([ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except OSError:  # missing or unreadable: its own error names the file
        raise
    except Exception as e:  # torch raises many types for bytes that are no torch file (IndexError among them)
        raise CheckpointError(load_error(path, e)) from e


@dataclass
class Restored:
    epoch: int  # the last finished epoch, or with `step` the epoch in progress
    step: int | None  # steps of `epoch` done (a mid-epoch checkpoint), None after a whole epoch
    table: RelabelTable
    classes: list[str]
    partial: dict | None  # this rank's epoch state at a mid-epoch checkpoint

    @property
    def next_position(self) -> tuple[int, int]:
        """(epoch, steps of it already trained) where training continues."""
        return (self.epoch + 1, 0) if self.step is None else (self.epoch, self.step)


def read_state(directory: str) -> dict:
    path = os.path.join(directory, STATE_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"{directory}: no {STATE_FILE}, the checkpoint is incomplete")
    with open(path) as f:
        return json.load(f)


def load(directory: str, engine: DeepSpeedEngine, world_size: int, rank: int = 0, index: SampleIndex | None = None) -> Restored:
    """Restore model, optimizer and relabel table from the local checkpoint `directory` into `engine`,
    and from a mid-epoch one rank `rank`'s epoch state.

    The table is keyed by `index` (the training set's sample index) when given; a key it
    does not hold is an error (UnknownKeyError).

    DeepSpeed reads its files through the engine's checkpoint engine, which is made to load
    with weights_only=True here: a checkpoint cannot run code when it is resumed.

    DeepSpeed's `load_checkpoint` returns (None, None) without raising when the `latest`
    file is missing and fails an assertion on a missing tag, so the tag is explicit and
    checked first; the table must match the digest recorded beside the model.
    """
    state = read_state(directory)
    step = state.get("step")
    if step is not None and state["world_size"] != world_size:
        raise CheckpointError(
            f"{directory} was written mid-epoch by {state['world_size']} ranks, each at its own place in its share of "
            f"the epoch; resume it with num_workers={state['world_size']}"
        )
    if state["zero_stage"] > 0 and state["world_size"] != world_size:
        raise CheckpointError(
            f"{directory} was written by {state['world_size']} ranks with ZeRO stage {state['zero_stage']}, "
            f"which partitions optimizer state by rank; resume it with num_workers={state['world_size']}"
        )
    # Checkpoints from before the importance branch had a parameter group of its own record none: one group.
    saved_groups, groups = state.get("optimizer_groups", 1), len(engine.optimizer.param_groups)
    if saved_groups != groups:
        raise CheckpointError(
            f"{directory}: its optimizer state has {saved_groups} parameter group(s), this trainer's optimizer "
            f"{groups}, so it cannot resume; start a new run from its weights with init={os.path.join(directory, MODEL_FILE)}"
        )
    deepspeed_dir = os.path.join(directory, DEEPSPEED_DIR)
    missing = CheckpointError(f"{directory}: no DeepSpeed checkpoint with tag {state['tag']!r}")
    if not os.path.isdir(os.path.join(deepspeed_dir, state["tag"])):
        raise missing  # DeepSpeed itself fails an assertion on a missing tag
    engine.checkpoint_engine.load = load_weights_only  # every file DeepSpeed reads below
    path, client_state = engine.load_checkpoint(deepspeed_dir, tag=state["tag"])
    if path is None:
        raise missing
    if (client_state.get("epoch"), client_state.get("step")) != (state["epoch"], step):
        raise CheckpointError(f"{directory}: DeepSpeed state is from epoch {client_state.get('epoch')} step "
                              f"{client_state.get('step')}, state.json says epoch {state['epoch']} step {step}")
    table = RelabelTable.load(os.path.join(directory, TABLE_FILE), index)
    if table.digest() != state["table_digest"]:
        raise CheckpointError(f"{directory}: the relabel table's digest does not match the one recorded with the model")
    with open(os.path.join(directory, CLASSES_FILE)) as f:
        classes = json.load(f)
    partial = None if step is None else load_weights_only(os.path.join(directory, partial_file(rank)))
    return Restored(epoch=int(state["epoch"]), step=step, table=table, classes=classes, partial=partial)


def remove_temp_files(run: str) -> list[str]:
    """Delete what interrupted atomic writes left anywhere in the run directory `run`; returns their paths.

    A worker or driver killed mid-write (metrics.jsonl, alpha parts, a checkpoint's files)
    leaves a `.<name>.<random>.tmp` beside the file it was replacing; nothing reads them, a
    resume rewrites what they were. Object stores publish whole objects, so a run there has none.
    """
    fs, root = open_fs(run)
    if not is_local(fs) or not os.path.isdir(root):
        return []
    return [str(path) for directory, _, _ in os.walk(root) for path in remove_local_temp_files(directory)]


class MetricsFile:
    """`out_dir/run_name/metrics.jsonl`: one JSON line per epoch, rewritten whole on every append.

    A resumed attempt starts from the lines of the epochs its checkpoint covers, so an
    epoch replayed after a failure appears once, with the numbers of the attempt that
    finished it.
    """

    def __init__(self, run: str, first_epoch: int) -> None:
        self.url = join(run, METRICS_FILE)
        self.lines = [line for line in read_metrics(run) if line["epoch"] < first_epoch]

    def append(self, line: dict) -> None:
        self.lines.append(line)
        write_text(self.url, "".join(json.dumps(x, sort_keys=True) + "\n" for x in self.lines))


def read_metrics(run: str) -> list[dict]:
    fs, root = open_fs(run)
    path = join(root, METRICS_FILE)
    if not fs.exists(path):
        return []
    with fs.open(path, "r") as f:
        return [json.loads(line) for line in f if line.strip()]
