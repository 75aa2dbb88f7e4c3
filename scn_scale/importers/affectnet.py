"""AffectNet (manually annotated part): face crops into `out/train` and `out/val`, 7- or 8-class.

Layout (docs/benchmarks.md): `Manually_Annotated_file_lists/training.csv` (with a header
row) and `validation.csv` (without one), columns
`subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal`,
images under `Manually_Annotated_Images/`. Each face is cropped by its box. Codes 8-10
(None, Uncertain, No-Face) are dropped; the 7-class protocol also drops contempt.

`validation.csv` is written as `val`: it is the set the literature reports as AffectNet's
test set (500 images per class), since the official test set was never released.

Some redistributed copies are ImageFolder trees (`train/Anger/...`), their class folders
in alphabetical order; those are read by folder *name* (`scn_scale.importers.imagefolder`).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image

from scn_scale.importers import imagefolder
from scn_scale.importers.common import (
    ImporterError,
    ImportOptions,
    ImportSummary,
    SplitWriters,
    encode,
    in_write_order,
    require_file,
    where,
)
from shards import BASIC7, CANONICAL

DATASET = "affectnet"
LISTS = Path("Manually_Annotated_file_lists")
IMAGES = Path("Manually_Annotated_Images")
FILES = {"train": "training.csv", "val": "validation.csv"}
COLUMNS = (
    "subDirectory_filePath",
    "face_x",
    "face_y",
    "face_width",
    "face_height",
    "facial_landmarks",
    "expression",
    "valence",
    "arousal",
)
#: Codes 0-7 are the canonical order itself (0 neutral ... 7 contempt); 8-10 are not expressions.
DROPPED_CODES = {8: "code 8 (None)", 9: "code 9 (Uncertain)", 10: "code 10 (No-Face)"}
#: Split folder names of ImageFolder redistributions.
FOLDER_SPLITS = {
    "train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"
}
NOTE_VAL = "val is validation.csv, the set the literature reports as AffectNet's test set"


def protocol_classes(protocol: int) -> list[str]:
    if protocol not in (7, 8):
        raise ValueError(f"AffectNet protocol must be 7 or 8 classes, got {protocol}")
    return list(BASIC7 if protocol == 7 else CANONICAL)


@dataclass(frozen=True)
class Row:
    path: str  # subDirectory_filePath
    box: tuple[int, int, int, int]  # x, y, width, height
    landmarks: list[float] | None  # 68 x;y pairs, flattened, original-image pixels
    code: int
    valence: float
    arousal: float
    listed_at: str


def read_rows(path: Path) -> Iterator[Row]:
    """Rows of one list file; a header row, where present, is skipped (only training.csv has one)."""
    require_file(path, "AffectNet file list")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        for fields in reader:
            at = where(path, reader.line_num)
            if not fields:
                continue
            if reader.line_num == 1 and fields[0].strip() == COLUMNS[0]:
                continue
            if len(fields) != len(COLUMNS):
                raise ImporterError(f"{at}: expected {len(COLUMNS)} fields ({','.join(COLUMNS)}), got {len(fields)}")
            try:
                box = tuple(int(float(v)) for v in fields[1:5])
                code = int(fields[6])
                valence, arousal = float(fields[7]), float(fields[8])
                landmarks = [float(v) for v in fields[5].split(";")] if fields[5].strip() else None
            except ValueError as exc:
                raise ImporterError(f"{at}: malformed number ({exc})") from exc
            if not 0 <= code <= 10:
                raise ImporterError(f"{at}: expression code {code} outside 0-10")
            if landmarks is not None and len(landmarks) != 136:
                raise ImporterError(f"{at}: facial_landmarks must be 68 x;y pairs, got {len(landmarks)} values")
            yield Row(fields[0].strip(), box, landmarks, code, valence, arousal, at)  # type: ignore[arg-type]


def import_affectnet(
    root: str | Path, out: str | Path, protocol: int = 8, options: ImportOptions | None = None
) -> ImportSummary:
    """Import AffectNet (the csv layout, or else an ImageFolder redistribution) under `protocol` (7 or 8)."""
    root, out = Path(root), str(out)
    summary = ImportSummary(dataset=DATASET, classes=protocol_classes(protocol))
    summary.notes.append(f"{protocol}-class protocol")
    with SplitWriters(out, summary, options or ImportOptions()) as writers:
        if (root / LISTS).is_dir():
            writers.check_fresh(FILES)
            for split, name in FILES.items():
                _import_list(root, root / LISTS / name, split, writers)
            summary.notes.append(NOTE_VAL)
        else:
            _import_folders(root, writers)
    return summary


def _import_list(root: Path, path: Path, split: str, writers: SplitWriters) -> None:
    for row in in_write_order(read_rows(path), f"{DATASET} {split}", writers.options):
        if row.code in DROPPED_CODES:
            writers.drop(split, DROPPED_CODES[row.code])
            continue
        name = CANONICAL[row.code]
        if name not in writers.classes:
            writers.drop(split, f"{name} (not in the {len(writers.classes)}-class protocol)")
            continue
        loaded = writers.load(split, root / IMAGES / row.path, row.listed_at)
        if loaded is None:
            continue
        crop = _crop(loaded[0], row)
        if crop is None:
            writers.drop(split, "face box outside the image")
            continue
        x, y, w, h = row.box
        meta = {
            "face_box": [x, y, x + w, y + h],  # x1, y1, x2, y2 in the original image, as the crawler's
            "landmarks": row.landmarks,
            "valence": row.valence,
            "arousal": row.arousal,
            "dataset_label": row.code,
        }
        writers.write(split, row.path, writers.classes.index(name), encode(crop, "jpg"), "jpg", meta)


def _crop(image: bytes, row: Row) -> Image.Image | None:
    """The face box clipped to the image; None when nothing of it is inside."""
    with Image.open(io.BytesIO(image)) as im:
        im = im.convert("RGB")
        x, y, w, h = row.box
        x1, y1 = max(0, x), max(0, y)
        x2, y2 = min(im.width, x + w), min(im.height, y + h)
        if x2 <= x1 or y2 <= y1:
            return None
        return im.crop((x1, y1, x2, y2))


def _import_folders(root: Path, writers: SplitWriters) -> None:
    if not root.is_dir():
        raise ImporterError(f"{root}: no such directory")
    folders = [p for p in sorted(root.iterdir()) if p.is_dir() and p.name.lower() in FOLDER_SPLITS]
    splits = {p: FOLDER_SPLITS[p.name.lower()] for p in folders}
    if not splits:
        raise ImporterError(
            f"{root}: neither {LISTS}/ (the official file lists) nor split folders {sorted(FOLDER_SPLITS)} "
            "of an ImageFolder copy found"
        )
    if len(set(splits.values())) != len(splits):
        raise ImporterError(f"{root}: several folders map to one split: {[p.name for p in splits]}")
    writers.check_fresh(splits.values())
    for folder, split in splits.items():
        imagefolder.write_scan(writers, split, imagefolder.scan(folder, id_root=root))
    writers.summary.notes.append(f"ImageFolder copy; classes read from folder names in {[p.name for p in splits]}")
