"""An ImageFolder tree (`root/<class name>/<image>`) into one shard set.

Classes come from folder *names*, never folder order: AffectNet's redistributed copies
sort their folders alphabetically (Anger, Contempt, Disgust, ...), so index 0 there is
anger, not neutral. Names are matched case-insensitively with common synonyms (Happy ->
happiness); a folder with any other name stops the import, naming it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from scn_scale.importers.common import (
    ImporterError,
    ImportOptions,
    ImportSummary,
    LabeledFile,
    SplitWriters,
    canonical_name,
    write_labeled_files,
)
from shards import CANONICAL

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


@dataclass
class FolderScan:
    files: list[LabeledFile] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)  # not an image by suffix, or outside a class folder


def scan(root: Path, id_root: Path | None = None) -> FolderScan:
    """Image files under each class folder of `root`, with source ids relative to `id_root` (default `root`)."""
    if not root.is_dir():
        raise ImporterError(f"{root}: no such directory (expected one folder per class)")
    id_root = id_root or root
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in folders if canonical_name(p.name) is None]
    if unknown:
        raise ImporterError(f"{root}: folder names {unknown} are not expression classes; known: {list(CANONICAL)}")
    if not folders:
        raise ImporterError(f"{root}: no class folders")
    result = FolderScan(ignored=sorted(p for p in root.iterdir() if p.is_file()))
    for folder in folders:
        name = canonical_name(folder.name)
        assert name is not None
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                result.ignored.append(path)
                continue
            source_id = path.relative_to(id_root).as_posix()
            result.files.append(LabeledFile(path, name, source_id, listed_at=str(folder)))
    return result


def folder_classes(found: FolderScan) -> list[str]:
    return sorted({f.name for f in found.files}, key=CANONICAL.index)


def write_scan(writers: SplitWriters, split: str, found: FolderScan) -> None:
    for path in found.ignored:
        log.info("ignoring %s (not an image in a class folder)", path)
        writers.drop(split, "not an image in a class folder")
    write_labeled_files(writers, split, found.files)


def import_imagefolder(
    root: str | Path,
    out: str | Path,
    split: str = "train",
    classes: Sequence[str] | None = None,
    dataset: str = "imagefolder",
    options: ImportOptions | None = None,
) -> ImportSummary:
    """Import the tree into the shard set `out`; classes default to the folders found, in canonical order."""
    root = Path(root)
    found = scan(root)
    summary = ImportSummary(dataset=dataset, classes=list(classes) if classes else folder_classes(found))
    with SplitWriters(out, summary, options or ImportOptions(), per_split=False) as writers:
        writers.check_fresh([split])
        write_scan(writers, split, found)
    return summary
