"""Small fixture trees in the public benchmarks' official layouts (docs/benchmarks.md).

None of the datasets can be downloaded here, so each generator writes a tiny copy of
the layout with random images and returns what it wrote: the per-split per-class
counts an importer must find, and the rows it must drop. The label tables below are
this file's own transcription of docs/benchmarks.md, kept apart from the importers'
on purpose, so the tests check the importers against the document, not against themselves.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import jpeg_bytes

CANONICAL_NAMES = ["neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger", "contempt"]
# docs/benchmarks.md, "Cross-dataset label names".
RAFDB_LABELS = {1: "surprise", 2: "fear", 3: "disgust", 4: "happiness", 5: "sadness", 6: "anger", 7: "neutral"}
FERPLUS_COLUMNS = [
    "neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt", "unknown", "NF"
]
AFFECTNET_CODES = ["neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger", "contempt"]
# AffectNet ImageFolder copies: alphabetical folder names -> canonical names.
AFFECTNET_FOLDERS = {
    "Anger": "anger",
    "Contempt": "contempt",
    "Disgust": "disgust",
    "Fear": "fear",
    "Happy": "happiness",
    "Neutral": "neutral",
    "Sad": "sadness",
    "Surprise": "surprise",
}


@dataclass
class Fixture:
    root: Path
    counts: dict[str, Counter] = field(default_factory=dict)  # split -> canonical class -> samples to import
    dropped: Counter = field(default_factory=Counter)  # split -> rows an importer must leave out
    labels: dict[str, str] = field(default_factory=dict)  # the dataset's image name -> canonical class (kept rows)
    extra: dict = field(default_factory=dict)

    def count(self, split: str, name: str) -> None:
        self.counts.setdefault(split, Counter())[name] += 1


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


# -- RAF-DB ------------------------------------------------------------------------------


def make_rafdb(root: Path, per_class: tuple[int, int] = (3, 2), seed: int = 0, size: int = 100) -> Fixture:
    """`EmoLabel/list_patition_label.txt` and `Image/aligned/<name>_aligned.jpg`, 1..per_class images
    per class and split (random counts), lines in shuffled order; images tinted by class."""
    rng = np.random.default_rng(seed)
    fx = Fixture(root)
    lines = []
    index = {"train": 0, "test": 0}
    for split, most in zip(("train", "test"), per_class):
        for code, name in RAFDB_LABELS.items():
            for _ in range(int(rng.integers(1, most + 1))):
                index[split] += 1
                image = f"{split}_{index[split]:05d}.jpg" if split == "train" else f"{split}_{index[split]:04d}.jpg"
                lines.append(f"{image} {code}")
                aligned = root / "Image" / "aligned" / f"{Path(image).stem}_aligned.jpg"
                aligned.parent.mkdir(parents=True, exist_ok=True)
                aligned.write_bytes(jpeg_bytes(rng, size, CANONICAL_NAMES.index(name)))
                fx.count(split, name)
                fx.labels[image] = name
    rng.shuffle(lines)
    label_file = root / "EmoLabel" / "list_patition_label.txt"
    label_file.parent.mkdir(parents=True, exist_ok=True)
    label_file.write_text("\n".join(lines) + "\n")
    fx.extra["label_file"] = label_file
    return fx


def write_rafdb_noise(fx: Fixture, path: Path, rate: float, seed: int = 1) -> dict[str, tuple[str, str]]:
    """A noisy label file (train lines only, RAF-DB format); returns name -> (noisy, true) for changed lines."""
    rng = np.random.default_rng(seed)
    changed = {}
    lines = []
    codes = {name: code for code, name in RAFDB_LABELS.items()}
    for image, name in sorted(fx.labels.items()):
        if not image.startswith("train_"):
            continue
        code = codes[name]
        if rng.random() < rate:
            code = int(rng.choice([c for c in RAFDB_LABELS if c != code]))
            changed[image] = (RAFDB_LABELS[code], name)
        lines.append(f"{image} {code}")
    path.write_text("\n".join(lines) + "\n")
    return changed


# -- FERPlus -----------------------------------------------------------------------------


def _ferplus_rows(rng: np.random.Generator) -> list[tuple[str, list[int], str | None]]:
    """(usage, ten vote counts, the canonical class a majority-protocol importer keeps or None) per row,
    covering every case of the protocol in docs/benchmarks.md."""
    rows = []
    for usage in ("Training", "PublicTest", "PrivateTest"):
        for c in range(8):
            for _ in range(int(rng.integers(1, 3))):
                votes = [0] * 10
                votes[c] = int(rng.integers(6, 11))
                for other in rng.choice([i for i in range(10) if i != c], size=10 - votes[c], replace=False):
                    votes[other] = 1
                rows.append((usage, votes, FERPLUS_COLUMNS[c]))
        # 4 votes against six single votes: a majority only once counts of 1 are set to 0.
        rows.append((usage, [0, 4, 1, 1, 1, 1, 1, 1, 0, 0], "happiness"))
        rows.append((usage, [4, 4, 2, 0, 0, 0, 0, 0, 0, 0], None))  # no majority
        rows.append((usage, [3, 3, 1, 1, 1, 1, 0, 0, 0, 0], None))  # 3 of 6 after removal: not more than half
        rows.append((usage, [2, 0, 0, 0, 0, 0, 0, 0, 8, 0], None))  # majority unknown
        rows.append((usage, [0, 0, 0, 0, 0, 0, 0, 0, 0, 10], None))  # majority not-a-face
        rows.append((usage, [1] * 10, None))  # only single votes
    return rows


def make_ferplus_csv(root: Path, seed: int = 0, empty_names: int = 2) -> Fixture:
    """`fer2013.csv` and `fer2013new.csv` in the same row order, with rows of empty `Image name` mixed in."""
    rng = np.random.default_rng(seed)
    fx = Fixture(root)
    rows = _ferplus_rows(rng)
    blanks = set(int(i) for i in rng.choice(len(rows), size=empty_names, replace=False))
    usage_split = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "fer2013.csv", "w", newline="") as old_f, open(root / "fer2013new.csv", "w", newline="") as new_f:
        old, new = csv.writer(old_f), csv.writer(new_f)
        old.writerow(["emotion", "pixels", "Usage"])
        new.writerow(["Usage", "Image name", *FERPLUS_COLUMNS])
        for i, (usage, votes, keep) in enumerate(rows):
            pixels = rng.integers(0, 256, size=48 * 48)
            old.writerow([int(rng.integers(0, 7)), " ".join(map(str, pixels)), usage])
            name = "" if i in blanks else f"fer{i:07d}.png"
            new.writerow([usage, name, *votes])
            split = usage_split[usage]
            if name and keep:
                fx.count(split, keep)
                fx.labels[name] = keep
            else:
                fx.dropped[split] += 1
    return fx


def make_ferplus_png(root: Path, seed: int = 0) -> Fixture:
    """The exported layout: `FER2013Train/`, `FER2013Valid/`, `FER2013Test/` with PNGs and header-less label.csv."""
    rng = np.random.default_rng(seed)
    fx = Fixture(root)
    folders = {
        "Training": ("FER2013Train", "train"), "PublicTest": ("FER2013Valid", "val"), "PrivateTest": ("FER2013Test", "test")
    }
    files: dict[str, list] = {}
    for i, (usage, votes, keep) in enumerate(_ferplus_rows(rng)):
        folder, split = folders[usage]
        name = f"fer{i:07d}.png"
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / name).write_bytes(_png(rng.integers(0, 256, size=(48, 48), dtype=np.uint8)))
        files.setdefault(folder, []).append([name, "(0, 0, 48, 48)", *votes])
        if keep:
            fx.count(split, keep)
            fx.labels[name] = keep
        else:
            fx.dropped[split] += 1
    for folder, rows in files.items():
        with open(root / folder / "label.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
    return fx


# -- AffectNet ---------------------------------------------------------------------------

AFFECTNET_HEADER = [
    "subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
    "facial_landmarks", "expression", "valence", "arousal",
]


def make_affectnet(root: Path, seed: int = 0) -> Fixture:
    """The two file lists (header only in training.csv) and images under Manually_Annotated_Images/,
    every code 0-10 present in both splits. `counts` holds the 8-class protocol;
    `extra["counts7"]` the 7-class one, `extra["crops"]` each kept image's (width, height)."""
    rng = np.random.default_rng(seed)
    fx = Fixture(root)
    counts7: dict[str, Counter] = {}
    crops: dict[str, tuple[int, int]] = {}
    lists = root / "Manually_Annotated_file_lists"
    lists.mkdir(parents=True)
    number = 0
    for split, file_name, header in (("train", "training.csv", True), ("val", "validation.csv", False)):
        rows = []
        for code in range(11):
            for _ in range(int(rng.integers(1, 3))):
                number += 1
                rel = f"{number % 3 + 1}/{number:04x}{'abcdef'[number % 6]}.jpg"
                width, height = int(rng.integers(40, 64)), int(rng.integers(40, 64))
                path = root / "Manually_Annotated_Images" / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(_jpeg(rng, width, height))
                x, y = int(rng.integers(0, 10)), int(rng.integers(0, 10))
                w, h = int(rng.integers(16, 30)), int(rng.integers(16, 30))
                if number % 5 == 0:  # a box reaching past the right edge: clipped to the image
                    w = width - x + 7
                landmarks = ";".join(f"{v:.2f}" for v in rng.uniform(0, 40, size=136))
                valence, arousal = (f"{v:.4f}" for v in rng.uniform(-1, 1, size=2))
                rows.append([rel, x, y, w, h, landmarks, code, valence, arousal])
                if code <= 7:
                    fx.count(split, AFFECTNET_CODES[code])
                    fx.labels[rel] = AFFECTNET_CODES[code]
                    crops[rel] = (min(w, width - x), min(h, height - y))
                    if code < 7:
                        counts7.setdefault(split, Counter())[AFFECTNET_CODES[code]] += 1
                fx.dropped[split] += code > 7
        rng.shuffle(rows)
        with open(lists / file_name, "w", newline="") as f:
            writer = csv.writer(f)
            if header:
                writer.writerow(AFFECTNET_HEADER)
            writer.writerows(rows)
    fx.extra.update(counts7=counts7, crops=crops)
    return fx


