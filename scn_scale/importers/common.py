"""What the benchmark importers share: errors that name the file and line, class-name
mapping, image reading, the per-split writers and the import summary.

An importer's output is a benchmark number's denominator, so nothing is dropped
silently: every sample left out is counted under a reason, and a file that is missing
or does not parse stops the import with its path (and line) in the message.
"""

from __future__ import annotations

import io
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence, TypeVar

from PIL import Image
from tqdm import tqdm

from shards import BASIC7, CANONICAL, Sample, ShardWriter, key_from_source, validate_classes
from shards.atomic import write_json
from shards.fs import exists, is_file, join
from shards.lock import OutputLock
from shards.pixels import DEFAULT_MAX_PIXELS, TooManyPixels, image_size
from shards.writer import STATS_NAME

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Folder and label names seen in the wild, mapped to canonical class names.
SYNONYMS: dict[str, str] = {
    "happy": "happiness",
    "sad": "sadness",
    "angry": "anger",
    "surprised": "surprise",
    "fearful": "fear",
    "disgusted": "disgust",
}

#: Formats stored as they are; anything else Pillow reads is re-encoded as PNG (lossless).
_KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}

SUMMARY_NAME = "import_summary.json"


class ImporterError(ValueError):
    """A dataset file is missing or malformed; the message names the file (and line)."""


