"""The per-worker training function that Ray Train runs on every rank: one DeepSpeed engine around SCN.

Each epoch, on every rank:
1. reseed torch from (seed, epoch, rank) and read this rank's share of the training shards,
   planned from (seed, epoch), so a resumed epoch replays the same data and augmentation;
2. for every batch: labels from the relabel table (looked up here by key, never in loader
   workers, which hold stale copies), forward, SCN loss (rank regularization over the local
   or the gathered global batch), DeepSpeed backward and step, then relabel proposals from
   that step's forward pass; sums, alpha and proposals stay on the device until the epoch end;
3. gather every rank's proposals (rows of the sample index), merge them into one table, check
   its digest on every rank, and add up the ranks' alpha histograms; each rank writes its
   per-sample alpha to its own parquet part in the run directory;
4. average the ranks' BatchNorm statistics (DeepSpeed keeps only parameters equal), so that every
   rank validates, and rank 0 saves, the same model; validate on this rank's share of the
   validation shards and gather predictions by key, each sample counted once;
5. rank 0 appends the epoch's metrics to the run's metrics file and its tracker (TensorBoard,
   MLflow: scn_scale.tracking, which also gets the per-step scalars of every sums read); every
   rank writes its part of the checkpoint and reports it (the same number of `ray.train.report`
   calls everywhere).

With `checkpoint_every_steps`, step 2 also writes a checkpoint every so many steps: the
model and optimizer, the table, and each rank's `EpochState` with its random state and
BatchNorm statistics. A resume from it passes over the epoch's trained batches and goes on
exactly as the uninterrupted epoch (tests/test_train.py compares the two).

A relabel proposed in epoch e is merged at the end of epoch e and trained on from e + 1; with
`scn.relabel_confirm` = k it is merged at the end of the k-th consecutive epoch proposing it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from itertools import islice
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq
import ray.train
import ray.train.torch
import torch

from scn_scale import checkpoint, metrics, progress, sync, tracking
from scn_scale.config import ConfigError, TrainConfig
from scn_scale.data import shard_loader
from scn_scale.faults import FaultPlan
from scn_scale.loss import LossParts, baseline_loss, eac_loss, scn_loss
from scn_scale.model import SCNModel, SCNOutput, build_model
from scn_scale.noise import load_overrides
from scn_scale.predictions import Predictions, collect, summarize, write_epoch_predictions
from scn_scale.relabel import BatchProposals, propose_relabels
from scn_scale.relabel_table import ManifestIndex, RelabelTable
from scn_scale.weights import load_weights
from shards import ShardSet, open_shard_set, read_manifest
from shards.fs import join, remove
from shards.reader import derive_seed

log = logging.getLogger(__name__)


def _duplicated_settings(cfg: TrainConfig) -> dict[str, int]:
    """DeepSpeed settings that restate trainer settings: filled from the TrainConfig; an explicit
    different value is an error ("auto" is accepted, as in other DeepSpeed integrations)."""
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * cfg.num_workers,
    }


def deepspeed_config(cfg: TrainConfig) -> dict:
    """The DeepSpeed config the engines get: `cfg.deepspeed` (a JSON file or a dict) checked against the TrainConfig.

    The trainer owns batch size, accumulation, optimizer and schedule, so DeepSpeed's
    copies are filled in here and contradictions are ConfigErrors, raised before Ray starts.
    """
    if isinstance(cfg.deepspeed, dict):
        ds = json.loads(json.dumps(cfg.deepspeed))  # a deep copy that is also JSON-clean
    elif cfg.deepspeed:
        try:
            with open(cfg.deepspeed) as f:
                ds = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"deepspeed: cannot read {cfg.deepspeed!r} as a JSON DeepSpeed config: {e}") from e
    else:
        ds = {}
    if not isinstance(ds, dict):
        raise ConfigError(f"deepspeed: the config must be a JSON object, got {type(ds).__name__}")
    for key, value in _duplicated_settings(cfg).items():
        given = ds.get(key, "auto")
        if given != "auto" and given != value:
            raise ConfigError(
                f"deepspeed config sets {key}={given!r}, but batch_size={cfg.batch_size}, grad_accum={cfg.grad_accum} "
                f"and num_workers={cfg.num_workers} give {value}: remove it from the DeepSpeed config or set it to \"auto\""
            )
        ds[key] = value
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(
                f"deepspeed config has a {section!r} section, but the trainer builds a torch optimizer from "
                "optimizer/lr/weight_decay and decays lr per epoch (lr_decay): remove the section"
            )
    if ds.get("fp16", {}).get("enabled", False):
        raise ConfigError("deepspeed config enables fp16, which this trainer does not support: use bf16 (precision=bf16)")
    if ds.get("bf16", {}).get("enabled", False) and cfg.precision != "bf16":
        raise ConfigError("deepspeed config enables bf16 but precision is fp32: set precision=bf16 or disable bf16 there")
    if ds.get("data_types", {}).get("buffer_dtype") not in (None, "fp32"):
        raise ConfigError(
            f"deepspeed config sets data_types.buffer_dtype={ds['data_types']['buffer_dtype']!r}: BatchNorm's running "
            "statistics must stay fp32 (momentum updates below bf16's resolution round away); remove it"
        )
    # precision=bf16 is an fp32 engine with a bf16 autocast forward (`autocast`): DeepSpeed's bf16 engine
    # casts the parameters and not the buffers, and BatchNorm then fails ("expected scalar type BFloat16
    # but found Float") unless its buffers are bf16 too. So the bf16 section, which marks a config meant
    # for precision=bf16, does not reach DeepSpeed; gradients are reduced in fp32 unless the config's
    # communication_data_type asks for another type.
    ds.pop("bf16", None)
    zero = ds.get("zero_optimization", {})
    if zero.get("stage", 0) not in (0, 1, 2):
        raise ConfigError(
            f"deepspeed: ZeRO stage {zero.get('stage')} is not supported; stages 0-2 keep whole parameters on "
            "every rank, which the plain model file and validation rely on"
        )
    if zero.get("offload_optimizer") or zero.get("offload_param"):
        raise ConfigError("deepspeed: ZeRO offload needs DeepSpeed's compiled CPU Adam; the trainer uses a torch optimizer")
    # DeepSpeed clips gradients at norm 1.0 unless told otherwise (GRADIENT_CLIPPING_DEFAULT in 0.19); the
    # released code does not clip, and a config without the key (none at all, or an inline one such as
    # rafdb-finetune.yaml's) clipped silently. A config may still set it.
    ds.setdefault("gradient_clipping", 0.0)
    if cfg.optimizer == "sgd" and zero.get("stage", 0) > 0:
        # DeepSpeed's ZeRO asserts on optimizers outside its tested list (torch's Adam and AdamW are on
        # it, SGD is not). ZeRO 1-2 hand each rank a slice of the flat parameters, gradients and optimizer
        # state; torch's SGD updates every element from its own gradient and momentum buffer alone, so a
        # slice steps exactly as the whole would (tests/test_optimizer.py compares it with plain PyTorch).
        ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 2**31 - 1)  # the trainer reports per epoch; DeepSpeed's default logs every 10 steps
    return ds


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """The recipe's exponential decay per epoch (1-based): a function of the epoch, so it needs no saved state."""
    return cfg.lr * cfg.lr_decay ** (epoch - 1)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Torch seed for one rank's epoch (dropout, loader worker seeds; augmentation is seeded per batch by the reader)."""
    return derive_seed(seed, epoch, rank)