def _jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def make_affectnet_folders(root: Path, seed: int = 0) -> Fixture:
    """An ImageFolder redistribution: `train/` and `val/` with the alphabetical class folders."""
    rng = np.random.default_rng(seed)
    fx = Fixture(root)
    for split in ("train", "val"):
        for folder, name in AFFECTNET_FOLDERS.items():
            for i in range(int(rng.integers(1, 4))):
                path = root / split / folder / f"{folder.lower()}_{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(jpeg_bytes(rng, 24))
                fx.count(split, name)
    return fx


# -- plain trees -------------------------------------------------------------------------


def make_imagefolder(root: Path, seed: int = 0) -> Fixture:
    """Class-named folders (synonyms, mixed case), PNG and JPEG files, and one non-image file to skip."""
    folders = {"happy": "happiness", "Sad": "sadness", "angry": "anger", "neutral": "neutral", "surprised": "surprise"}
    rng = np.random.default_rng(seed)
    fx = Fixture(root)
    for folder, name in folders.items():
        for i in range(int(rng.integers(1, 4))):
            path = root / folder / f"img{i}.{'png' if i % 2 else 'jpg'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            data = _png(rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)) if i % 2 else jpeg_bytes(rng, 24)
            path.write_bytes(data)
            fx.count("train", name)
            fx.labels[f"{folder}/{path.name}"] = name
    (root / next(iter(folders)) / "notes.txt").write_text("not an image")
    fx.dropped["train"] += 1
    return fx


def make_csvlist(root: Path, seed: int = 0) -> Fixture:
    """`list.csv` with a header and `path,label` rows pointing into `images/`."""
    rng = np.random.default_rng(seed)
    fx = Fixture(root)
    rows = [["path", "label"]]
    for i, label in enumerate(["fear", "Disgusted", "contempt", "fear", "happy", "disgust"]):
        rel = f"images/{i:03d}.jpg"
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(jpeg_bytes(rng, 24))
        rows.append([rel, label])
        name = {"Disgusted": "disgust", "happy": "happiness"}.get(label, label)
        fx.count("train", name)
        fx.labels[rel] = name
    with open(root / "list.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    fx.extra["list"] = root / "list.csv"
    return fx
