"""`python -m scn_scale.predict --checkpoint C [--faces mtcnn|haar|none] PATH...`: expressions of images.

Raw photos go through the crawler's face stage first (`crawler.faces`, the one place
faces are detected and aligned, so inference sees crops made exactly as the training
crops were), giving one prediction per face. With `--faces none` the images are taken
as aligned face crops and go straight in, as benchmark crops do. Each prediction holds
the class, the probabilities (softmax of the unscaled logits; alpha > 0 leaves the
argmax unchanged) and alpha, the model's importance weight (low: an uncertain face).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from scn_scale.data import eval_transform
from scn_scale.evaluate import CHECKPOINT_HELP, IMAGE_SIZE_HELP, load_checkpoint, trained_image_size
from scn_scale.model import SCNModel

log = logging.getLogger(__name__)

FACE_MODES = ("mtcnn", "haar", "none")


@dataclass
class Prediction:
    path: str
    face: int | None  # index of the face in the photo; None for an image taken as a crop
    box: list[float] | None  # x1, y1, x2, y2 in the photo
    label: str
    probs: dict[str, float]
    alpha: float


@torch.no_grad()
def classify(
    model: SCNModel, classes: Sequence[str], crops: Sequence[Image.Image], image_size: int
) -> list[tuple[str, dict[str, float], float]]:
    """(class, probabilities by class, alpha) for each face crop."""
    if not crops:
        return []
    transform = eval_transform(image_size)
    batch = torch.stack([transform(c.convert("RGB")) for c in crops])
    device = next(model.parameters()).device
    out = model.eval()(batch.to(device))
    probs = out.logits.float().softmax(1).cpu()
    results = []
    for p, a in zip(probs, out.alpha.float().cpu()):
        results.append((classes[int(p.argmax())], {c: float(v) for c, v in zip(classes, p)}, float(a)))
    return results


def predict_paths(
    model: SCNModel, classes: Sequence[str], paths: Sequence[str | Path], image_size: int, faces: str = "mtcnn"
) -> list[Prediction]:
    """Predictions for every face of every photo (or every image itself with faces="none")."""
    if faces not in FACE_MODES:
        raise ValueError(f"faces must be one of {FACE_MODES}, got {faces!r}")
    stage = None
    if faces != "none":
        from crawler.faces import FaceConfig, FaceStage  # the one import from crawler (architecture.md)

        stage = FaceStage(FaceConfig(mode=faces, crop_size=max(16, image_size))).load()
    predictions = []
    for path in paths:
        with Image.open(path) as im:
            image = im.convert("RGB")
        if stage is None:
            (label, probs, alpha), = classify(model, classes, [image], image_size)
            predictions.append(Prediction(str(path), None, None, label, probs, alpha))
            continue
        found = stage(image)
        if not found:
            log.warning("%s: no face found", path)
        results = classify(model, classes, [f.crop for f in found], image_size)
        for i, (face, (label, probs, alpha)) in enumerate(zip(found, results)):
            predictions.append(Prediction(str(path), i, [float(v) for v in face.box], label, probs, alpha))
    return predictions


def _line(p: Prediction) -> str:
    where = p.path if p.face is None else f"{p.path} face {p.face} at ({', '.join(f'{v:.0f}' for v in p.box or [])})"
    ranked = sorted(p.probs.items(), key=lambda kv: -kv[1])
    return f"{where}: {p.label} " + " ".join(f"{c}={v:.3f}" for c, v in ranked) + f" alpha={p.alpha:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scn_scale.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    parser.add_argument("--faces", choices=FACE_MODES, default="mtcnn",
                        help="face detector for raw photos; none: the images are aligned face crops")
    parser.add_argument("--image-size", type=int, default=0, help=IMAGE_SIZE_HELP)
    parser.add_argument("--json", action="store_true", help="one JSON object per prediction")
    parser.add_argument("paths", nargs="+", metavar="PATH")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    model, classes, extra, _ = load_checkpoint(args.checkpoint)
    image_size = args.image_size or trained_image_size(extra)
    for p in predict_paths(model, classes, args.paths, image_size, args.faces):
        print(json.dumps(asdict(p)) if args.json else _line(p))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