#: The parts of a metrics line that go to `ray.train.report` (and so to Ray's result and
#: dashboards); the whole line, with the validation confusion matrix and timings, is in metrics.jsonl.
REPORTED = (
    "epoch", "lr", "loss", "wce", "rr", "train_accuracy", "val_accuracy", "val_mean_class_accuracy", "alpha",
    "relabels", "relabels_total", "table_digest", "audit", "skipped", "val_skipped", "images_per_s",
    "images_per_s_per_worker",
)
#: What ranks a mid-epoch checkpoint for Ray's retention (`checkpoint_score`, an epoch's val_accuracy
#: otherwise): below every epoch checkpoint, so it is kept only while it is the latest.
MID_EPOCH_SCORE = -1.0


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker receives from `scn_scale.train.train`: settings already checked on the driver."""

    cfg: TrainConfig
    deepspeed: dict
    classes: tuple[str, ...]
    storage: str  # Ray's storage_path: out_dir, absolute when local
    progress: bool = False  # rank 0 shows its progress (scn_scale.progress)
    terminal: bool = False  # the driver's stderr is a terminal: progress as Ray's tqdm bar, else as log lines
    log_level: int | None = None  # configure a handler for scn_scale's loggers on rank 0 (the CLI does)

    @property
    def run_dir(self) -> str:
        return checkpoint.run_dir(self.storage, self.cfg.run_name)


@dataclass
class EpochStats:
    """One rank's sums over one epoch's training steps; reduced across ranks at the epoch end."""

    samples: int = 0
    steps: int = 0
    loss: float = 0.0  # sums over samples
    wce: float = 0.0
    rr: float = 0.0
    correct: int = 0
    skipped: int = 0  # corrupt samples the reader dropped
    data_time: float = 0.0  # waiting for batches
    compute_time: float = 0.0  # forward, backward, step, proposals


@dataclass
class EpochState:
    """What one rank has of the epoch it trains: its sums, its per-sample record (alpha, relabel
    proposals), the running device sums and the tracker meter's last read.

    A mid-epoch checkpoint saves it (`to_partial`) with what else differs by rank there: the
    random state of torch and the BatchNorm statistics (averaged only at the epoch's end).
    """

    stats: EpochStats
    samples: sync.EpochSamples
    sums: metrics.RunningSums
    meter: tracking.StepMeter

    @classmethod
    def start(cls, epoch: int, lr: float, world: int, device: torch.device) -> EpochState:
        return cls(EpochStats(), sync.EpochSamples(epoch), metrics.RunningSums(device), tracking.StepMeter(lr, world))

    def to_partial(self, module: torch.nn.Module, device: torch.device) -> dict:
        """Host tensors and plain values only: the checkpoint loads it with weights_only=True."""
        return {
            "stats": dataclasses.asdict(self.stats),
            "samples": self.samples.state_dict(),
            "sums": self.sums.total.cpu(),
            "meter": {"sums": self.meter.sums, "samples": self.meter.samples},
            "buffers": {name: b.detach().cpu().clone() for name, b in module.named_buffers()},
            "random": torch.get_rng_state(),
            "device_random": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        }

    @classmethod
    def from_partial(cls, partial: dict, epoch: int, lr: float, world: int, device: torch.device) -> EpochState:
        state = cls.start(epoch, lr, world, device)
        state.stats = EpochStats(**partial["stats"])
        state.samples = sync.EpochSamples.from_state(partial["samples"], device)
        state.sums.total = partial["sums"].to(device)
        state.meter.sums, state.meter.samples = dict(partial["meter"]["sums"]), partial["meter"]["samples"]
        return state


def restore_random(partial: dict, device: torch.device) -> None:
    """Torch's random state as a mid-epoch checkpoint saved it (dropout continues as it would have)."""
    torch.set_rng_state(partial["random"])
    if partial["device_random"] is not None:
        torch.cuda.set_rng_state(partial["device_random"], device)


@dataclass
class TrainLabels:
    """The label of every sample before relabeling (the manifest's, overridden) by row of the sample index, and its
    truth when label_overrides records one (synthetic noise)."""

    given: torch.Tensor  # int16 [samples]
    truth: torch.Tensor | None  # int16 [samples]

    @property
    def noisy(self) -> torch.Tensor | None:
        return None if self.truth is None else self.given != self.truth


def read_train_index(cfg: TrainConfig) -> tuple[ManifestIndex, TrainLabels]:
    """The training set's sample index (from its manifest) and its labels by row, with their truth only
    if the override table has a `true_label` column (scn_scale.noise writes one).

    Every rank reads both: every rank keys its samples by row, splits its alpha histogram
    into noisy and clean samples itself, and weighs classes for balanced sampling by them.
    """
    manifest = read_manifest(cfg.train_shards, columns=["key", "label"])
    train_index = ManifestIndex.build(manifest.column("key"))
    index, rows = train_index.index, train_index.of_manifest_row
    given = torch.zeros(len(index), dtype=torch.int16)
    given[torch.from_numpy(rows)] = torch.tensor(manifest.column("label").to_numpy(), dtype=torch.int16)
    if not cfg.label_overrides:
        return train_index, TrainLabels(given, None)
    columns = ["key", "label"] + (["true_label"] if "true_label" in pq.read_schema(cfg.label_overrides).names else [])
    overrides = pq.read_table(cfg.label_overrides, columns=columns)
    overridden = torch.from_numpy(index.lookup(overrides.column("key")))
    truth = given.clone() if "true_label" in columns else None
    given[overridden] = torch.tensor(overrides.column("label").to_numpy(), dtype=torch.int16)
    if truth is not None:
        truth[overridden] = torch.tensor(overrides.column("true_label").to_numpy(), dtype=torch.int16)
    return train_index, TrainLabels(given, truth)


def importance_trains(cfg: TrainConfig, epoch: int) -> bool:
    """Whether alpha is in the loss in the 1-based `epoch`: SCN after its warm-up; never for the baseline."""
    return cfg.method == "scn" and epoch > cfg.scn.warmup_epochs


def training_loss(
    out: SCNOutput, labels: torch.Tensor, cfg: TrainConfig, epoch: int, mirror: SCNOutput | None = None
) -> tuple[LossParts, torch.Tensor | None, int | None]:
    """(loss parts, ranked alpha, this rank's offset in it) for one micro-batch of the 1-based `epoch`.

    SCN ranks alpha over this rank's batch, or with `scn.rank_scope: global` over every
    rank's (gathered; the relabel rule's "low" scope must group over the same alpha).
    `method: baseline`, and SCN during its `scn.warmup_epochs`, is plain cross-entropy on
    the unscaled logits: alpha is computed but receives no gradient, and there is no rank loss.
    `method: eac` also needs `mirror`, the network on the batch's horizontal flip, both with maps.
    """
    if cfg.method == "eac":
        if mirror is None:
            raise ValueError("method eac needs the mirrored batch's output (mirror)")
        return eac_loss(out, mirror, labels, cfg.eac.lam), None, None
    if not importance_trains(cfg, epoch):
        loss = baseline_loss(out.logits, labels)
        return LossParts(loss, loss.detach(), loss.new_zeros(())), None, None
    ranked, offset = sync.gather_alpha(out.alpha) if cfg.scn.rank_scope == "global" else (None, None)
    return scn_loss(out, labels, cfg.scn, ranked), ranked, offset


#: The optimizer's parameter group of the importance branch (alpha's Linear), named so the schedule can find it.
IMPORTANCE_GROUP = "importance"


def make_optimizer(cfg: TrainConfig, model: SCNModel) -> torch.optim.Optimizer:
    """A plain torch optimizer: DeepSpeed's own Adam variants are compiled just in time and need a compiler.

    The importance branch gets a parameter group of its own, so that `schedule_epoch` can
    hold it still while alpha is unused (see there).
    """
    branch = list(model.importance.parameters())
    ids = {id(p) for p in branch}
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids]},
              {"params": branch, "name": IMPORTANCE_GROUP}]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def schedule_epoch(optimizer: torch.optim.Optimizer, cfg: TrainConfig, epoch: int, resumed: bool = False) -> None:
    """Set every parameter group's lr for the 1-based `epoch`; hold the importance branch while alpha is unused.

    A plain torch optimizer skips a parameter whose gradient is None. DeepSpeed (ZeRO) hands
    the optimizer flat gradient buffers instead, with zeros where nothing flowed, so the weight
    decay alone moved the unused branch: 140 Adam steps of a warm-up took it to zero (measured),
    and SCN then started from alpha = 0.5 everywhere instead of the network's initial branch.
    With lr and weight decay at 0 the branch, and Adam's moments for it, stay as they are. At the
    first epoch in which it trains its optimizer state is reset, so its first step is an
    optimizer's first step there, as in plain PyTorch (not one scaled by a step count it never used);
    not again when that epoch is `resumed` mid-way (its state then holds the epoch's steps so far).
    """
    trains = importance_trains(cfg, epoch)
    inner = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the torch optimizer
    for group in inner.param_groups:
        branch = group.get("name") == IMPORTANCE_GROUP
        held = branch and not trains
        group["lr"] = 0.0 if held else lr_at(cfg, epoch)
        group["weight_decay"] = 0.0 if held else cfg.weight_decay
        if branch and trains and epoch == cfg.scn.warmup_epochs + 1 > 1 and not resumed:
            for p in group["params"]:
                inner.state.pop(p, None)


