"""`python -m scn_scale.export --checkpoint C --out model.onnx`: the inference model as ONNX.

Input `image`: a float32 batch [N, 3, H, W], normalized as `scn_scale.data.eval_transform`
does (ImageNet mean and std); the batch dimension is dynamic. Outputs `logits` [N, C]
(unscaled: their argmax is the class) and `alpha` [N] (the importance weight). The class
names, input size and normalization are stored in the file's metadata. The export is
checked against PyTorch with onnxruntime before it is kept.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from scn_scale.data import IMAGENET_MEAN, IMAGENET_STD
from scn_scale.evaluate import CHECKPOINT_HELP, load_checkpoint, trained_image_size
from scn_scale.model import SCNModel
from shards.atomic import atomic_path

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


def export_onnx(model: SCNModel, classes: Sequence[str], path: str | Path, image_size: int, opset: int = 18) -> Path:
    """Write the ONNX file atomically, with metadata, after `check_onnx` passes on it."""
    onnx, _ = _onnx_modules()
    path = Path(path)
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scn_scale.export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--image-size", type=int, default=0, help="example input size (default: the training size)")
    parser.add_argument("--opset", type=int, default=18)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model, classes, extra, model_file = load_checkpoint(args.checkpoint)
    image_size = args.image_size or trained_image_size(extra)
    export_onnx(model, classes, args.out, image_size, args.opset)
    print(f"{model_file} -> {args.out} (inputs image [N, 3, {image_size}, {image_size}]; outputs logits, alpha; "
          f"classes {', '.join(classes)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
