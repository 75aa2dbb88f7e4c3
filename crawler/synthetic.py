"""The synthetic face-expression corpus: the content of the embedded web, and a RAF-DB stand-in.

Nothing here reaches the internet, so the demo and the tests need faces that behave like
real FER data in the ways SCN cares about: aligned crops, many people each seen with
several expressions (so a split by person is possible), and an intensity per image from
strong to barely-there, so that low-intensity faces are genuinely ambiguous. Everything
follows from one seed: identity i and image j each get their own generator, so any file
can be regenerated alone and the output does not depend on generation order.

    python -m crawler.synthetic --out data/corpus --per-class 250
    python -m crawler.synthetic --out data/rafdb --layout rafdb
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from crawler.synthetic_draw import Expression, Identity, render, sample_camera, sample_identity, sample_pose
from shards.atomic import write_bytes, write_json, write_text
from shards.classes import BASIC7, CANONICAL, validate_classes
from shards.cli import ArgumentParser, add_log_level, bad_input, configure_logging

log = logging.getLogger(__name__)

#: Each class at full intensity, as offsets from a neutral face (FACS-like, in template units).
FULL: dict[str, Expression] = {
    "neutral": Expression(),
    "happiness": Expression(brow_raise=0.8, upper_open=-0.3, lower_open=-0.55, lift_left=5.5, lift_right=5.5,
                            mouth_open=3.0, mouth_width=4.0, teeth=1.0, cheek=1.0),
    "sadness": Expression(brow_raise=0.5, brow_inner=4.5, brow_squeeze=1.0, upper_open=-0.35, lift_left=-4.0,
                          lift_right=-4.0, mouth_width=-1.5, lip_press=0.2, glabella=0.3),
    "surprise": Expression(brow_raise=6.5, brow_inner=1.0, upper_open=0.8, lower_open=0.2, mouth_open=10.0,
                           mouth_width=-6.0, forehead=1.0),
    "fear": Expression(brow_raise=4.0, brow_inner=3.5, brow_squeeze=1.5, upper_open=0.7, lower_open=0.1,
                       lift_left=-2.0, lift_right=-2.0, mouth_open=4.5, mouth_width=4.5, teeth=0.6,
                       forehead=0.7, glabella=0.5),
    "disgust": Expression(brow_raise=-2.5, brow_inner=-1.5, brow_squeeze=1.5, upper_open=-0.3, lower_open=-0.45,
                          lift_left=-2.0, lift_right=-2.0, mouth_open=1.0, mouth_width=-1.0, upper_lip_raise=3.0,
                          teeth=0.8, nose_wrinkle=1.0, cheek=0.6),
    "anger": Expression(brow_raise=-3.5, brow_inner=-4.5, brow_squeeze=2.5, upper_open=-0.35, lower_open=-0.25,
                        lift_left=-1.2, lift_right=-1.2, mouth_width=-2.5, lip_press=0.7, glabella=1.0),
    # Contempt is one-sided; which side is chosen per image.
    "contempt": Expression(upper_open=-0.1, lift_right=4.5, mouth_shift=1.2, lip_press=0.3),
}

#: RAF-DB basic labels count from 1 in this order.
RAFDB_LABELS: dict[str, int] = {
    "surprise": 1, "fear": 2, "disgust": 3, "happiness": 4, "sadness": 5, "anger": 6, "neutral": 7,
}
RAFDB_SIZE = 100  # the released aligned crops are 100x100


def expression_for(cls: str, intensity: float, rng: np.random.Generator) -> Expression:
    """Neutral-to-full interpolation, with per-image variation in how each person shows it."""
    full = FULL[cls]
    if cls == "contempt" and rng.integers(2):
        full = dataclasses.replace(full, lift_left=full.lift_right, lift_right=0.0, mouth_shift=-full.mouth_shift)
    style = rng.normal(1.0, 0.15, len(dataclasses.fields(Expression))).clip(0.6, 1.4)
    shown = Expression(*(v * k for v, k in zip(dataclasses.astuple(full), style)))
    micro = Expression(brow_raise=rng.normal(0, 0.4), lift_left=rng.normal(0, 0.3), lift_right=rng.normal(0, 0.3),
                       upper_open=rng.normal(0, 0.05), mouth_open=abs(rng.normal(0, 0.3)))
    return shown.scaled(intensity).plus(micro)


def generate_face(rng: np.random.Generator, cls: str, size: int = 112, intensity: float | None = None,
                  identity: Identity | None = None) -> tuple[Image.Image, dict]:
    """One aligned face of class `cls`; a new person unless `identity` is given.

    The returned dict records the class, the intensity (0 for neutral: there is nothing to
    show), the person's main traits, pose and camera; `jpeg_quality` is the quality this
    photo should be saved at (see `encode_jpeg`).
    """
    if cls not in FULL:
        raise ValueError(f"unknown class {cls!r}; known: {list(CANONICAL)}")
    if identity is None:
        identity = sample_identity(rng)
    if intensity is None:
        intensity = float(rng.uniform())
    if not 0.0 <= intensity <= 1.0:
        raise ValueError(f"intensity {intensity} is outside [0, 1]")
    intensity = 0.0 if cls == "neutral" else float(intensity)
    expression = expression_for(cls, intensity, rng)
    pose, camera = sample_pose(rng), sample_camera(rng)
    image = render(identity, expression, pose, camera, size, rng, gaze=rng.normal(0, 0.5))
    info = {
        "class": cls, "intensity": intensity, "skin": identity.skin, "hair_style": identity.hair_style,
        "hair": identity.hair, "glasses": identity.glasses, "face_w": round(identity.face_w, 2),
        "jaw": round(identity.jaw, 3), "rotation": round(pose.rotation, 2), "blur": round(float(camera.blur), 2),
        "noise": round(camera.noise, 2), "jpeg_quality": camera.jpeg_quality,
    }
    return image, info


def encode_jpeg(image: Image.Image, info: dict) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=info["jpeg_quality"])
    return buf.getvalue()


#: Largest image side drawn: a 100000 px request would otherwise ask for 30 GB of pixels per image.
MAX_SIZE = 1024


@dataclass
class CorpusConfig:
    out: str
    per_class: int = 250
    classes: list[str] | None = None  # None: all the layout's classes (8, or 7 for rafdb)
    size: int | None = None  # None: 112 for folder, 100 for rafdb like the released aligned crops
    seed: int = 0
    identities: int = 400
    intensity: Literal["uniform", "beta"] = "uniform"
    beta: tuple[float, float] = (2.0, 1.5)  # skewed to strong, with a tail to barely-there
    intensity_range: tuple[float, float] = (0.0, 1.0)
    layout: Literal["folder", "rafdb"] = "folder"
    test_fraction: float = 0.2  # rafdb only: share of images, and of identities, held out for test

    def resolved(self) -> CorpusConfig:
        """Fill the layout defaults and check everything before any image is drawn."""
        if self.layout not in ("folder", "rafdb"):
            raise ValueError(f"layout must be 'folder' or 'rafdb', not {self.layout!r}")
        classes = validate_classes(self.classes if self.classes is not None
                                   else (BASIC7 if self.layout == "rafdb" else CANONICAL))
        if not classes:
            raise ValueError("no classes to generate")
        if self.layout == "rafdb" and "contempt" in classes:
            raise ValueError("the RAF-DB basic layout has 7 classes and no contempt")
        if self.per_class < 1 or self.identities < 1:
            raise ValueError("per_class and identities must be at least 1")
        if self.intensity not in ("uniform", "beta"):
            raise ValueError(f"intensity must be 'uniform' or 'beta', not {self.intensity!r}")
        lo, hi = self.intensity_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"intensity_range {self.intensity_range} must satisfy 0 <= low <= high <= 1")
        size = self.size or (RAFDB_SIZE if self.layout == "rafdb" else 112)
        if not 16 <= size <= MAX_SIZE:
            raise ValueError(f"size {size} is outside [16, {MAX_SIZE}] pixels (a face crop: 16 draws a face, "
                             f"the project's largest crop is 224)")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ValueError(f"out {self.out} exists and is not a directory")
        if self.layout == "rafdb":
            n_test = round(self.per_class * self.test_fraction) * len(classes)
            if not 0 < self.test_fraction < 1 or self.identities < 2:
                raise ValueError("rafdb needs 0 < test_fraction < 1 and at least 2 identities")
            if n_test > 9999 or self.per_class * len(classes) - n_test > 99999:
                raise ValueError("too many images for RAF-DB names (test_NNNN, train_NNNNN)")
        return dataclasses.replace(self, classes=classes, size=size,
                                   beta=tuple(self.beta), intensity_range=(lo, hi))


def _intensity(cfg: CorpusConfig, rng: np.random.Generator) -> float:
    x = rng.uniform() if cfg.intensity == "uniform" else rng.beta(*cfg.beta)
    lo, hi = cfg.intensity_range
    return float(lo + (hi - lo) * x)


def _jobs(cfg: CorpusConfig) -> list[dict]:
    """Which image gets which class, identity and file name, decided before drawing any."""
    if cfg.layout == "folder":
        jobs = []
        for cls in cfg.classes:
            for _ in range(cfg.per_class):
                i = len(jobs)
                jobs.append({"index": i, "class": cls, "file": f"{cls}/{cls}-{i:06d}.jpg", "pool": None})
        return jobs
    # RAF-DB: persons split first, so no test face shares a person with a train face.
    people = np.random.default_rng([cfg.seed, 2]).permutation(cfg.identities)
    n_test_people = min(cfg.identities - 1, max(1, round(cfg.identities * cfg.test_fraction)))
    pools = {"test": people[:n_test_people], "train": people[n_test_people:]}
    n_test = round(cfg.per_class * cfg.test_fraction)
    plan = [(split, cls) for cls in cfg.classes
            for split in ["test"] * n_test + ["train"] * (cfg.per_class - n_test)]
    order = np.random.default_rng([cfg.seed, 3]).permutation(len(plan))
    counts: Counter[str] = Counter()
    jobs = []
    for i, p in enumerate(order):
        split, cls = plan[p]
        counts[split] += 1
        name = f"train_{counts[split]:05d}" if split == "train" else f"test_{counts[split]:04d}"
        jobs.append({"index": i, "class": cls, "file": f"Image/aligned/{name}_aligned.jpg", "name": name,
                     "split": split, "pool": pools[split]})
    return jobs


def generate_corpus(cfg: CorpusConfig) -> dict:
    """Draw and write the whole corpus; returns a summary (counts, seconds, images/s)."""
    cfg = cfg.resolved()
    out = Path(cfg.out)
    jobs = _jobs(cfg)
    identities: dict[int, Identity] = {}
    rows = []
    start = time.perf_counter()
    for job in tqdm(jobs, desc="synthetic faces", unit="img"):
        rng = np.random.default_rng([cfg.seed, 1, job["index"]])
        pool = job["pool"]
        person = int(rng.integers(cfg.identities) if pool is None else pool[rng.integers(len(pool))])
        if person not in identities:
            identities[person] = sample_identity(np.random.default_rng([cfg.seed, 0, person]))
        image, info = generate_face(rng, job["class"], cfg.size, _intensity(cfg, rng), identities[person])
        write_bytes(out / job["file"], encode_jpeg(image, info))
        row = {"file": job["file"], "class": job["class"], "intensity": f"{info['intensity']:.4f}",
               "identity": person, "seed": cfg.seed}
        if cfg.layout == "rafdb":
            row["split"] = job["split"]
        rows.append(row)
    seconds = time.perf_counter() - start
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "corpus.csv", buf.getvalue())
    if cfg.layout == "rafdb":
        lines = sorted((j["split"] != "train", j["name"], RAFDB_LABELS[j["class"]]) for j in jobs)
        write_text(out / "EmoLabel" / "list_patition_label.txt", "".join(f"{n}.jpg {label}\n" for _, n, label in lines))
    summary = {
        "out": str(out), "layout": cfg.layout, "size": cfg.size, "images": len(rows),
        "per_class": dict(Counter(r["class"] for r in rows)), "identities_used": len(identities),
        "seconds": round(seconds, 2), "images_per_s": round(len(rows) / max(seconds, 1e-9), 1),
    }
    if cfg.layout == "rafdb":
        summary["splits"] = dict(Counter(r["split"] for r in rows))
    write_json(out / "corpus.json", {"config": dataclasses.asdict(cfg), "summary": summary})
    log.info("wrote %d images to %s in %.1f s (%.1f images/s)", len(rows), out, seconds, summary["images_per_s"])
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m crawler.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--per-class", type=int, default=250)
    parser.add_argument("--image-size", "--size", dest="size", type=int, default=None, metavar="PX",
                        help="face image side in pixels (default 112 for folder, 100 for rafdb)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=["folder", "rafdb"], default="folder")
    parser.add_argument("--classes", default=None, help="comma-separated canonical names")
    parser.add_argument("--identities", type=int, default=400)
    parser.add_argument("--intensity", choices=["uniform", "beta"], default="uniform")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    add_log_level(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_level, "%(levelname)s %(name)s: %(message)s")
    cfg = CorpusConfig(
        out=args.out, per_class=args.per_class, size=args.size, seed=args.seed, layout=args.layout,
        classes=args.classes.split(",") if args.classes else None, identities=args.identities,
        intensity=args.intensity, test_fraction=args.test_fraction,
    )
    try:
        cfg = cfg.resolved()  # every check, before any file is written
    except ValueError as exc:
        return bad_input(exc)
    summary = generate_corpus(cfg)
    for cls, n in summary["per_class"].items():
        print(f"  {cls:<10} {n:>6}")
    print(f"{summary['images']} images ({summary['layout']}, {summary['size']} px) in {summary['out']}: "
          f"{summary['seconds']} s, {summary['images_per_s']} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