def build_engine(spec: WorkerSpec, device: torch.device, init: bool):
    """The model (seeded, so every rank starts equal), optionally initialized from `cfg.init`, inside a DeepSpeed engine."""
    # Imported here, not at the top: the driver imports this module only to hand Ray the
    # function, and DeepSpeed picks its accelerator at import (DS_ACCELERATOR is set for workers).
    import deepspeed

    cfg = spec.cfg
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, len(spec.classes))
    if init:
        report = load_weights(model, cfg.init, spec.classes, cfg.allow_partial_init)
        log.info("init weights: %s", report.summary())
    memory_format = torch.channels_last if cfg.channels_last else torch.preserve_format
    model = model.to(device, memory_format=memory_format)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=make_optimizer(cfg, model), config=spec.deepspeed)
    return engine


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward's precision: for precision=bf16, bf16 autocast around an fp32 engine (`deepspeed_config`), so
    weights, gradients, optimizer state and BatchNorm's running statistics stay fp32."""
    if cfg.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Worker:
    """One rank's training state: settings, data, engine and relabel table."""

    def __init__(self, spec: WorkerSpec, device: torch.device) -> None:
        self.spec, self.cfg, self.device = spec, spec.cfg, device
        self.rank, self.world = sync.rank_and_world()
        self.train_set: ShardSet = open_shard_set(self.cfg.train_shards)
        self.val_set: ShardSet = open_shard_set(self.cfg.val_shards)
        self.overrides = load_overrides(self.cfg.label_overrides) if self.cfg.label_overrides else {}
        self.train_index, self.labels = read_train_index(self.cfg)
        self.index = self.train_index.index
        self.fault = FaultPlan.parse(self.cfg.fail_at, self.cfg.num_workers)
        self._unregistered: str | None = None  # rank 0: a checkpoint resumed from that Ray's retention does not know
        resume_from = self._resume_point()
        self.engine = build_engine(spec, device, init=bool(self.cfg.init) and resume_from is None)
        self.table = RelabelTable(self.index)
        self.first_epoch, self.start_step = 1, 0
        self.partial: dict | None = None  # this rank's state of the epoch a mid-epoch checkpoint resumes
        self.resumed_from: dict | None = None
        if resume_from is not None:
            self._restore(resume_from)
        sync.check_digests(self.table)

    def _resume_point(self) -> str | None:
        """The checkpoint this attempt resumes from (scn_scale.checkpoint.resume_point), chosen by rank 0 for all.

        One newer than Ray's registered checkpoint is unknown to Ray's retention: if it is a mid-epoch
        one, rank 0 removes it itself once a newer checkpoint is complete (`_unregistered`); an epoch's
        stays, as one of the run's epochs (at most one per failure).
        """
        choice = None
        if self.rank == 0:
            registered = ray.train.get_checkpoint()
            name = None if registered is None else os.path.basename(registered.path.rstrip("/"))
            choice = checkpoint.resume_point(self.spec.run_dir, name)
            if choice is not None and (name is None or checkpoint.position(choice) > checkpoint.position(name)):
                log.info("resuming from %s, which Ray Train had not registered yet (a kill right after its report)", choice)
                if checkpoint.position(choice)[1] != math.inf:
                    self._unregistered = choice
        return sync.all_gather_object(choice)[0]

    def _restore(self, directory_url: str) -> None:
        with ray.train.Checkpoint(directory_url).as_directory() as directory:
            restored = checkpoint.load(directory, self.engine, self.world, self.rank, self.index)
        if tuple(restored.classes) != self.spec.classes:
            raise checkpoint.CheckpointError(f"the checkpoint's classes {restored.classes} differ from the shard set's {list(self.spec.classes)}")
        self.table = restored.table
        self.first_epoch, self.start_step = restored.next_position
        self.partial = restored.partial
        if self.partial is not None:
            # DeepSpeed restored rank 0's module on every rank; mid-epoch each rank's BatchNorm statistics are its own.
            with torch.no_grad():
                for name, buffer in self.engine.module.named_buffers():
                    buffer.copy_(self.partial["buffers"][name])
        self.resumed_from = {"epoch": restored.epoch, "table_digest": restored.table.digest()}
        if restored.step is not None:
            self.resumed_from["step"] = restored.step
        log.info("resumed at epoch %d step %d with a relabel table of %d entries", self.first_epoch, self.start_step, len(restored.table))

    def _loader(self, shard_set: ShardSet, train: bool, epoch: int, start_batch: int = 0) -> torch.utils.data.DataLoader:
        return shard_loader(
            shard_set,
            train=train,
            image_size=self.cfg.image_size,
            batch_size=self.cfg.batch_size,
            rank=self.rank,
            world_size=self.world,
            loader_workers=self.cfg.loader_workers,
            seed=self.cfg.seed,
            epoch=epoch,
            overrides=self.overrides if train else None,
            balanced=train and self.cfg.balanced_sampler,
            labels=self.balance_labels() if train and self.cfg.balanced_sampler else None,
            shuffle_buffer=self.cfg.reader.shuffle_buffer,
            interleave=self.cfg.reader.interleave,
            start_batch=start_batch,
        )

    def balance_labels(self) -> np.ndarray:
        """The label each training manifest row is trained on this epoch (the relabel table applied), for the
        balanced sampler: it weighs the classes as training sees them, and a relabel moves a sample's weight."""
        rows = self.train_index.of_manifest_row
        return self.table.labels_at(rows, self.labels.given[torch.from_numpy(rows)]).numpy()

    def _images(self, batch: dict) -> torch.Tensor:
        memory_format = torch.channels_last if self.cfg.channels_last else torch.preserve_format
        return batch["image"].to(self.device, non_blocking=True, memory_format=memory_format)

    def _forward_backward(
        self, images: torch.Tensor, labels: torch.Tensor, keys: Sequence[str], epoch: int
    ) -> tuple[SCNOutput, LossParts, BatchProposals | None]:
        """One micro-batch: loss, backward, (boundary) step; then the proposals from this forward pass."""
        eac = self.cfg.method == "eac"
        with autocast(self.cfg, self.device):
            out = self.engine(images, cam=eac)
            # EAC's mirrored view, in a forward pass of its own: BatchNorm normalizes each view by
            # itself, as in the released code.
            mirror = self.engine(images.flip(-1), cam=True) if eac else None
        parts, ranked, offset = training_loss(out, labels, self.cfg, epoch, mirror)
        self.engine.backward(parts.total)
        self.engine.step()
        if self.cfg.method != "scn":  # the baseline and EAC relabel nothing
            return out, parts, None
        return out, parts, propose_relabels(keys, labels, out, epoch, self.cfg.scn, ranked, offset)

    def train_epoch(
        self, epoch: int, tracker: tracking.RunTracker | None = None, start_step: int = 0, partial: dict | None = None,
    ) -> tuple[EpochStats, sync.EpochSamples]:
        """Train one epoch, or its steps after `start_step` with this rank's `partial` state from a mid-epoch
        checkpoint; returns this rank's sums and its record of the samples it trained (alpha, proposals).

        Sums, alpha and proposals stay on the device: the loop reads the sums back every
        `log_every_steps` steps, at mid-epoch checkpoints and at the end, and waits for the device
        nowhere else. Those reads feed the progress display and `tracker` (rank 0's, None elsewhere).
        """
        torch.manual_seed(epoch_seed(self.cfg.seed, epoch, self.rank))
        schedule_epoch(self.engine.optimizer, self.cfg, epoch, resumed=start_step > 0)
        self.engine.train()
        loader = self._loader(self.train_set, True, epoch, start_step)
        # Whole accumulation cycles only: a partial cycle's gradients would leak into the next
        # epoch, and be lost on resume.
        steps = len(loader.dataset) // self.cfg.grad_accum * self.cfg.grad_accum
        lr = lr_at(self.cfg, epoch)
        if partial is None:
            state = EpochState.start(epoch, lr, self.world, self.device)
        else:
            state = EpochState.from_partial(partial, epoch, lr, self.world, self.device)
        stats, samples, sums, meter = state.stats, state.samples, state.sums, state.meter
        shown = progress.EpochProgress(progress.mode(self.spec.progress, self.spec.terminal, self.rank), epoch, steps, start_step)
        batches = iter(loader)  # the loader draws its workers' seed from torch here, resumed or not
        if partial is not None:
            restore_random(partial, self.device)
        every = self.cfg.checkpoint_every_steps
        tick = time.perf_counter()
        for step, batch in enumerate(islice(batches, steps - start_step), start=start_step + 1):
            loaded = time.perf_counter()
            stats.data_time += loaded - tick
            keys = list(batch["key"])
            rows = self.train_index.rows(batch["row"], keys)
            labels = self.table.labels_at(rows, batch["label"])
            # From pinned memory the copy is queued; from pageable memory it would wait for the device.
            labels = (labels.pin_memory() if self.device.type == "cuda" else labels).to(self.device, non_blocking=True)
            out, parts, proposals = self._forward_backward(self._images(batch), labels, keys, epoch)
            samples.add(rows, out.alpha, proposals)
            n = len(keys)
            stats.samples += n
            stats.steps += 1
            stats.skipped += int(batch["skipped"])
            sums.add(n, parts.total, parts.wce, parts.rr, (out.logits.argmax(1) == labels).sum(), out.alpha)
            if step % self.cfg.log_every_steps == 0:
                running = sums.read()
                scalars = meter.read(running, stats.samples)
                shown.report(step, running["loss"] / stats.samples, running["alpha"] / stats.samples, scalars["step/images_per_s"])
                if tracker is not None:
                    tracker.log_interval(step, scalars)
            stats.compute_time += time.perf_counter() - loaded
            if every and step % every == 0 and step < steps:  # the last step is followed by the epoch's own
                self.save_and_report(epoch, None, step, state.to_partial(self.engine.module, self.device))
            if self.fault is not None and step < steps:  # after the last, once the epoch's checkpoint is saved
                self.fault.check(epoch, step, self.rank, self.spec.run_dir)
            shown.advance()
            tick = time.perf_counter()
        shown.close()
        tick = time.perf_counter()
        totals = sums.read()  # waits for the device to finish the epoch's last steps: compute time
        stats.compute_time += time.perf_counter() - tick
        if tracker is not None and stats.samples > meter.samples:  # the steps since the last interval's read
            tracker.log_interval(stats.steps, meter.read(totals, stats.samples))
        stats.loss, stats.wce, stats.rr, stats.correct = totals["loss"], totals["wce"], totals["rr"], round(totals["correct"])
        return stats, samples

    def validate(self, epoch: int) -> tuple[Predictions | None, int]:
        """Predictions on the validation set, each sample once, on rank 0 (None elsewhere); and skipped samples, all ranks."""
        skipped = [0]

        def counted(loader: Iterable[dict]) -> Iterator[dict]:
            for batch in loader:
                skipped[0] += int(batch["skipped"])
                yield batch

        with autocast(self.cfg, self.device):
            pred = collect(self.engine.module, counted(self._loader(self.val_set, False, epoch)), self.device)
        parts = sync.gather_object(pred)
        total_skipped = sum(sync.all_gather_object(skipped[0]))
        return (Predictions.concat(parts).dedupe() if parts is not None else None), total_skipped

    def epoch_line(
        self, epoch: int, ranks: list[EpochStats], end: sync.EpochEnd, val: Predictions, val_skipped: int,
        model_digests: list[str],
    ) -> dict:
        """The metrics of one epoch, as reported and written to metrics.jsonl (rank 0)."""
        samples = sum(s.samples for s in ranks)
        wall = [s.data_time + s.compute_time for s in ranks]
        val_summary = summarize(val, self.spec.classes)
        line = {
            "epoch": epoch,
            "lr": lr_at(self.cfg, epoch),
            "loss": sum(s.loss for s in ranks) / samples,
            "wce": sum(s.wce for s in ranks) / samples,
            "rr": sum(s.rr for s in ranks) / samples,
            "train_accuracy": sum(s.correct for s in ranks) / samples,
            "train_samples": samples,
            "steps_per_rank": ranks[0].steps,
            "skipped": sum(s.skipped for s in ranks),
            "val_skipped": val_skipped,
            "val_accuracy": val_summary["accuracy"],
            "val_mean_class_accuracy": val_summary["mean_class_accuracy"],
            "val": {k: val_summary[k] for k in ("samples", "per_class_accuracy", "confusion_matrix", "alpha")},
            # alpha of every sample trained this epoch (its last visit), split by the injected
            # noise when label_overrides records the truth (the literature's "noisy samples").
            # From every rank's histogram: quantiles exact to one bin (metrics.ALPHA_BINS), the rest exact.
            "alpha": end.alpha.stats(),
            "relabels": end.changed,
            "relabels_total": self.table.relabeled(),
            "table_size": len(self.table),
            "table_digest": end.digests[0],
            "table_digests": end.digests,
            "model_digests": model_digests,  # every rank's weights and buffers as validated and saved: all equal
            "images_per_s": samples / max(wall),
            "images_per_s_per_worker": [s.samples / w for s, w in zip(ranks, wall)],
            "data_time_s": [s.data_time for s in ranks],
            "compute_time_s": [s.compute_time for s in ranks],
        }
        if self.labels.truth is not None:
            line["audit"] = self.table.audit_rows(self.labels.truth, self.labels.given, self.spec.classes)
        if self.resumed_from is not None and epoch == self.first_epoch:
            line["resumed_from"] = self.resumed_from
        return line

    def save_and_report(self, epoch: int, line: dict | None, step: int | None = None, partial: dict | None = None) -> None:
        """Every rank writes its part of the checkpoint (after epoch `epoch`, or after `step` of its steps
        with this rank's `partial` state) and reports it; Ray merges the parts into one directory.

        Each rank's report returns once its files are copied into the run; after the last rank's,
        rank 0 marks the directory complete (checkpoint.mark_complete), the mark that
        `latest_checkpoint` (a resume, a new start's checks, evaluate, reports) requires of a
        checkpoint, and every rank waits for the mark: a kill from then on resumes from it.
        """
        directory = tempfile.mkdtemp(prefix=f"scn-ckpt-e{epoch}-r{self.rank}-")
        if step is not None:
            reported = {"epoch": epoch, "step": step, "checkpoint_score": MID_EPOCH_SCORE}
        elif line is None:  # ranks other than 0: Ray reads rank 0's metrics
            reported = {"epoch": epoch}
        else:
            reported = {**{k: line[k] for k in REPORTED if k in line}, "checkpoint_score": line["val_accuracy"]}
        try:
            checkpoint.save(
                directory, self.engine, epoch=epoch, table=self.table, cfg=self.cfg, classes=self.spec.classes,
                rank=self.rank, world_size=self.world, step=step, partial=partial,
            )
            ray.train.report(
                reported,
                checkpoint=ray.train.Checkpoint.from_directory(directory),
                checkpoint_dir_name=checkpoint.checkpoint_dir_name(epoch, step),
            )
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        sync.barrier()
        if self.rank == 0:
            checkpoint.mark_complete(join(self.spec.run_dir, checkpoint.checkpoint_dir_name(epoch, step)))
            if self._unregistered is not None:  # superseded now: nothing would ever remove it
                remove(self._unregistered, recursive=True)
                self._unregistered = None
        sync.barrier()

    def run(self) -> None:
        metrics_file = checkpoint.MetricsFile(self.spec.run_dir, self.first_epoch) if self.rank == 0 else None
        tracker = None
        if self.rank == 0:
            tracker = tracking.open_tracker(self.cfg, self.spec.run_dir, metrics_file.lines, self.first_epoch, self.start_step)
        finished = False
        try:
            for epoch in range(self.first_epoch, self.cfg.epochs + 1):
                resumed = epoch == self.first_epoch
                self.run_epoch(epoch, metrics_file, tracker, self.start_step if resumed else 0, self.partial if resumed else None)
            finished = True
        finally:
            if tracker is not None:
                tracker.close(finished)

    def run_epoch(
        self, epoch: int, metrics_file: checkpoint.MetricsFile | None, tracker: tracking.RunTracker | None,
        start_step: int = 0, partial: dict | None = None,
    ) -> None:
        """Train (from `start_step`, with `partial`: a mid-epoch resume), merge the relabels, validate, record
        (rank 0: `metrics_file`, `tracker`) and checkpoint one epoch."""
        stats, samples = self.train_epoch(epoch, tracker, start_step, partial)
        end = sync.end_epoch(self.table, samples, self.labels.noisy, self.cfg.scn.relabel_confirm)
        # Per-sample alpha (for galleries and audits) goes from each rank to its own file, never through rank 0.
        metrics.write_alpha_part(self.spec.run_dir, epoch, self.rank, self.index.keys_at(end.rows), end.sample_alpha)
        # Validated and saved: one model on every rank (BatchNorm's statistics averaged), proven by its digests.
        sync.average_buffers(self.engine.module)
        model_digests = sync.all_gather_object(sync.module_digest(self.engine.module))
        val, val_skipped = self.validate(epoch)
        ranks = sync.all_gather_object(stats)
        line = None
        if self.rank == 0:
            line = self.epoch_line(epoch, ranks, end, val, val_skipped, model_digests)
            write_epoch_predictions(self.spec.run_dir, epoch, val, self.spec.classes)
            metrics_file.append(line)
            if tracker is not None:
                tracker.end_epoch(line)
            log.info(
                "epoch %d: loss %.4f, train acc %.4f, val acc %.4f, relabels %d (total %d), %.1f images/s",
                epoch, line["loss"], line["train_accuracy"], line["val_accuracy"], end.changed,
                line["relabels_total"], line["images_per_s"],
            )
        self.save_and_report(epoch, line)
        if self.fault is not None:
            self.fault.check(epoch, stats.steps, self.rank, self.spec.run_dir)


