"""`python -m scn_scale.export --checkpoint C --out OUT [--format onnx|safetensors]`: the model for inference or publishing.

ONNX (`--out model.onnx`): input `image`, a float32 batch [N, 3, H, W] normalized as
`scn_scale.data.eval_transform` does (ImageNet mean and std), the batch dimension
dynamic; outputs `logits` [N, C] (unscaled: their argmax is the class) and `alpha` [N]
(the importance weight). The class names, input size and normalization are stored in the
file's metadata. The export is checked against PyTorch with onnxruntime before it is kept.

safetensors (`--out DIR`): `DIR/model.safetensors` (the model file without pickle; it loads
with `scn_scale.weights.load_model_file` and as `init=` of a training run) and
`DIR/README.md`, a model card in the Hugging Face Hub's format with the classes, the
training config, the run's metrics and the load recipes, so DIR can be uploaded as a
model repository as it is.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from scn_scale.checkpoint import CONFIG_FILE, CheckpointError, read_metrics
from scn_scale.data import IMAGENET_MEAN, IMAGENET_STD
from scn_scale.evaluate import CHECKPOINT_HELP, find_run_dir, load_checkpoint, trained_image_size
from scn_scale.model import SCNModel
from scn_scale.weights import SAFETENSORS_KEY, WeightLoadError, save_model_file
from shards.atomic import atomic_path, write_text
from shards.cli import ArgumentParser, add_log_level, bad_input, configure_logging
from shards.fs import is_dir, is_file, join, open_fs

log = logging.getLogger(__name__)

INSTALL = "pip install 'scn-scale[export]' (onnx, onnxruntime, onnxscript)"
TOLERANCE = 1e-4


class InferenceModel(nn.Module):
    """The SCN model with plain tensor outputs (logits, alpha) for export."""

    def __init__(self, model: SCNModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(image)
        return out.logits, out.alpha


def _onnx_modules():
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ImportError(f"ONNX export needs onnx and onnxruntime: {INSTALL} ({exc})") from exc
    return onnx, onnxruntime


def export_onnx(model: SCNModel, classes: Sequence[str], path: str | Path, image_size: int, opset: int = 18) -> str:
    """Write the ONNX file (a path or an object-store URL) atomically, with metadata, after `check_onnx` passes on it."""
    onnx, _ = _onnx_modules()
    path = str(path)
    wrapper = InferenceModel(model).eval()
    example = torch.randn(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1)
    with atomic_path(path) as tmp:
        program = torch.onnx.export(
            wrapper,
            (example,),
            input_names=["image"],
            output_names=["logits", "alpha"],
            dynamic_shapes={"image": {0: batch}},
            opset_version=opset,
            dynamo=True,
        )
        program.save(str(tmp))
        proto = onnx.load(str(tmp))
        metadata = {
            "classes": json.dumps(list(classes)),
            "image_size": str(image_size),
            "mean": json.dumps(list(IMAGENET_MEAN)),
            "std": json.dumps(list(IMAGENET_STD)),
        }
        for key, value in metadata.items():
            proto.metadata_props.add(key=key, value=value)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        error = check_onnx(model, tmp, image_size)
        log.info("exported %s: max difference to PyTorch %.2e", path, error)
    return path


@torch.no_grad()
def check_onnx(model: SCNModel, path: str | Path, image_size: int, batch_sizes: Sequence[int] = (1, 3)) -> float:
    """Largest absolute difference between onnxruntime's and PyTorch's outputs over a few batch
    sizes; raises when it exceeds TOLERANCE."""
    _, ort = _onnx_modules()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = model.eval()
    worst = 0.0
    generator = torch.Generator().manual_seed(0)
    for n in batch_sizes:
        x = torch.randn(n, 3, image_size, image_size, generator=generator)
        expected = model(x)
        logits, alpha = session.run(["logits", "alpha"], {"image": x.numpy()})
        for got, want in ((logits, expected.logits), (alpha, expected.alpha)):
            if got.shape != tuple(want.shape):
                raise ValueError(f"{path}: output shape {got.shape}, PyTorch gives {tuple(want.shape)}")
            worst = max(worst, float(np.abs(got - want.numpy()).max()))
    if worst > TOLERANCE:
        raise ValueError(f"{path}: onnxruntime differs from PyTorch by {worst:.2e} (> {TOLERANCE})")
    return worst


SAFETENSORS_FILE = "model.safetensors"
CARD_FILE = "README.md"


def _metrics_section(model_file: str) -> str:
    """The training run's last and best epoch, from the metrics.jsonl above the checkpoint."""
    run = find_run_dir(model_file)
    metrics = read_metrics(run) if run else []
    if not metrics:
        return "No training metrics were found beside the checkpoint (its run's metrics.jsonl).\n"
    last = metrics[-1]
    best = max(metrics, key=lambda m: m["val_accuracy"])
    rows = [("last", last), ("best (selected on the validation set)", best)]
    lines = ["| epoch | | validation accuracy | validation mean class accuracy | train accuracy |", "|---|---|---|---|---|"]
    lines += [f"| {m['epoch']} | {which} | {m['val_accuracy']:.4f} | {m['val_mean_class_accuracy']:.4f} | "
              f"{m['train_accuracy']:.4f} |" for which, m in rows]
    intro = f"From `{run}`, {len(metrics)} epochs; accuracy on the run's validation set (`val_shards` below)."
    return intro + "\n\n" + "\n".join(lines) + "\n"


