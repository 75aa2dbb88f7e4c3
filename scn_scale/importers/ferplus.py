"""FERPlus: FER2013's 48x48 faces with the ten-annotator votes, majority labels, 8 classes.

Two layouts (docs/benchmarks.md), detected from what `root` holds:
- `fer2013.csv` (`emotion,pixels,Usage`) with `fer2013new.csv` (same row order, votes);
  an empty `Image name` drops the row.
- the exported images: `FER2013Train/`, `FER2013Valid/`, `FER2013Test/`, each with PNGs
  and a header-less `label.csv` (`name,"(x, y, w, h)",<10 counts>`).
Training / PublicTest / PrivateTest become `train` / `val` / `test`. Both layouts give the
same keys (from the FERPlus image name). The raw votes and the soft label of the
probability protocol stay in each sample's metadata.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

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
from shards import CANONICAL

log = logging.getLogger(__name__)

DATASET = "ferplus"
#: Vote columns of fer2013new.csv and label.csv, in file order.
VOTE_NAMES = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt", "unknown", "NF")
NOT_EMOTIONS = ("unknown", "NF")
USAGE_SPLITS = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
FOLDER_SPLITS = {"FER2013Train": "train", "FER2013Valid": "val", "FER2013Test": "test"}
NEW_HEADER = ["Usage", "Image name", *VOTE_NAMES]
SIDE = 48
# Probability protocol: the top classes covering this share of the votes, at most MAX_SOFT of them.
SOFT_COVERAGE = 0.75
MAX_SOFT = 3


@dataclass(frozen=True)
class Verdict:
    label: str | None  # canonical class, or None when dropped
    reason: str  # why dropped ("" when kept)
    soft: dict[str, float] | None  # probability-protocol label, None when that protocol drops it


def majority(counts: list[int]) -> Verdict:
    """The common FERPlus protocol on one row's ten vote counts (docs/benchmarks.md).

    Counts of 1 are set to 0 (a lone vote is an outlier); the top class is the label when
    it holds more than half of the remaining votes and is an emotion, else the row is dropped.
    """
    votes = [0 if c == 1 else c for c in counts]
    total = sum(votes)
    if total == 0:
        return Verdict(None, "no votes left after removing single votes", None)
    top = max(range(len(votes)), key=lambda i: votes[i])
    if 2 * votes[top] <= total:
        return Verdict(None, "no majority", None)
    if VOTE_NAMES[top] in NOT_EMOTIONS:
        return Verdict(None, f"majority {VOTE_NAMES[top]}", None)
    return Verdict(VOTE_NAMES[top], "", soft_label(votes))


def soft_label(votes: list[int]) -> dict[str, float] | None:
    """Top classes in order until 75% of the votes are covered (at most 3), their shares
    renormalized; None when unknown or NF is among them (that protocol drops the row)."""
    total = sum(votes)
    order = sorted(range(len(votes)), key=lambda i: -votes[i])
    taken, covered = [], 0
    for i in order[:MAX_SOFT]:
        taken.append(i)
        covered += votes[i]
        if covered >= SOFT_COVERAGE * total:
            break
    if any(VOTE_NAMES[i] in NOT_EMOTIONS for i in taken):
        return None
    return {VOTE_NAMES[i]: votes[i] / covered for i in taken}


def _counts(fields: list[str], path: Path, line: int) -> list[int]:
    if len(fields) != len(VOTE_NAMES) or not all(f.strip().isdigit() for f in fields):
        raise ImporterError(f"{where(path, line)}: expected {len(VOTE_NAMES)} vote counts, got {fields}")
    return [int(f) for f in fields]


@dataclass(frozen=True)
class Row:
    split: str
    name: str  # FERPlus image name, "" when the row is dropped
    counts: list[int]
    listed_at: str


def import_ferplus(root: str | Path, out: str | Path, options: ImportOptions | None = None) -> ImportSummary:
    """Import FERPlus (either layout) into `out/train`, `out/val`, `out/test` with the 8 canonical classes."""
    root, out = Path(root), str(out)
    options = options or ImportOptions()
    summary = ImportSummary(dataset=DATASET, classes=list(CANONICAL))
    if (root / "fer2013new.csv").exists():
        layout = "csv"
    elif any((root / folder).is_dir() for folder in FOLDER_SPLITS):
        layout = "png"
    else:
        raise ImporterError(
            f"{root}: neither fer2013new.csv (with fer2013.csv) nor the exported folders {list(FOLDER_SPLITS)} found"
        )
    with SplitWriters(out, summary, options) as writers:
        writers.check_fresh(USAGE_SPLITS.values())
        rows = _csv_rows(root) if layout == "csv" else _png_rows(root)
        for row, image in in_write_order(rows, DATASET, options):
            if not row.name:
                writers.drop(row.split, "empty image name")
                continue
            verdict = majority(row.counts)
            if verdict.label is None:
                writers.drop(row.split, verdict.reason)
                continue
            if image is None:  # png layout: the image is read only for kept rows
                image = writers.load(row.split, root / _folder(row.split) / row.name, row.listed_at)
                if image is None:
                    continue
            meta = {"votes": dict(zip(VOTE_NAMES, row.counts)), "soft_label": verdict.soft}
            writers.write(row.split, row.name, CANONICAL.index(verdict.label), image[0], image[1], meta)
    summary.notes.append(f"{layout} layout; majority labels (counts of 1 set to 0, top class > half of the rest)")
    return summary


def _folder(split: str) -> str:
    return next(folder for folder, s in FOLDER_SPLITS.items() if s == split)


def _csv_rows(root: Path) -> Iterator[tuple[Row, tuple[bytes, str] | None]]:
    """fer2013.csv and fer2013new.csv read in lockstep; their rows must pair up one to one."""
    old_path = require_file(root / "fer2013.csv", "FER2013 pixels")
    new_path = require_file(root / "fer2013new.csv", "FERPlus votes")
    with open(old_path, newline="") as old_file, open(new_path, newline="") as new_file:
        old, new = csv.reader(old_file), csv.reader(new_file)
        old_header, new_header = next(old, None), next(new, None)
        if old_header is None or [h.strip() for h in old_header] != ["emotion", "pixels", "Usage"]:
            raise ImporterError(f"{where(old_path, 1)}: expected header emotion,pixels,Usage, got {old_header}")
        if new_header is None or [h.strip() for h in new_header] != NEW_HEADER:
            raise ImporterError(f"{where(new_path, 1)}: expected header {','.join(NEW_HEADER)}, got {new_header}")
        for old_row, new_row in zip_longest(old, new):
            if old_row is None or new_row is None:
                raise ImporterError(f"{old_path} and {new_path} have different numbers of rows (they must pair up)")
            old_at, new_at = where(old_path, old.line_num), where(new_path, new.line_num)
            if len(old_row) != 3:
                raise ImporterError(f"{old_at}: expected 3 fields (emotion,pixels,Usage), got {len(old_row)}")
            if len(new_row) != len(NEW_HEADER):
                raise ImporterError(f"{new_at}: expected {len(NEW_HEADER)} fields, got {len(new_row)}")
            usage = new_row[0].strip()
            if usage not in USAGE_SPLITS:
                raise ImporterError(f"{new_at}: unknown Usage {usage!r}; expected one of {list(USAGE_SPLITS)}")
            if old_row[2].strip() != usage:
                raise ImporterError(
                    f"{old_at}: Usage {old_row[2]!r} differs from {new_at} ({usage!r}): rows out of step"
                )
            row = Row(USAGE_SPLITS[usage], new_row[1].strip(), _counts(new_row[2:], new_path, new.line_num), new_at)
            image = (_pixels_png(old_row[1], old_at), "png") if row.name else None
            yield row, image


def _pixels_png(text: str, at: str) -> bytes:
    try:
        values = np.array(text.split(), dtype=np.int64)
    except ValueError:
        values = np.array([-1])
    if values.size != SIDE * SIDE or values.min() < 0 or values.max() > 255:
        raise ImporterError(f"{at}: pixels must be {SIDE * SIDE} grey values 0-255 separated by spaces")
    return encode(Image.fromarray(values.astype(np.uint8).reshape(SIDE, SIDE)), "png")


def _png_rows(root: Path) -> Iterator[tuple[Row, None]]:
    """Rows of each exported folder's header-less label.csv; images are read later, kept rows only."""
    for folder, split in FOLDER_SPLITS.items():
        if not (root / folder).is_dir():
            log.warning("%s: no %s folder, so no %s split", root, folder, split)
            continue
        path = require_file(root / folder / "label.csv", f"FERPlus {split} labels")
        with open(path, newline="") as f:
            reader = csv.reader(f)
            for fields in reader:
                if not fields:
                    continue
                if len(fields) != 2 + len(VOTE_NAMES):
                    raise ImporterError(
                        f"{where(path, reader.line_num)}: expected name, box and {len(VOTE_NAMES)} counts, "
                        f"got {len(fields)} fields"
                    )
                counts = _counts(fields[2:], path, reader.line_num)
                yield Row(split, fields[0].strip(), counts, where(path, reader.line_num)), None
