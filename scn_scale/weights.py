"""Loading pretrained weights with explicit name maps and a report of exactly what loaded.

The released SCN code loaded its MS-Celeb checkpoint with strict=False into differently
named layers: nothing loaded and the log said it had. Here every supported layout has
an explicit map from file names to model names, and loading fails when the backbone is
not fully covered, or when nothing matches at all.

Layouts:
- "torchvision": an ImageNet state dict (`conv1.weight`, `layer1.0...`, `fc.*`); the
  ImageNet `fc` is not the expression classifier and is left out. `torchvision:<backbone>`
  names torchvision's own ImageNet weights for a backbone, fetched through its weights API.
- "msceleb": the SCN authors' face-recognition checkpoint, `{"state_dict": {...}}` with
  `module.`-prefixed torchvision names and extra layers (`module.feature.*`, `module.fc.*`)
  that the model does not have.
- "scn-scale": this project's own model file (`save_model_file`), classes by name.

Files ending in `.safetensors` hold the same things without pickle: the tensors, and this
project's fields (backbone, classes, extra) as JSON in the header's metadata; a
safetensors file of plain torchvision names loads in the torchvision layout.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import fsspec
import safetensors.torch
import torch
import torchvision
from safetensors import SafetensorError
from torch import Tensor

from scn_scale.config import BACKBONES, TORCHVISION_INIT
from scn_scale.model import SCNModel
from shards.atomic import atomic_path

log = logging.getLogger(__name__)

FORMAT = "scn-scale-model"
VERSION = 1
CLASSIFIER = ("classifier.weight", "classifier.bias")
SAFETENSORS = ".safetensors"
#: The safetensors metadata key holding this project's fields as JSON.
SAFETENSORS_KEY = "scn_scale"


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
) -> None:
    """Write the plain model file: loadable with weights_only=True, without DeepSpeed or Ray.

    A path ending in `.safetensors` gets a safetensors file (no pickle at all; `extra` must
    then be JSON); any other path a torch.save file, whose `extra` may hold plain types
    (numbers, strings, lists, dicts, tensors). Floating-point tensors are stored in fp32 whatever
    precision trained them, contiguous whatever memory format trained them.
    """
    if len(classes) != model.num_classes:
        raise ValueError(f"{len(classes)} class names for a model with {model.num_classes} outputs")
    state = {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fields = {"backbone": model.backbone_name, "classes": list(classes), "extra": dict(extra or {})}
    with atomic_path(path) as tmp:
        if str(path).endswith(SAFETENSORS):
            try:
                header = json.dumps({"version": VERSION, **fields})
            except TypeError as e:
                raise ValueError(f"{path}: a safetensors file keeps extra as JSON: {e}") from e
            safetensors.torch.save_file(state, str(tmp), metadata={"format": FORMAT, SAFETENSORS_KEY: header})
        else:
            torch.save({"format": FORMAT, "version": VERSION, **fields, "state_dict": state}, tmp)


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
    named = path[len(TORCHVISION_INIT):] if path.startswith(TORCHVISION_INIT) else None
    if named in BACKBONES and named != model.backbone_name:  # caught before a download of the wrong weights
        raise WeightLoadError(
            f"{path} is for backbone {named!r} but the model's is {model.backbone_name!r}: "
            f"use {TORCHVISION_INIT}{model.backbone_name}, or set model.backbone"
        )
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


def _torchvision_weights(spec: str) -> dict[str, Tensor]:
    """torchvision's ImageNet weights for `torchvision:<backbone>`, through torchvision's weights API.

    torchvision keeps them in the torch hub cache (`$TORCH_HOME/hub/checkpoints/`, named as in
    their URL, e.g. resnet18-f37072fd.pth) and downloads them there first where there is
    internet; a cached file is used as it is, offline. The sha256 prefix in the file name is
    checked on download only (torch.hub), so a copied-in file is trusted as it stands.
    """
    name = spec[len(TORCHVISION_INIT):]
    if name not in BACKBONES:
        offered = ", ".join(TORCHVISION_INIT + b for b in BACKBONES)
        raise WeightLoadError(f"{spec}: torchvision weights are offered for {offered}")
    weights = torchvision.models.get_model_weights(name).DEFAULT
    cached = f"{torch.hub.get_dir()}/checkpoints/{weights.url.rsplit('/', 1)[-1]}"
    try:
        state = weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except (OSError, RuntimeError) as e:  # no network (URLError is an OSError), or a download with a wrong hash
        raise WeightLoadError(
            f"{spec}: torchvision's {weights} is not in the torch hub cache ({cached}) and could not be downloaded "
            f"({e}); where there is no internet, copy the file there from a machine that has it"
        ) from e
    log.info("%s: torchvision's %s from %s", spec, weights, cached)
    return state


def _read_safetensors(path: str) -> dict[str, Any]:
    """A safetensors file as `_read` returns a torch file: this project's layout when its metadata says so,
    else a plain name -> tensor dict."""
    with fsspec.open(path, "rb") as f:
        data = f.read()
    try:
        tensors = safetensors.torch.load(data)
    except SafetensorError as e:
        raise WeightLoadError(f"{path} is not a readable safetensors file: {e}") from e
    # The format: an 8-byte little-endian header length, then the JSON header with its metadata.
    metadata = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}
    if metadata.get("format") != FORMAT:
        return tensors
    return {"format": FORMAT, **json.loads(metadata[SAFETENSORS_KEY]), "state_dict": tensors}


def _read(path: str) -> Any:
    """Weights from a local path or a URL (s3://, gs://: runs keep their checkpoints in object storage),
    a safetensors file, or torchvision's own (`torchvision:<backbone>`)."""
    if path.startswith(TORCHVISION_INIT):
        return _torchvision_weights(path)
    if path.endswith(SAFETENSORS):
        return _read_safetensors(path)
    try:
        with fsspec.open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except OSError:  # missing or unreadable: its own error names the file
        raise
    except Exception as e:  # torch raises many types for bytes that are no torch file (IndexError among them)
        raise WeightLoadError(load_error(path, e)) from e


def load_error(path: str, exc: BaseException) -> str:
    """Why `torch.load(path, weights_only=True)` failed, in words that fit the file.

    torch says the same thing for a file of garbage and for a pickle naming a class it
    does not allow ("Re-running with weights_only=False will likely succeed"), which is
    wrong for the first and advises running the file's code for the second.
    """
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    if found:
        return (f"{path} holds a Python object ({found.group(1)}) that a weights-only load does not build: "
                "it is not a plain weights file")
    return f"{path} is not a readable model file (not written by torch.save, or truncated or damaged)"


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