def _config_text(model_file: str) -> str:
    fs, path = open_fs(join(model_file.rsplit("/", 1)[0], CONFIG_FILE))
    if not fs.isfile(path):
        return "# no config.yaml beside the model file\n"
    with fs.open(path, "r") as f:
        return f.read()


def model_card(model: SCNModel, classes: Sequence[str], extra: dict, model_file: str, image_size: int) -> str:
    """README.md for a Hugging Face Hub model repository: metadata header, classes, metrics, config, load recipes."""
    class_rows = "\n".join(f"| {i} | {name} |" for i, name in enumerate(classes))
    mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    return f"""---
pipeline_tag: image-classification
library_name: pytorch
tags:
- facial-expression-recognition
- self-cure-network
- scn-scale
- safetensors
metrics:
- accuracy
---

# SCN facial-expression classifier ({model.backbone_name}, {len(classes)} classes)

A Self-Cure Network (Wang et al., "Suppressing Uncertainties for Large-Scale Facial Expression
Recognition", CVPR 2020) trained with scn-scale: a torchvision
{model.backbone_name} trunk, a linear classifier over the classes below and an importance branch
(alpha, used in training only). Exported from `{model_file}` (epoch {extra.get("epoch", "?")}).
Set a `license:` in the header above before publishing: it depends on the data the model was
trained on.

## Input and output

Aligned face crops (scn-scale's crawler aligns 5 landmarks to the standard 112-pixel template),
RGB, resized to {image_size}x{image_size}, scaled to [0, 1] and normalized with mean {mean} and
std {std}. The output is one logit per class; the argmax is the expression.

## Classes

| index | class |
|---|---|
{class_rows}

## Metrics

{_metrics_section(model_file)}
## Training config

```yaml
{_config_text(model_file).rstrip()}
```

## Load with scn-scale

```python
from scn_scale.weights import load_model_file

model, classes, extra = load_model_file("{SAFETENSORS_FILE}")
model.eval()  # model(images).logits: [N, {len(classes)}]
```

Fine-tune from it: `python -m scn_scale.train --config FILE --set init={SAFETENSORS_FILE} ...`
(classifier rows are carried over by class name).

## Load without scn-scale

With torch, torchvision and safetensors only:

```python
import json

import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file

path = "{SAFETENSORS_FILE}"
with safe_open(path, "pt") as f:
    info = json.loads(f.metadata()["{SAFETENSORS_KEY}"])  # backbone, classes, extra
state = load_file(path)
trunk = getattr(torchvision.models, info["backbone"])(weights=None)
trunk.fc = torch.nn.Identity()
trunk.load_state_dict({{k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}})
classifier = torch.nn.Linear(state["classifier.weight"].shape[1], len(info["classes"]))
classifier.load_state_dict({{"weight": state["classifier.weight"], "bias": state["classifier.bias"]}})
model = torch.nn.Sequential(trunk, classifier).eval()
# images: float [N, 3, {image_size}, {image_size}], normalized as above
logits = model(images)
labels = [info["classes"][i] for i in logits.argmax(1).tolist()]
```

## Publish

`hf upload YOUR-NAME/YOUR-MODEL .` from this directory (huggingface_hub's command line).
"""


def export_safetensors(model: SCNModel, classes: Sequence[str], extra: dict, model_file: str, out: str | Path,
                       image_size: int) -> str:
    """Write `out/model.safetensors` and its model card `out/README.md` (`out` a directory or an object-store
    URL); returns the model file's path."""
    path = join(str(out), SAFETENSORS_FILE)
    save_model_file(path, model, classes, extra)
    write_text(join(str(out), CARD_FILE), model_card(model, classes, extra, model_file, image_size))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m scn_scale.export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    parser.add_argument("--out", required=True, help="the .onnx file, or the directory for --format safetensors "
                                                     "(a path or an object-store URL, s3://..., gs://...)")
    parser.add_argument("--format", choices=("onnx", "safetensors"), default="onnx",
                        help="onnx (default): an inference graph; safetensors: weights plus a model card")
    parser.add_argument("--image-size", type=int, default=0, help="input size (default: the training size)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (onnx only)")
    add_log_level(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_level, "%(levelname)s %(name)s: %(message)s")
    out = args.out
    try:
        if args.image_size < 0:
            raise ValueError(f"--image-size must be >= 0 (0: the training size), got {args.image_size}")
        if args.format == "onnx" and is_dir(out):
            raise ValueError(f"--out {out} is a directory; name the .onnx file to write")
        if args.format == "safetensors" and is_file(out):
            raise ValueError(f"--out {out} is a file; --format safetensors writes a directory")
        if args.format == "onnx":
            _onnx_modules()  # missing packages are reported before the model is loaded
    except (ValueError, ImportError) as e:
        return bad_input(e)
    try:
        model, classes, extra, model_file = load_checkpoint(args.checkpoint)
    except (CheckpointError, WeightLoadError, OSError) as e:
        return bad_input(e, "--checkpoint")
    log.info("loaded %s (classes %s, epoch %s)", model_file, classes, extra.get("epoch"))
    image_size = args.image_size or trained_image_size(extra)
    if args.format == "safetensors":
        path = export_safetensors(model, classes, extra, model_file, args.out, image_size)
        print(f"{model_file} -> {path} and its model card {join(args.out, CARD_FILE)} (classes {', '.join(classes)})")
        return 0
    export_onnx(model, classes, args.out, image_size, args.opset)
    print(f"{model_file} -> {args.out} (inputs image [N, 3, {image_size}, {image_size}]; outputs logits, alpha; "
          f"classes {', '.join(classes)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
