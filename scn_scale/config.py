"""Typed job settings: dataclasses loaded from YAML, overridable as `key=value`, validated before work starts.

One loader serves every job's dataclass, so the rules (unknown keys are errors that
list the valid ones, values are checked against the field's type) are the same for
training, fine-tuning and evaluation. The resolved config is saved beside every output.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, Union

import yaml

from shards.atomic import write_text
from shards.cli import key_values, parse_yaml, read_yaml
from shards.reader import DEFAULT_INTERLEAVE, DEFAULT_SHUFFLE_BUFFER

T = TypeVar("T")

BACKBONES = ("resnet18", "resnet34", "resnet50")
#: The prefix of a named pretrained start, `init=torchvision:<backbone>` (scn_scale.weights).
TORCHVISION_INIT = "torchvision:"


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type, or inconsistent with another."""


@dataclass
class SCNConfig:
    """The SCN method's hyper-parameters (Wang et al., CVPR 2020, arXiv 2002.10392)."""

    beta: float = field(default=0.7, metadata={"doc": (
        "Share of the ranked batch in the high-importance group (paper and released code)."
    )})
    delta1: float = field(default=0.07, metadata={"doc": (
        "Rank-regularization margin. 0.07 is the authors' README advice for the released code at batch 64; "
        "the paper's 0.15 is at batch 1024. It depends on the batch over which alpha is ranked (see "
        "rank_scope): the per-rank batch, or the global one. Watch `rr` in metrics.jsonl: where alpha's own "
        "spread already meets the margin the rank loss is 0 and does nothing (bench/noise_robustness.py measured "
        "that at 0.07 and 0.15 on batches of 64)."
    )})
    delta2: float = field(default=0.2, metadata={"doc": (
        "Relabel margin on p_max - p_label (paper and released code: 0.2, for a model that starts from face "
        "recognition and is right most of the time). A model trained from random weights to 40-45% accuracy is "
        "often confidently wrong: on the demo's faces 0.2 broke more labels than it restored, 0.6 restored more "
        "(cluster/configs/demo.yaml). With a label_overrides table that records the truth, `audit` in "
        "metrics.jsonl shows which way the relabels go."
    )})
    gamma: float = field(default=0.5, metadata={"doc": (
        "Loss mix. The paper writes gamma * L_RR + (1 - gamma) * L_WCE; the released code uses L_WCE + L_RR. "
        "scn_scale.loss computes 2 * (gamma * RR + (1 - gamma) * WCE), so 0.5 reproduces the released code exactly."
    )})
    relabel_epoch: int = field(default=10, metadata={"doc": (
        "First epoch (1-based, as everywhere in this project) at which relabeling runs (paper and released "
        "code: 10). After the warm-up, if there is one."
    )})
    warmup_epochs: int = field(default=0, metadata={"doc": (
        "Epochs of plain cross-entropy before SCN proper: the loss takes the unscaled logits (alpha = 1), the "
        "importance branch is held as initialized (no gradient, no weight decay) and the rank loss is off, so the "
        "network first fits the clean majority. A deviation from the "
        "released code, which starts from a face-recognition ResNet-18 that already separates faces; from random "
        "weights, SCN's alpha collapses towards 0 early, scales the logits and their gradients down, and "
        "relabeling then acts on a model near chance (README, \"Known limits\"). 0 = the released code."
    )})
    relabel_confirm: int = field(default=2, metadata={"doc": (
        "Consecutive epochs that must propose the same new label for a sample before it is applied. 1 is the "
        "released code's rule: one augmented view's confident error relabels a sample, and from then on it "
        "changes about as many clean labels as it restores, every epoch (measured: bench/README.md, "
        "relabel_rule). 2 (the default) waits for the next epoch's pass to agree: mislabeled samples, predicted "
        "as their true class epoch after epoch, are restored one epoch later, while a hard clean sample's "
        "confident errors rarely repeat. Proposals start at relabel_epoch, so the first change is applied at "
        "its end with 1, one epoch later with 2."
    )})
    relabel_scope: Literal["all", "low"] = field(default="all", metadata={"doc": (
        "\"all\": every sample of the batch may be relabeled (released code); \"low\": only the low-importance "
        "group (paper). \"all\" is the default because alpha does not single out mislabeled samples under "
        "symmetric noise (its AUC stays at 0.48-0.53: bench/README.md), so \"low\" only drops a random 70% of the "
        "proposals; compare both with `python bench/noise_robustness.py --set scn.relabel_scope=low`."
    )})
    rank_scope: Literal["local", "global"] = field(default="local", metadata={"doc": (
        "\"local\": rank alpha within each rank's batch; \"global\": within the batch gathered from every rank "
        "(the paper ranked its batch of 1024 as one)."
    )})

    def validate(self) -> None:
        _check_types(self, "scn.")
        if not 0.0 < self.beta < 1.0:
            raise ConfigError(f"scn.beta must be in (0, 1), got {self.beta}")
        if self.delta1 < 0.0:
            raise ConfigError(f"scn.delta1 must be >= 0, got {self.delta1}")
        if not 0.0 <= self.delta2 < 1.0:
            raise ConfigError(f"scn.delta2 must be in [0, 1), got {self.delta2}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(f"scn.gamma must be in [0, 1], got {self.gamma}")
        if self.relabel_epoch < 1:
            raise ConfigError(f"scn.relabel_epoch is 1-based and must be >= 1, got {self.relabel_epoch}")
        if self.relabel_confirm < 1:
            raise ConfigError(f"scn.relabel_confirm must be >= 1 (1: the released code's rule), got {self.relabel_confirm}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"scn.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.relabel_epoch <= self.warmup_epochs:
            raise ConfigError(
                f"scn.relabel_epoch ({self.relabel_epoch}) must come after the warm-up's "
                f"{self.warmup_epochs} epochs: relabeling needs the importance weights SCN learns after it"
            )


@dataclass
class EACConfig:
    """Erasing Attention Consistency (Zhang et al., ECCV 2022, arXiv 2207.10299), for `method: eac`.

    Cross-entropy on the augmented view (random erasing included, as for every method) plus
    lam times the mean squared difference between its class activation maps and the mirrored maps
    of its horizontal flip; no relabeling, no importance weight. How this differs from the authors'
    released code is in scn_scale/loss.py (`eac_loss`) and bench/README.md.
    """

    lam: float = field(default=5.0, metadata={"doc": (
        "Weight of the attention-consistency term (released code: 5, at 224 px, where the maps are 7x7). "
        "0 leaves cross-entropy on one view; the second forward pass still runs. In metrics.jsonl `wce` is the "
        "cross-entropy, `loss` - `wce` this weight times the consistency term, and `rr` is 0."
    )})

    def validate(self) -> None:
        _check_types(self, "eac.")
        if self.lam < 0.0:
            raise ConfigError(f"eac.lam must be >= 0, got {self.lam}")


@dataclass
class ModelConfig:
    backbone: str = field(default="resnet18", metadata={"doc": (
        "The torchvision ResNet trunk: resnet18 (as in the paper and the released code), resnet34 or resnet50."
    )})
    dropout: float = field(default=0.0, metadata={"doc": (
        "Dropout on the pooled feature; the released code's default is 0."
    )})

    def validate(self) -> None:
        _check_types(self, "model.")
        if self.backbone not in BACKBONES:
            raise ConfigError(f"model.backbone must be one of {list(BACKBONES)}, got {self.backbone!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class ReaderConfig:
    """How the training reader mixes a shard set, whatever order it was written in (shards.reader)."""

    shuffle_buffer: int = field(default=DEFAULT_SHUFFLE_BUFFER, metadata={"doc": (
        "Samples each loader worker holds, undecoded, and draws from at random. Memory is this times the bytes "
        "of a sample: 5,000 x 4-30 KB (112-224 px JPEG crops) = 20-150 MB per loader worker. OpenCLIP keeps 5,000."
    )})
    interleave: int = field(default=DEFAULT_INTERLEAVE, metadata={"doc": (
        "Pieces of shards (runs of consecutive samples) each loader worker reads at once, round robin. A piece "
        "of a class-sorted set holds one or two classes; 16 pieces give a batch of 32 about 7 of 8 classes "
        "(tests/test_mixing.py). At most this many shards are open per worker."
    )})

    def validate(self) -> None:
        _check_types(self, "reader.")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"reader.shuffle_buffer must be >= 0 (0: no buffer), got {self.shuffle_buffer}")
        if self.interleave < 1:
            raise ConfigError(f"reader.interleave must be >= 1, got {self.interleave}")


@dataclass
class TrainConfig:
    """The training job (`python -m scn_scale.train`). Defaults: the released code's RAF-DB recipe."""

    train_shards: str = field(default="", metadata={"doc": (
        "The training shard set: a directory or a URL (s3://, gs://) of a set written by a crawl, an importer "
        "or shards.split."
    )})
    val_shards: str = field(default="", metadata={"doc": (
        "The validation shard set, with the training set's class list: accuracy every epoch, and the best epoch "
        "is selected on it."
    )})
    epochs: int = field(default=70, metadata={"doc": "Epochs to train (released code: 70)."})
    batch_size: int = field(default=64, metadata={"doc": "Samples per batch, per rank (released code: 64 on one GPU)."})
    image_size: int = field(default=224, metadata={"doc": (
        "Side of the square training input in pixels; the released code resizes RAF-DB's 100x100 crops to 224."
    )})
    num_workers: int = field(default=1, metadata={"doc": "Ray Train workers (ranks)."})
    loader_workers: int = field(default=2, metadata={"doc": (
        "DataLoader worker processes per rank (0: read in the rank itself)."
    )})
    cpus_per_worker: float = field(default=1.0, metadata={"doc": (
        "Ray CPUs reserved per rank, which Ray also gives torch as its thread count. On GPU nodes, reserve the "
        "rank's loader workers too, or Ray packs other work onto the cores they decode on."
    )})
    use_gpu: bool = field(default=False, metadata={"doc": "One GPU per rank (NCCL); false trains on CPUs (gloo)."})
    method: Literal["scn", "baseline", "eac"] = field(default="scn", metadata={"doc": (
        "scn; baseline: plain cross-entropy on the same network, no weighting or relabeling; or eac: Erasing "
        "Attention Consistency (settings under eac), cross-entropy plus a flip-consistency loss on the class "
        "activation maps, also without weighting or relabeling. An eac step runs the network twice (the batch "
        "and its mirror image)."
    )})
    seed: int = field(default=0, metadata={"doc": (
        "Seeds the model's initialization, the augmentation and every epoch's reading plan and shuffle."
    )})
    out_dir: str = field(default="runs", metadata={"doc": (
        "Storage path of runs: a local directory or a URL (s3://, gs://) every node reaches."
    )})
    run_name: str = field(default="scn", metadata={"doc": (
        "The run's directory under out_dir; the same name resumes that run, a new one starts a new run."
    )})
    init: str = field(default="", metadata={"doc": (
        "Weights to start from: a file in a scn_scale.weights layout (an scn-scale model file or .safetensors, "
        "a torchvision state dict, the SCN authors' MS-Celeb-1M checkpoint), or torchvision:resnet18 (any "
        "model.backbone) for torchvision's ImageNet weights from the torch hub cache; \"\" = random init."
    )})
    allow_partial_init: bool = field(default=False, metadata={"doc": (
        "Accept init weights that leave backbone tensors missing or mismatched (the load report lists them); "
        "otherwise that is an error."
    )})
    deepspeed: str | dict = field(default="", metadata={"doc": (
        "A DeepSpeed config file path (cluster/deepspeed/) or an inline dict."
    )})
    optimizer: Literal["adam", "adamw", "sgd"] = field(default="adam", metadata={"doc": (
        "The client torch optimizer (released code: Adam)."
    )})
    lr: float = field(default=1e-3, metadata={"doc": "Learning rate at the first epoch (released code: 1e-3)."})
    weight_decay: float = field(default=1e-4, metadata={"doc": "Weight decay (released code: 1e-4)."})
    momentum: float = field(default=0.9, metadata={"doc": "SGD only; the released code's SGD alternative uses 0.9."})
    lr_decay: float = field(default=0.9, metadata={"doc": (
        "Exponential learning-rate decay, a factor per epoch (released code: 0.9)."
    )})
    grad_accum: int = field(default=1, metadata={"doc": (
        "Batches whose gradients are summed before each optimizer step."
    )})
    precision: Literal["fp32", "bf16"] = field(default="fp32", metadata={"doc": (
        "fp32, or bf16 autocast (GPUs; CPUs with AVX-512 BF16); the DeepSpeed config must agree."
    )})
    channels_last: bool = field(default=False, metadata={"doc": (
        "Channels-last memory format for the model and its batches (faster convolutions on recent GPUs)."
    )})
    label_overrides: str = field(default="", metadata={"doc": (
        "A parquet table of key -> label written by scn_scale.noise (synthetic label noise), applied as "
        "samples are read."
    )})
    balanced_sampler: bool = field(default=False, metadata={"doc": "Class-balanced sampling (the AffectNet recipe)."})
    log_every_steps: int = field(default=50, metadata={"doc": (
        "Steps between two reads of the step loop's running sums (loss, WCE, RR, accuracy, alpha) for the "
        "progress bar or log line and the per-step scalars of tracking. Each read waits for the device; the loop "
        "reads nothing else back per step, so a GPU's queue never drains in between."
    )})
    tracking: Literal["tensorboard", "mlflow", "none"] = field(default="tensorboard", metadata={"doc": (
        "Where rank 0 sends the run's scalars: per step at every log_every_steps read and at each epoch's end "
        "(step/loss, step/wce, step/rr, step/lr, step/alpha_mean, step/alpha_std, step/images_per_s: means over "
        "rank 0's samples since the previous read) and per epoch (epoch/train_accuracy, epoch/val_accuracy, "
        "epoch/val_mean_class_accuracy, epoch/relabels, epoch/relabels_total, ...; epoch/alpha_noisy_mean, "
        "epoch/alpha_clean_mean, epoch/relabel_precision and epoch/relabel_recall when label_overrides records "
        "the truth). tensorboard: event files in RUN/tensorboard/steps and RUN/tensorboard/epochs (an "
        "object-store run gets them copied at every epoch's end); `tensorboard --logdir RUN/tensorboard`. "
        "mlflow: an MLflow run (needs the mlflow extra), in mlflow_uri. none: metrics.jsonl only."
    )})
    mlflow_uri: str = field(default="", metadata={"doc": (
        "MLflow tracking URI for tracking=mlflow (a server, or e.g. sqlite:///mlruns.db); \"\" = an SQLite "
        "store in the run directory, RUN/mlflow.db (`mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db`), "
        "which needs a local out_dir."
    )})
    fail_at: str = field(default="", metadata={"doc": (
        "Fault injection for tests, e.g. \"epoch=1,step=2,rank=1\": that rank raises after that step (1-based) and "
        "the checkpoint that follows it, if any, once per run; add \",how=kill\" for a SIGKILL of the worker process "
        "instead of an exception; several faults separated by \";\", each failing one attempt (max_failures)."
    )})
    max_failures: int = field(default=1, metadata={"doc": (
        "Worker failures Ray Train survives by restarting from the last checkpoint (its FailureConfig)."
    )})
    keep_checkpoints: int = field(default=2, metadata={"doc": (
        "Epoch checkpoints kept in the run directory besides the latest one (where a resume starts): the "
        "keep_checkpoints best by val_accuracy, a later epoch winning a tie; the others are deleted as training "
        "goes. So 1 keeps the best and the latest epoch. 0 keeps every epoch (each holds the DeepSpeed state of "
        "every rank: about 200 MiB for ResNet-18 under ZeRO-2). Ray Train applies it (CheckpointConfig), so "
        "its record of the run's checkpoints never names a deleted one and a resume finds what it lists."
    )})
    checkpoint_every_steps: int = field(default=0, metadata={"doc": (
        "A mid-epoch checkpoint every so many steps (0: at epoch ends only), so that a preempted node costs at most "
        "that many steps, not an epoch. It holds the exact data position and each rank's share of the epoch so far "
        "(its relabel proposals, per-sample alpha, sums, BatchNorm statistics, random state); a resume passes over "
        "the epoch's trained batches (read and decoded, not augmented or trained) and continues as an uninterrupted "
        "run would, on the same number of ranks. Each costs a DeepSpeed save of every rank; Ray keeps it until a "
        "newer checkpoint comes (it ranks below every epoch checkpoint for keep_checkpoints). A multiple of grad_accum."
    )})
    address: str = field(default="", metadata={"doc": (
        "Ray cluster address (the command's --ray-address); \"\" = RAY_ADDRESS, else a new local cluster on loopback."
    )})
    scn: SCNConfig = field(default_factory=SCNConfig, metadata={"doc": (
        "The SCN method's hyper-parameters (Wang et al., CVPR 2020, arXiv 2002.10392)."
    )})
    eac: EACConfig = field(default_factory=EACConfig, metadata={"doc": (
        "Erasing Attention Consistency's setting (Zhang et al., ECCV 2022, arXiv 2207.10299), for method=eac."
    )})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": (
        "The network: a torchvision ResNet trunk, a linear classifier and the importance branch."
    )})
    reader: ReaderConfig = field(default_factory=ReaderConfig, metadata={"doc": (
        "How the training reader mixes a shard set, whatever order it was written in (shards.reader)."
    )})

    def validate(self) -> None:
        _check_types(self, "")
        for name in ("epochs", "batch_size", "image_size", "num_workers", "grad_accum", "log_every_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("loader_workers", "max_failures", "keep_checkpoints", "checkpoint_every_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.cpus_per_worker <= 0.0:
            raise ConfigError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.lr <= 0.0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0.0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0.0 < self.lr_decay <= 1.0:
            raise ConfigError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        for part in filter(None, self.fail_at.replace(";", ",").split(",")):
            name, sep, value = part.partition("=")
            if not (sep and name.strip() and value.strip()):
                raise ConfigError(f"fail_at must be comma-separated name=value pairs (faults separated by ';'), got {self.fail_at!r}")
        if self.checkpoint_every_steps % self.grad_accum:
            raise ConfigError(f"checkpoint_every_steps ({self.checkpoint_every_steps}) must be a multiple of grad_accum "
                              f"({self.grad_accum}): a checkpoint between two optimizer steps would lose the gradients accumulated so far")
        if self.tracking == "mlflow" and not self.mlflow_uri and "://" in self.out_dir:
            raise ConfigError(f"tracking=mlflow keeps its store in the run directory, which must be local, but out_dir is "
                              f"{self.out_dir}: set mlflow_uri (an MLflow server or database every node reaches)")
        self.scn.validate()
        self.eac.validate()
        self.model.validate()
        self.reader.validate()

    def with_absolute_paths(self) -> TrainConfig:
        """This config with its local paths made absolute against the working directory.

        Ray runs the workers in working directories of their own, where a path relative to
        the directory the command ran in names nothing. URLs and named starts stay as given.
        """

        def absolute(value: str) -> str:
            keep = not value or "://" in value or value.startswith(TORCHVISION_INIT)
            return value if keep else os.path.abspath(value)

        paths = {name: absolute(getattr(self, name)) for name in ("train_shards", "val_shards", "out_dir", "init",
                                                                  "label_overrides")}
        if isinstance(self.deepspeed, str):
            paths["deepspeed"] = absolute(self.deepspeed)
        return dataclasses.replace(self, **paths)


def load_config(cls: type[T], path: str | None, overrides: Sequence[str]) -> T:
    """Build `cls` from its defaults, then the YAML file at `path` (if any), then `key=value` overrides.

    Overrides use dotted keys for nested dataclasses (`scn.delta1=0.1`); each value is
    parsed as YAML and checked against the field's type, except that a field accepting a
    string keeps the literal text when the parsed value does not fit (`run_name=2024`).
    The result is validated (`validate()`) when the class defines it.
    """
    cfg = cls()
    if path is not None:
        try:
            data = read_yaml(path) or {}
        except OSError as e:  # missing, a directory, unreadable
            raise ConfigError(f"config file {path}: {e.strerror or e}") from e
        except ValueError as e:  # not UTF-8, not YAML: the message names the file, line and column
            raise ConfigError(str(e)) from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of settings, got {type(data).__name__}")
        cfg = _update(cfg, data, "")
    for key, text in parse_overrides(overrides).items():
        cfg = _override(cfg, key.split("."), text, "")
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def parse_overrides(argv: Sequence[str]) -> dict[str, str]:
    """Split `key=value` items into {dotted key: value text}; a later repeat of a key wins."""
    try:
        return key_values(argv, "override")
    except ValueError as e:
        raise ConfigError(str(e)) from e


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _fields(obj: Any) -> dict[str, Any]:
    """Field name -> resolved type hint (annotations are strings under `from __future__`)."""
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def _unknown(key: str, prefix: str, valid: Sequence[str]) -> ConfigError:
    where = f" under {prefix.rstrip('.')!r}" if prefix else ""
    return ConfigError(f"unknown config key {prefix + key!r}; valid keys{where}: {', '.join(valid)}")


def _update(obj: T, data: dict, prefix: str) -> T:
    """A copy of dataclass `obj` with the settings in `data` applied (nested dicts merge)."""
    types_ = _fields(obj)
    changes = {}
    for key, value in data.items():
        if key not in types_:
            raise _unknown(str(key), prefix, list(types_))
        tp = types_[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {prefix + key!r} expects a mapping of settings, got {value!r}")
            changes[key] = _update(getattr(obj, key), value, f"{prefix}{key}.")
        else:
            changes[key] = _coerce(value, tp, prefix + key)
    return dataclasses.replace(obj, **changes)


def _override(obj: T, parts: list[str], text: str, prefix: str) -> T:
    types_ = _fields(obj)
    key = parts[0]
    if key not in types_:
        raise _unknown(key, prefix, list(types_))
    tp = types_[key]
    if len(parts) > 1:
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"config key {prefix + key!r} has no sub-keys (got {prefix + '.'.join(parts)!r})")
        return dataclasses.replace(obj, **{key: _override(getattr(obj, key), parts[1:], text, f"{prefix}{key}.")})
    try:
        value = parse_yaml(text, f"override {prefix + key}={text}") if text.strip() else None
        if dataclasses.is_dataclass(tp):
            return _update(obj, {key: value}, prefix)
        return dataclasses.replace(obj, **{key: _coerce(value, tp, prefix + key)})
    except ValueError as e:  # not YAML (ValueError), or not of the field's type (ConfigError)
        if _accepts_str(tp):
            return dataclasses.replace(obj, **{key: _coerce(text, tp, prefix + key)})
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from e


def _accepts_str(tp: Any) -> bool:
    if tp is str:
        return True
    return typing.get_origin(tp) in (Union, types.UnionType) and str in typing.get_args(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against type hint `tp`; return it converted where lossless (int -> float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def fail() -> ConfigError:
        return ConfigError(f"config key {key!r} expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")

    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _coerce(value, arm, key)
            except ConfigError:
                pass
        raise fail()
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ConfigError(f"config key {key!r} must be one of {list(args)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail()
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise fail()
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise fail()
        if not args:
            return dict(value)
        return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    raise ConfigError(f"config key {key!r} has a type this loader does not support: {_type_name(tp)}")


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _check_types(obj: Any, prefix: str) -> None:
    """Type-check every non-dataclass field, so configs built in code obey the same rules as loaded ones."""
    for name, tp in _fields(obj).items():
        if not dataclasses.is_dataclass(tp):
            _coerce(getattr(obj, name), tp, prefix + name)
