"""RAF-DB (basic): the label list and the aligned 100x100 crops into `out/train` and `out/test`.

Layout (docs/benchmarks.md): `EmoLabel/list_patition_label.txt` (the file name really
says "patition"), lines `<name>.jpg <label>` with labels 1..7 in RAF-DB's own order, and
`Image/aligned/<name>_aligned.jpg`. The split is the name's prefix (`train_`, `test_`).
Noisy label files in the same line format become label-override tables (key, label,
true_label) beside the sets, so the shards keep the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pyarrow as pa

from scn_scale.importers.common import (
    ImporterError,
    ImportOptions,
    ImportSummary,
    SplitWriters,
    in_write_order,
    require_file,
    where,
)
from scn_scale.noise import save_overrides
from shards import BASIC7, key_from_source
from shards.fs import join

DATASET = "rafdb"
LABEL_FILE = Path("EmoLabel") / "list_patition_label.txt"
ALIGNED_DIR = Path("Image") / "aligned"
#: RAF-DB's label values (1-based, its own order) to canonical names.
CODES: dict[int, str] = {
    1: "surprise",
    2: "fear",
    3: "disgust",
    4: "happiness",
    5: "sadness",
    6: "anger",
    7: "neutral",
}
SPLITS = ("train", "test")


@dataclass(frozen=True)
class LabelLine:
    name: str  # e.g. train_00001.jpg
    label: str  # canonical class name
    line: int


def read_label_file(path: Path) -> list[LabelLine]:
    """Parse a file in RAF-DB's `<name>.jpg <label>` format; errors name the file and line."""
    require_file(path, "RAF-DB label list")
    lines = []
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            parts = text.split()
            if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) not in CODES:
                raise ImporterError(f"{where(path, number)}: expected '<name>.jpg <label 1-7>', got {text.strip()!r}")
            name = parts[0]
            if split_of(name) is None:
                raise ImporterError(f"{where(path, number)}: image name {name!r} starts with neither train_ nor test_")
            lines.append(LabelLine(name, CODES[int(parts[1])], number))
    return lines


def split_of(name: str) -> str | None:
    prefix = name.split("_", 1)[0]
    return prefix if prefix in SPLITS else None


def aligned_path(root: Path, name: str) -> Path:
    return root / ALIGNED_DIR / f"{Path(name).stem}_aligned.jpg"


def import_rafdb(
    root: str | Path,
    out: str | Path,
    noisy_labels: Sequence[str | Path] = (),
    options: ImportOptions | None = None,
) -> ImportSummary:
    """Import RAF-DB into `out/train` and `out/test` (7 classes), plus one override table per noisy file."""
    root, out = Path(root), str(out)
    options = options or ImportOptions()
    labels = read_label_file(root / LABEL_FILE)
    summary = ImportSummary(dataset=DATASET, classes=list(BASIC7))
    truth: dict[str, str] = {}  # train image name -> true class, for the noisy files
    with SplitWriters(out, summary, options) as writers:
        writers.check_fresh(SPLITS)
        for item in in_write_order(labels, DATASET, options):
            split = split_of(item.name)
            assert split is not None
            loaded = writers.load(split, aligned_path(root, item.name), where(root / LABEL_FILE, item.line))
            if loaded is None:
                continue
            image, ext = loaded
            writers.write(split, item.name, BASIC7.index(item.label), image, ext, {"dataset_label": item.label})
            if split == "train":
                truth[item.name] = item.label
        for path in noisy_labels:
            _write_overrides(Path(path), truth, out, summary)
    return summary


def _write_overrides(path: Path, truth: dict[str, str], out: str, summary: ImportSummary) -> str:
    """An override table for the train lines of a noisy label file whose label differs from the truth."""
    rows: dict[str, list] = {"key": [], "label": [], "true_label": []}
    lines = read_label_file(path)
    for item in lines:
        if item.name not in truth:
            raise ImporterError(f"{where(path, item.line)}: {item.name} is not an imported training image")
        if item.label != truth[item.name]:
            rows["key"].append(key_from_source(DATASET, item.name))
            rows["label"].append(BASIC7.index(item.label))
            rows["true_label"].append(BASIC7.index(truth[item.name]))
    target = join(out, f"train_overrides_{path.stem}.parquet")
    table = pa.table(
        {
            "key": pa.array(rows["key"], pa.string()),
            "label": pa.array(rows["label"], pa.int64()),
            "true_label": pa.array(rows["true_label"], pa.int64()),
        }
    )
    save_overrides(table, target)
    share = len(rows["key"]) / len(lines) if lines else 0.0
    summary.notes.append(
        f"{path}: {len(rows['key'])} of {len(lines)} train labels differ from the ground truth ({share:.1%}) "
        f"-> {target} "
        "(train with --set label_overrides=<that file>)"
    )
    return target
