"""`python -m scn_scale.predict --checkpoint C [--faces mtcnn|haar|none] PATH...`: expressions of images.

Raw photos go through the crawler's face stage first (`crawler.faces`, the one place
faces are detected and aligned, so inference sees crops made exactly as the training
crops were), giving one prediction per face. With `--faces none` the images are taken
as aligned face crops and go straight in, as benchmark crops do. Each prediction holds
the class, the probabilities (softmax of the unscaled logits; alpha > 0 leaves the
argmax unchanged) and alpha, the model's importance weight (low: an uncertain face).

A PATH may be a directory: its image files are predicted, recursively. Results are
printed as each file is done; a file that is not a readable image is skipped with a
warning and the others go on.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from scn_scale.checkpoint import CheckpointError
from scn_scale.data import eval_transform
from scn_scale.evaluate import CHECKPOINT_HELP, IMAGE_SIZE_HELP, load_checkpoint, trained_image_size
from scn_scale.model import SCNModel
from scn_scale.weights import WeightLoadError
from shards.cli import ArgumentParser, add_log_level, bad_input, configure_logging
from shards import pixels

if TYPE_CHECKING:
    from crawler.faces import FaceStage

log = logging.getLogger(__name__)

FACE_MODES = ("mtcnn", "haar", "none")
#: What a directory given as PATH is searched for (a file named directly is tried whatever its name).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


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


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """The files named, and the image files (IMAGE_SUFFIXES) under the directories named, recursively and sorted.

    A path that does not exist is kept, to be reported as unreadable where its turn comes.
    """
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(path)
    return files


def iter_predictions(
    model: SCNModel, classes: Sequence[str], files: Sequence[str | Path], image_size: int, faces: str = "mtcnn"
) -> Iterator[tuple[Path, list[Prediction] | None]]:
    """Each file with its predictions, one file at a time, so a caller can show them as they come.

    Predictions are for every face of a photo (or the image itself with faces="none"); None
    stands for a file that is not a readable image, logged as a warning: one bad file among
    many is skipped, not the end of the run. The face detector is loaded by this call, not
    at the first file, so a missing detector package raises ImportError before any output.
    """
    if faces not in FACE_MODES:
        raise ValueError(f"faces must be one of {FACE_MODES}, got {faces!r}")
    stage = None
    if faces != "none":
        from crawler.faces import FaceConfig, FaceStage  # the one import from crawler (README, "Layout")

        stage = FaceStage(FaceConfig(mode=faces, crop_size=max(16, image_size))).load()
    return _predictions(model, classes, files, image_size, stage)


def _predictions(
    model: SCNModel, classes: Sequence[str], files: Sequence[str | Path], image_size: int, stage: FaceStage | None
) -> Iterator[tuple[Path, list[Prediction] | None]]:
    """`iter_predictions` once its face stage is loaded (None: the images are face crops)."""
    for path in map(Path, files):
        try:
            pixels.image_size(path)  # a header declaring more pixels than the cap is skipped before decoding
            with Image.open(path) as im:
                image = im.convert("RGB")
        except Exception as exc:  # a missing file, a directory, and the many types Pillow raises for bad bytes
            log.warning("%s: skipped, not a readable image (%s)", path, exc)
            yield path, None
            continue
        if stage is None:
            (label, probs, alpha), = classify(model, classes, [image], image_size)
            yield path, [Prediction(str(path), None, None, label, probs, alpha)]
            continue
        found = stage(image)
        if not found:
            log.warning("%s: no face found", path)
        results = classify(model, classes, [f.crop for f in found], image_size)
        yield path, [Prediction(str(path), i, [float(v) for v in face.box], label, probs, alpha)
                     for i, (face, (label, probs, alpha)) in enumerate(zip(found, results))]


def predict_paths(
    model: SCNModel, classes: Sequence[str], paths: Sequence[str | Path], image_size: int, faces: str = "mtcnn"
) -> list[Prediction]:
    """Predictions for every face of every readable image among `paths` (files and directories)."""
    return [p for _, found in iter_predictions(model, classes, image_files(paths), image_size, faces) for p in found or []]


def _line(p: Prediction) -> str:
    where = p.path if p.face is None else f"{p.path} face {p.face} at ({', '.join(f'{v:.0f}' for v in p.box or [])})"
    ranked = sorted(p.probs.items(), key=lambda kv: -kv[1])
    return f"{where}: {p.label} " + " ".join(f"{c}={v:.3f}" for c, v in ranked) + f" alpha={p.alpha:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m scn_scale.predict", description=__doc__.splitlines()[0],
        epilog="Exit status 0 when every file was read, 1 when some were skipped (each named in a warning), "
               "2 for bad arguments or a checkpoint that does not load.",
    )
    parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    parser.add_argument("--faces", choices=FACE_MODES, default="mtcnn",
                        help="face detector for raw photos; none: the images are aligned face crops")
    parser.add_argument("--image-size", type=int, default=0, help=IMAGE_SIZE_HELP)
    parser.add_argument("--json", action="store_true", help="one JSON object per prediction")
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help=f"image files, or directories searched for them ({', '.join(IMAGE_SUFFIXES)})")
    add_log_level(parser, default="WARNING")
    args = parser.parse_args(argv)
    configure_logging(args.log_level, "%(levelname)s %(name)s: %(message)s")
    if args.image_size < 0:
        return bad_input(ValueError(f"--image-size must be >= 0 (0: the training size), got {args.image_size}"))
    files = image_files(args.paths)
    if not files:
        return bad_input(ValueError(f"no image file in {', '.join(args.paths)} ({', '.join(IMAGE_SUFFIXES)})"))
    try:
        model, classes, extra, _ = load_checkpoint(args.checkpoint)
    except (CheckpointError, WeightLoadError, OSError) as e:
        return bad_input(e, "--checkpoint")
    image_size = args.image_size or trained_image_size(extra)
    try:
        predictions = iter_predictions(model, classes, files, image_size, args.faces)
    except ImportError as e:  # the face detector's package
        return bad_input(e)
    skipped = 0
    # Every input is checked by now, so the bar (stderr, on a terminal only) never precedes an error line;
    # results go to stdout as each file is done.
    with tqdm(total=len(files), unit="file", disable=None, file=sys.stderr) as bar:
        for _, found in predictions:
            skipped += found is None
            for p in found or []:
                bar.write(json.dumps(asdict(p)) if args.json else _line(p), file=sys.stdout)
            bar.update()
    if skipped:
        log.warning("%d of %d files skipped: not readable images", skipped, len(files))
    return 1 if skipped else 0


if __name__ == "__main__":
    raise SystemExit(main())
