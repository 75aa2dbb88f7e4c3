"""Loading pretrained weights with explicit name maps and a report of exactly what loaded.

The released SCN code loaded its MS-Celeb checkpoint with strict=False into differently
named layers: nothing loaded and the log said it had. Here every supported layout has
an explicit map from file names to model names, and loading fails when the backbone is
not fully covered, or when nothing matches at all.

Layouts:
- "torchvision": an ImageNet state dict (`conv1.weight`, `layer1.0...`, `fc.*`); the
  ImageNet `fc` is not the expression classifier and is left out.
- "msceleb": the SCN authors' face-recognition checkpoint, `{"state_dict": {...}}` with
  `module.`-prefixed torchvision names and extra layers (`module.feature.*`, `module.fc.*`)
  that the model does not have.
- "scn-scale": this project's own model file (`save_model_file`), classes by name.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import fsspec
import torch
from torch import Tensor

from scn_scale.model import SCNModel
from shards.atomic import atomic_path

log = logging.getLogger(__name__)

FORMAT = "scn-scale-model"
VERSION = 1
CLASSIFIER = ("classifier.weight", "classifier.bias")


class WeightLoadError(ValueError):
    """A weights file cannot be loaded into the model as asked."""


@dataclass
class LoadReport:
    source: str
    layout: str  # "torchvision" | "msceleb" | "scn-scale"
    loaded: list[str] = field(default_factory=list)  # model tensor names that received a file tensor
    missing: list[str] = field(default_factory=list)  # model tensor names left as they were
    unexpected: list[str] = field(default_factory=list)  # file tensor names the model has no place for
    mismatched: list[str] = field(default_factory=list)  # "name: file shape vs model shape"
    classifier_rows: dict[str, str] = field(default_factory=dict)  # target class -> source class

    def summary(self) -> str:
        lines = [
            f"{self.source} ({self.layout} layout): {len(self.loaded)} tensors loaded, {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.mismatched)} shape-mismatched"
        ]
        for title, names in (("missing", self.missing), ("unexpected", self.unexpected), ("mismatched", self.mismatched)):
            if names:
                lines.append(f"  {title}: {', '.join(names)}")
        if self.classifier_rows:
            lines.append(f"  classifier rows carried over: {', '.join(self.classifier_rows)}")
        return "\n".join(lines)


def save_model_file(
    path: str,
    model: SCNModel,
    classes: Sequence[str],
    extra: dict | None = None,
    tensors: Mapping[str, Tensor] | None = None,
) -> None:
    """Write the plain model file: loadable with weights_only=True, without DeepSpeed or Ray.

    `extra` must hold only plain types (numbers, strings, lists, dicts, tensors).
    `tensors` replace the model's own by name (a bf16 engine's fp32 master weights).
    Floating-point tensors are stored in fp32 whatever precision trained them.
    """
    if len(classes) != model.num_classes:
        raise ValueError(f"{len(classes)} class names for a model with {model.num_classes} outputs")
    state = {**model.state_dict(), **(tensors or {})}
    obj = {
        "format": FORMAT,
        "version": VERSION,
        "backbone": model.backbone_name,
        "classes": list(classes),
        "state_dict": {k: (v.float() if v.is_floating_point() else v).detach().cpu() for k, v in state.items()},
        "extra": dict(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_model_file(path: str) -> tuple[SCNModel, list[str], dict]:
    """Build the model a model file describes and load it exactly. Returns (model, classes, extra).

    The model comes back in training mode, as built; call `.eval()` for inference.
    """
    obj = _read(path)
    if _layout(obj, path) != "scn-scale":
        raise WeightLoadError(f"{path} is not an scn-scale model file")
    model = SCNModel(len(obj["classes"]), backbone=obj["backbone"])
    model.load_state_dict(obj["state_dict"])
    return model, list(obj["classes"]), dict(obj["extra"])


def load_weights(
    model: SCNModel, path: str, classes: Sequence[str] | None = None, allow_partial: bool = False
) -> LoadReport:
    """Load the tensors of `path` that the model has, by an explicit name map; report the rest.

    `classes` names the model's outputs; for an scn-scale file whose class list differs,
    classifier rows are carried over by class name (8-class pretraining -> 7-class
    benchmark), and classes the file lacks keep their fresh initialization. Without
    `classes`, the classifier loads only when its shape matches. Raises WeightLoadError
    when no tensor matches, and, unless `allow_partial`, when a backbone tensor
    (BatchNorm's `num_batches_tracked` counters aside) is missing or mismatched.
    """
    if classes is not None and len(classes) != model.num_classes:
        raise WeightLoadError(f"{len(classes)} class names for a model with {model.num_classes} outputs")
    obj = _read(path)
    layout = _layout(obj, path)
    if layout == "torchvision":
        source = obj
        name_map = {f"backbone.{k}": k for k in source}
    elif layout == "msceleb":
        source = obj["state_dict"]
        name_map = {f"backbone.{k.removeprefix('module.')}": k for k in source}
    else:
        source = obj["state_dict"]
        name_map = {k: k for k in source}

    report = LoadReport(source=str(path), layout=layout)
    target = model.state_dict()
    tensors: dict[str, Tensor] = {}
    carry_rows = layout == "scn-scale" and classes is not None and list(classes) != list(obj["classes"])
    if carry_rows:
        tensors.update(_carry_rows(model, source, list(obj["classes"]), list(classes), report))
    for name, src_name in name_map.items():
        tensor = source[src_name]
        if name not in target:
            report.unexpected.append(src_name)
        elif carry_rows and name in CLASSIFIER:
            continue
        elif tensor.shape != target[name].shape:
            report.mismatched.append(f"{name}: {tuple(tensor.shape)} vs {tuple(target[name].shape)}")
        else:
            tensors[name] = tensor
    if layout == "scn-scale" and not carry_rows and "classifier.weight" in tensors:
        report.classifier_rows = {c: c for c in obj["classes"]}
    report.unexpected.sort()
    report.mismatched.sort()
    report.loaded = sorted(tensors)
    report.missing = sorted(k for k in target if k not in tensors)

    if not tensors:
        raise WeightLoadError(
            f"no tensor of {path} matches the model ({layout} layout, {len(source)} tensors in the file, "
            f"e.g. {sorted(source)[:3]}; the model's are named like {sorted(target)[:3]})"
        )
    uncovered = [
        n for n in report.missing if n.startswith("backbone.") and not n.endswith("num_batches_tracked")
    ]
    if uncovered and not allow_partial:
        raise WeightLoadError(
            f"{path} does not cover the backbone: {len(uncovered)} tensors missing or mismatched: "
            f"{', '.join(uncovered)}" + (f"; shape mismatches: {', '.join(report.mismatched)}" if report.mismatched else "")
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            target[name].copy_(tensor)
    log.info("%s", report.summary())
    return report


def _carry_rows(
    model: SCNModel, source: dict[str, Tensor], source_classes: list[str], classes: list[str], report: LoadReport
) -> dict[str, Tensor]:
    """Classifier weight and bias with rows taken from the file for every class both lists name."""
    weight, bias = (model.state_dict()[n].clone() for n in CLASSIFIER)
    src_weight, src_bias = (source[n] for n in CLASSIFIER)
    if src_weight.shape[1] != weight.shape[1]:
        report.mismatched.append(f"classifier.weight: {tuple(src_weight.shape)} vs {tuple(weight.shape)}")
        return {}
    for i, name in enumerate(classes):
        if name in source_classes:
            j = source_classes.index(name)
            weight[i], bias[i] = src_weight[j], src_bias[j]
            report.classifier_rows[name] = name
    if not report.classifier_rows:
        return {}
    return dict(zip(CLASSIFIER, (weight, bias)))


def _read(path: str) -> Any:
    """A weights file from a local path or a URL (s3://, gs://: runs keep their checkpoints in object storage)."""
    try:
        with fsspec.open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightLoadError(f"{path} cannot be loaded with weights_only=True (it holds more than tensors and plain types): {e}") from e


def _layout(obj: Any, path: str) -> str:
    if not isinstance(obj, dict):
        raise WeightLoadError(f"{path}: expected a dict, got {type(obj).__name__}")
    if obj.get("format") == FORMAT:
        if obj.get("version") != VERSION:
            raise WeightLoadError(f"{path}: scn-scale model file version {obj.get('version')} is not supported (expected {VERSION})")
        return "scn-scale"
    if isinstance(obj.get("state_dict"), dict):
        return "msceleb"
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        return "torchvision"
    raise WeightLoadError(f"{path}: unrecognized weights file layout; top-level keys: {sorted(map(str, obj))[:10]}")
