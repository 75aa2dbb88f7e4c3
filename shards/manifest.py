"""The parquet manifest: one row per sample, the set's queryable index.

Each finished shard has its own `<shard>.parquet`; `manifest.parquet` is the
concatenation, rebuilt from the per-shard files whenever a writer closes, so a crash
can leave it stale but never wrong about finished shards.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from shards.fs import join, open_fs
from shards.sample import PROVENANCE_FIELDS, Sample

MANIFEST_NAME = "manifest.parquet"

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("label", pa.int32()),
        ("label_name", pa.string()),
        ("split", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("ext", pa.string()),
        ("bytes", pa.int64()),
        # Where the sample's first tar member starts in its shard: a reader starts mid-shard with
        # one seek. Null in sets written before offsets were recorded.
        ("offset", pa.int64()),
        *[(name, pa.string()) for name in PROVENANCE_FIELDS],
        ("face_score", pa.float32()),
        ("face_box", pa.list_(pa.float32())),
        ("landmarks", pa.list_(pa.float32())),
        ("meta", pa.string()),
    ]
)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _floats(value: Any) -> list[float] | None:
    if value is None:
        return None
    flat: list[float] = []
    for item in value:
        if isinstance(item, (list, tuple)):
            flat.extend(float(v) for v in item)
        else:
            flat.append(float(item))
    return flat


def manifest_row(sample: Sample, shard: str, label_name: str, width: int, height: int, offset: int) -> dict[str, Any]:
    meta = sample.meta
    row: dict[str, Any] = {
        "key": sample.key,
        "shard": shard,
        "label": sample.label,
        "label_name": label_name,
        "split": sample.split,
        "sha256": sample.sha256,
        "width": width,
        "height": height,
        "ext": sample.ext,
        "bytes": len(sample.image),
        "offset": offset,
        "face_score": meta.get("face_score"),
        "face_box": _floats(meta.get("face_box")),
        "landmarks": _floats(meta.get("landmarks")),
        "meta": json.dumps(meta, sort_keys=True, default=str),
    }
    for name in PROVENANCE_FIELDS:
        row[name] = _text(meta.get(name))
    return row


def rows_to_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=SCHEMA)


def read_manifest(url: str, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a shard set's manifest from a local directory or an fsspec URL."""
    fs, root = open_fs(url)
    path = join(root, MANIFEST_NAME)
    if not fs.exists(path):
        raise FileNotFoundError(f"{url}: no {MANIFEST_NAME} (not a finished shard set?)")
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=list(columns) if columns else None)
