"""A csv list of `path,label` rows (label a class name) into one shard set.

Paths are relative to `root` (default: the list's own folder); a first row reading
`path,label` is a header. Labels are names, matched like ImageFolder folder names.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

from scn_scale.importers.common import (
    ImporterError,
    ImportOptions,
    ImportSummary,
    LabeledFile,
    SplitWriters,
    canonical_name,
    require_file,
    where,
    write_labeled_files,
)
from shards import CANONICAL


def read_list(path: Path, root: Path) -> list[LabeledFile]:
    require_file(path, "csv list of path,label rows")
    files = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        for fields in reader:
            at = where(path, reader.line_num)
            if not fields or not "".join(fields).strip():
                continue
            if len(fields) != 2:
                raise ImporterError(f"{at}: expected 2 fields (path,label), got {len(fields)}")
            rel, label = fields[0].strip(), fields[1].strip()
            if reader.line_num == 1 and (rel.lower(), label.lower()) == ("path", "label"):
                continue
            name = canonical_name(label)
            if name is None:
                raise ImporterError(f"{at}: unknown class name {label!r}; known: {list(CANONICAL)}")
            files.append(LabeledFile(root / rel, name, Path(rel).as_posix(), listed_at=at))
    return files


def import_csv(
    list_path: str | Path,
    out: str | Path,
    root: str | Path | None = None,
    split: str = "train",
    classes: Sequence[str] | None = None,
    dataset: str = "csv",
    options: ImportOptions | None = None,
) -> ImportSummary:
    """Import the listed images into the shard set `out`; classes default to the labels used, in canonical order."""
    list_path = Path(list_path)
    files = read_list(list_path, Path(root) if root else list_path.parent)
    if not files:
        raise ImporterError(f"{list_path}: lists no image")
    names = classes if classes else sorted({f.name for f in files}, key=CANONICAL.index)
    summary = ImportSummary(dataset=dataset, classes=list(names))
    with SplitWriters(out, summary, options or ImportOptions(), per_split=False) as writers:
        writers.check_fresh([split])
        write_labeled_files(writers, split, files)
    return summary
