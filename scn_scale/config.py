"""Typed job settings: dataclasses loaded from YAML, overridable as `key=value`, validated before work starts.

One loader serves every job's dataclass, so the rules (unknown keys are errors that
list the valid ones, values are checked against the field's type) are the same for
training, fine-tuning and evaluation. The resolved config is saved beside every output.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, Union

import yaml

from shards.atomic import write_text
from shards.reader import DEFAULT_INTERLEAVE, DEFAULT_SHUFFLE_BUFFER

T = TypeVar("T")

BACKBONES = ("resnet18", "resnet34", "resnet50")


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type, or inconsistent with another."""


@dataclass
class SCNConfig:
    """The SCN method's hyper-parameters (Wang et al., CVPR 2020; see docs/scn_method.md)."""

    # Share of the ranked batch in the high-importance group (paper and released code).
    beta: float = 0.7
    # Rank-regularization margin. 0.07 is the authors' README advice for the released code
    # at batch 64; the paper's 0.15 is at batch 1024. It depends on the batch over which
    # alpha is ranked (see rank_scope): the per-rank batch, or the global one.
    delta1: float = 0.07
    # Relabel margin on p_max - p_label (paper and released code).
    delta2: float = 0.2
    # Loss mix. The paper writes gamma * L_RR + (1 - gamma) * L_WCE; the released code
    # uses L_WCE + L_RR. scn_scale.loss computes 2 * (gamma * RR + (1 - gamma) * WCE), so
    # 0.5 reproduces the released code exactly.
    gamma: float = 0.5
    # First epoch (1-based, as everywhere in this project) at which relabeling runs
    # (paper and released code: 10). After the warm-up, if there is one.
    relabel_epoch: int = 10
    # Epochs of plain cross-entropy before SCN proper: the importance branch is held at
    # alpha = 1 (no gradient) and the rank loss is off, so the network first fits the clean
    # majority. A deviation from the released code, which starts from a face-recognition
    # ResNet-18 that already separates faces; from random weights, SCN's alpha collapses
    # towards 0 early, scales the logits and their gradients down, and relabeling then acts
    # on a model near chance. 0 = the released code.
    warmup_epochs: int = 0
    # "all": every sample of the batch may be relabeled (released code); "low": only the
    # low-importance group (paper). "all" measured better on 30% synthetic noise
    # (83.1% vs 80.4% clean-test accuracy, docs/scn_method.md).
    relabel_scope: Literal["all", "low"] = "all"
    # "local": rank alpha within each rank's batch; "global": within the batch gathered
    # from every rank (the paper ranked its batch of 1024 as one).
    rank_scope: Literal["local", "global"] = "local"

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
        if self.warmup_epochs < 0:
            raise ConfigError(f"scn.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.relabel_epoch <= self.warmup_epochs:
            raise ConfigError(
                f"scn.relabel_epoch ({self.relabel_epoch}) must come after the warm-up's "
                f"{self.warmup_epochs} epochs: relabeling needs the importance weights SCN learns after it"
            )


@dataclass
class ModelConfig:
    # ResNet-18 as in the paper and the released code.
    backbone: str = "resnet18"
    # Dropout on the pooled feature; the released code's default is 0.
    dropout: float = 0.0

    def validate(self) -> None:
        _check_types(self, "model.")
        if self.backbone not in BACKBONES:
            raise ConfigError(f"model.backbone must be one of {list(BACKBONES)}, got {self.backbone!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class ReaderConfig:
    """How the training reader mixes a shard set, whatever order it was written in (shards.reader)."""

    # Samples each loader worker holds, undecoded, and draws from at random. Memory is this
    # times the bytes of a sample: 5,000 x 4-30 KB (112-224 px JPEG crops) = 20-150 MB per
    # loader worker. OpenCLIP keeps 5,000.
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
    # Pieces of shards (runs of consecutive samples) each loader worker reads at once, round
    # robin. A piece of a class-sorted set holds one or two classes; 16 pieces give a batch of
    # 32 about 7 of 8 classes (tests/test_mixing.py). At most this many shards are open per worker.
    interleave: int = DEFAULT_INTERLEAVE

    def validate(self) -> None:
        _check_types(self, "reader.")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"reader.shuffle_buffer must be >= 0 (0: no buffer), got {self.shuffle_buffer}")
        if self.interleave < 1:
            raise ConfigError(f"reader.interleave must be >= 1, got {self.interleave}")


@dataclass
class TrainConfig:
    """The training job (`python -m scn_scale.train`). Defaults: the released code's RAF-DB recipe."""

    train_shards: str = ""
    val_shards: str = ""
    epochs: int = 70  # released code
    batch_size: int = 64  # per rank; released code (one GPU)
    image_size: int = 224  # released code resizes RAF-DB's 100x100 crops to 224
    num_workers: int = 1  # Ray Train workers (ranks)
    loader_workers: int = 2  # DataLoader workers per rank
    # Ray CPUs reserved per rank, which Ray also gives torch as its thread count. On GPU nodes,
    # reserve the rank's loader workers too, or Ray packs other work onto the cores they decode on.
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    method: Literal["scn", "baseline"] = "scn"  # baseline: plain CE, no weighting or relabeling
    seed: int = 0
    out_dir: str = "runs"  # storage path: a local directory or a URL
    run_name: str = "scn"
    init: str = ""  # weights file to start from (scn_scale.weights layouts); "" = random init
    allow_partial_init: bool = False
    deepspeed: str | dict = ""  # a DeepSpeed config file path or an inline dict
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"  # released code: Adam
    lr: float = 1e-3  # released code
    weight_decay: float = 1e-4  # released code
    momentum: float = 0.9  # SGD only; the released code's SGD alternative
    lr_decay: float = 0.9  # exponential, per epoch; released code
    grad_accum: int = 1
    precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: bool = False
    label_overrides: str = ""  # parquet written by scn_scale.noise
    balanced_sampler: bool = False  # class-balanced sampling (the AffectNet recipe)
    fail_at: str = ""  # fault injection for tests, e.g. "epoch=1,step=2,rank=1"
    max_failures: int = 1  # Ray Train FailureConfig
    address: str = ""  # Ray cluster address; "" = RAY_ADDRESS or a local cluster
    scn: SCNConfig = field(default_factory=SCNConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    reader: ReaderConfig = field(default_factory=ReaderConfig)

    def validate(self) -> None:
        _check_types(self, "")
        for name in ("epochs", "batch_size", "image_size", "num_workers", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("loader_workers", "max_failures"):
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
        for part in filter(None, self.fail_at.split(",")):
            name, sep, value = part.partition("=")
            if not (sep and name.strip() and value.strip().lstrip("-").isdigit()):
                raise ConfigError(f"fail_at must be comma-separated name=integer pairs, got {self.fail_at!r}")
        self.scn.validate()
        self.model.validate()
        self.reader.validate()


def load_config(cls: type[T], path: str | None, overrides: Sequence[str]) -> T:
    """Build `cls` from its defaults, then the YAML file at `path` (if any), then `key=value` overrides.

    Overrides use dotted keys for nested dataclasses (`scn.delta1=0.1`); each value is
    parsed as YAML and checked against the field's type, except that a field accepting a
    string keeps the literal text when the parsed value does not fit (`run_name=2024`).
    The result is validated (`validate()`) when the class defines it.
    """
    cfg = cls()
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
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
    result: dict[str, str] = {}
    for item in argv:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        result[key.strip()] = text
    return result


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
    value = yaml.safe_load(text) if text.strip() else None
    if dataclasses.is_dataclass(tp):
        return _update(obj, {key: value}, prefix)
    try:
        return dataclasses.replace(obj, **{key: _coerce(value, tp, prefix + key)})
    except ConfigError:
        if not _accepts_str(tp):
            raise
        return dataclasses.replace(obj, **{key: _coerce(text, tp, prefix + key)})


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