def where(path: str | Path, line: int | None = None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ImporterError(f"{path}: missing ({what})")
    return path


def canonical_name(name: str) -> str | None:
    """The canonical class for a folder or label name (case-insensitive, synonyms accepted); None if unknown."""
    name = name.strip().lower()
    name = SYNONYMS.get(name, name)
    return name if name in CANONICAL else None


def parse_classes(spec: str) -> list[str]:
    """`--classes`: "basic7", "all", or comma-separated names (synonyms accepted), in canonical order."""
    if spec == "basic7":
        return list(BASIC7)
    if spec == "all":
        return list(CANONICAL)
    names = {}
    for part in spec.split(","):
        name = canonical_name(part)
        if name is None:
            raise ImporterError(f"--classes: unknown class name {part.strip()!r}; known: {list(CANONICAL)}")
        names[name] = None
    return sorted(names, key=CANONICAL.index)


def read_image(path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[bytes, str]:
    """The file's bytes and shard extension, fully decoded once so a truncated file is caught here.

    JPEG, PNG and WebP keep their bytes; other formats are re-encoded as PNG. A header declaring
    more than `max_pixels` is refused before decoding (readers of the set would skip it).
    """
    try:
        data = path.read_bytes()
        image_size(data, max_pixels)
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.format in _KEPT_FORMATS:
                return data, _KEPT_FORMATS[im.format]
            return encode(im.convert("RGB"), "png"), "png"
    except FileNotFoundError:
        raise
    except Exception as exc:  # Pillow raises many types for bad bytes
        raise ImporterError(f"{path}: not a readable image ({exc})") from exc


def encode(image: Image.Image, ext: str) -> bytes:
    """JPEG (quality 95) for crops of photos, PNG where the source is lossless."""
    buf = io.BytesIO()
    if ext == "jpg":
        image.save(buf, format="JPEG", quality=95)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class ImportOptions:
    """Settings every importer takes."""

    shard_size: int = 1000  # samples per shard
    # Samples are written in a random order drawn from this seed (recorded in stats.json), not
    # class by class as datasets list them: shards that each hold every class read into mixed
    # batches with any reader, this project's or another tool's.
    shuffle_seed: int = 0
    # A listed image that is missing or unreadable stops the import (a benchmark with a hole
    # is a different benchmark); with this set it is dropped and counted instead.
    allow_missing: bool = False
    # Images over this many pixels (from their header) are refused: every reader of a set skips them.
    # None: no cap.
    max_pixels: int | None = DEFAULT_MAX_PIXELS


@dataclass
class ImportSummary:
    """What an import wrote and left out, per split."""

    dataset: str
    classes: list[str]
    outputs: dict[str, str] = field(default_factory=dict)  # split -> shard set directory
    counts: dict[str, Counter] = field(default_factory=dict)  # split -> class -> samples written
    dropped: dict[str, Counter] = field(default_factory=dict)  # split -> reason -> samples left out
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "dataset": self.dataset,
            "classes": self.classes,
            "outputs": self.outputs,
            "counts": {s: dict(self.counts[s]) for s in self.counts},
            "dropped": {s: dict(self.dropped[s]) for s in self.dropped},
            "notes": self.notes,
        }

    def table(self) -> str:
        order = {"train": 0, "val": 1, "test": 2}
        splits = sorted(set(self.counts) | set(self.dropped), key=lambda s: (order.get(s, 3), s))
        width = max([len("dropped: ") + len(r) for s in splits for r in self.dropped.get(s, {})] + [12])
        lines = [f"{self.dataset}: " + ", ".join(f"{s} -> {self.outputs.get(s, '-')}" for s in splits)]
        lines.append(f"{'class':<{width}}" + "".join(f"{s:>10}" for s in splits))
        for name in self.classes:
            lines.append(f"{name:<{width}}" + "".join(f"{self.counts.get(s, Counter())[name]:>10}" for s in splits))
        totals = [sum(self.counts.get(s, Counter()).values()) for s in splits]
        lines.append(f"{'total':<{width}}" + "".join(f"{n:>10}" for n in totals))
        reasons = sorted({r for s in splits for r in self.dropped.get(s, {})})
        for reason in reasons:
            label = f"dropped: {reason}"
            lines.append(f"{label:<{width}}" + "".join(f"{self.dropped.get(s, Counter())[reason]:>10}" for s in splits))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


class SplitWriters:
    """One ShardWriter per split, opened on first use, with the summary's counts kept as samples go in.

    `per_split=True` writes split `s` to `out/s` (benchmark importers); otherwise every
    sample goes to `out` itself (single-set importers). An output that already holds a
    shard set is refused: importing twice into one set would mix two imports. The import
    holds the lock of `out` (`shards.lock`) from its first check to its close, so a second
    import into the same `out` is refused however far the first has got; nothing is
    created in `out` before that first check, which follows the importer's input checks.
    """

    def __init__(
        self, out: str | Path, summary: ImportSummary, options: ImportOptions, per_split: bool = True
    ) -> None:
        self.out = str(out)  # a directory or an object-store URL (shards.fs)
        self.summary = summary
        self.options = options
        self.per_split = per_split
        self._writers: dict[str, ShardWriter] = {}
        self.classes = validate_classes(summary.classes)
        self.lock = OutputLock(self.out)

    def directory(self, split: str) -> str:
        return join(self.out, split) if self.per_split else self.out

    def check_fresh(self, splits: Iterable[str]) -> None:
        """Take the output's lock, then refuse before any work when an output set already exists."""
        if not self.lock.held:
            if is_file(self.out):
                raise ImporterError(f"{self.out}: exists and is not a directory (--out)")
            self.lock.acquire()
        for split in splits:
            if exists(join(self.directory(split), STATS_NAME)):
                raise ImporterError(
                    f"{self.directory(split)}: already holds a shard set; remove it or choose another --out"
                )

    def write(self, split: str, source_id: str, label: int, image: bytes, ext: str, meta: dict) -> None:
        """Write one sample under a stable key: from the dataset name and the dataset's own image name."""
        key = key_from_source(self.summary.dataset, source_id)
        writer = self._writers.get(split)
        if writer is None:
            self.check_fresh([split])
            writer = ShardWriter(
                self.directory(split), self.classes, max_samples=self.options.shard_size,
                shuffle_seed=self.options.shuffle_seed, lock=None if self.per_split else self.lock,
                max_pixels=self.options.max_pixels,
            )
            self._writers[split] = writer
            self.summary.outputs[split] = self.directory(split)
        full_meta = {"provider": self.summary.dataset, "source_id": source_id, **meta}
        try:
            writer.write(Sample(key=key, image=image, label=label, ext=ext, split=split, meta=full_meta))
        except TooManyPixels as exc:
            raise ImporterError(f"{exc} (--max-pixels 0 writes it)") from None
        self.summary.counts.setdefault(split, Counter())[self.classes[label]] += 1

    def drop(self, split: str, reason: str) -> None:
        self.summary.dropped.setdefault(split, Counter())[reason] += 1

    def load(self, split: str, path: Path, listed_at: str) -> tuple[bytes, str] | None:
        """Read a listed image; None (counted as dropped) when it is missing or unreadable and
        `allow_missing` is set, an ImporterError otherwise."""
        try:
            return read_image(path, self.options.max_pixels)
        except FileNotFoundError:
            message = f"{path}: image missing (listed at {listed_at})"
        except ImporterError as exc:
            message = f"{exc} (listed at {listed_at})"
        if not self.options.allow_missing:
            raise ImporterError(message)
        log.warning("dropping: %s", message)
        self.drop(split, "image missing or unreadable")
        return None

    def close(self, write_summary: bool = True) -> None:
        """Finish every set; the summary file is written only for an import that ran to the end."""
        try:
            for writer in self._writers.values():
                writer.close()
            for split in self.summary.counts:
                self.summary.counts[split] = Counter({c: self.summary.counts[split][c] for c in self.classes})
            if write_summary:
                write_json(join(self.out, SUMMARY_NAME), self.summary.to_dict())
        finally:
            if self.lock.held:
                self.lock.release()

    def __enter__(self) -> "SplitWriters":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        # Finished shards are kept even when the import fails, but no summary claims success.
        self.close(write_summary=exc_type is None)


def in_write_order(items: Iterable[T], desc: str, options: ImportOptions) -> Iterable[T]:
    """The items in the import's seeded random write order, with a progress bar on a terminal (nothing in logs and tests).

    Only the list of what to write is held in memory and shuffled; images are read one by one after.
    """
    order = list(items)
    random.Random(options.shuffle_seed).shuffle(order)
    return tqdm(order, desc=desc, unit="img", disable=None)


@dataclass(frozen=True)
class LabeledFile:
    """An image file and its class name, as an ImageFolder tree or a csv list gives them."""

    path: Path
    name: str  # canonical class name
    source_id: str  # the dataset's own name for the image (relative path)
    listed_at: str  # where it was listed, for error messages


def write_labeled_files(
    writers: SplitWriters, split: str, files: Sequence[LabeledFile], extra_meta: dict | None = None
) -> None:
    """Write files whose class is in the set's class list; count the others as dropped."""
    for item in in_write_order(files, f"{writers.summary.dataset} {split}", writers.options):
        if item.name not in writers.classes:
            writers.drop(split, f"class {item.name} not in the class list")
            continue
        loaded = writers.load(split, item.path, item.listed_at)
        if loaded is None:
            continue
        image, ext = loaded
        writers.write(split, item.source_id, writers.classes.index(item.name), image, ext, dict(extra_meta or {}))