class _QuietRayTrain(logging.Filter):
    """Drops Ray Train's own INFO lines in a worker: two per rank at every report ("Reporting training
    result N: TrainingReport(...)" with the whole metrics dict, "Checkpoint successfully created at"),
    which would outnumber rank 0's progress lines. By source file: Ray names some of these loggers by
    their file's path, out of reach of its own `LoggingConfig` (which filters the `ray.train` names)."""

    root = os.path.dirname(ray.train.__file__) + os.sep

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(self.root)


def _configure_logging(level: int | None, rank: int) -> None:
    """The CLI's choice, applied in the worker process it cannot reach: rank 0 prints scn_scale's logs,
    no rank Ray Train's per-report lines (kept at --log-level DEBUG)."""
    if level is None:
        return
    if level > logging.DEBUG:
        for handler in (*logging.getLogger().handlers, *logging.getLogger("ray.train").handlers):
            handler.addFilter(_QuietRayTrain())
        # DeepSpeed's ZeRO calls torch's all_gather_into_tensor, which torch 2.14 deprecates: once per
        # process, at a moment that varies, a warning no user of this trainer can act on.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                                category=FutureWarning)
    if rank != 0:
        return
    logger = logging.getLogger("scn_scale")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    # Ray Train gives its workers' root logger a console handler of its own: propagating there
    # would print every line twice.
    logger.propagate = False
    logger.setLevel(level)


def train_worker(config: dict) -> None:
    """Ray Train's `train_loop_per_worker`: `config["spec"]` is a WorkerSpec."""
    spec: WorkerSpec = config["spec"]
    _configure_logging(spec.log_level, ray.train.get_context().get_world_rank())
    device = ray.train.torch.get_device() if spec.cfg.use_gpu else torch.device("cpu")
    Worker(spec, device).run()
