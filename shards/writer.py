"""The shard writer: samples in, finished WebDataset tars plus manifest out.

Each shard is the unit of completion. Its tar and its manifest rows are written under
temporary names and renamed when complete; then `<shard>_stats.json` is written, and
only that file marks the shard as done. A writer opened on an existing set removes
whatever an interrupted run left unfinished and continues numbering after the last
finished shard, so extending or resuming never rewrites or duplicates finished work.
An image whose header declares more pixels than `max_pixels` is refused (`shards.pixels`):
every reader would skip it. The set may live in an object store (`shards.fs`): each file is
then uploaded whole when complete, in the same order, so the stats marker still comes last.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import webdataset as wds

from shards import atomic
from shards.classes import validate_classes
from shards.fs import exists, join, names, read_json, read_parquet, remove
from shards.lock import OutputLock
from shards.manifest import MANIFEST_NAME, SCHEMA, manifest_row, rows_to_table
from shards.pixels import DEFAULT_MAX_PIXELS, TooManyPixels, image_size
from shards.sample import SCHEMA_VERSION, Sample

log = logging.getLogger(__name__)

STATS_NAME = "stats.json"
SIZES_NAME = "sizes.json"
_STATS_SUFFIX = "_stats.json"


class DuplicateKeyError(ValueError):
    """A key was written twice; the message names both places."""


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}"


def _tar_member_size(n: int) -> int:
    """Bytes a member of n bytes takes in the tar: a 512-byte header and its data padded to 512
    (the writer's integer mtime and short names keep tarfile from adding PAX headers)."""
    return 512 + -(-n // 512) * 512


def _image_size(sample: Sample, max_pixels: int | None) -> tuple[int, int]:
    """Width and height from the image header alone: no full decode on the write path."""
    try:
        return image_size(sample.image, max_pixels)
    except TooManyPixels as exc:
        raise TooManyPixels(f"sample {sample.key}: image {exc}: readers skip it; write it anyway with "
                            "max_pixels=None") from None
    except Exception as exc:  # Pillow raises many types for bad bytes
        raise ValueError(f"sample {sample.key}: image bytes are not a readable image ({exc})") from exc


class ShardWriter:
    """Writes samples into `out_dir` as `<prefix>-000000.tar`, ... capped by samples and bytes.

    Use as a context manager; closing finishes the open shard and rebuilds the
    set-level files (`manifest.parquet`, `sizes.json`, `stats.json`). A producer that
    writes in a seeded random order passes its `shuffle_seed`, recorded in `stats.json`
    (null: the producer's own order), so whoever reads the set knows how it was mixed.

    The writer holds the directory's lock (`shards.lock`) from before it touches anything
    until it closes, so a second writer is refused (OutputLocked) before it can delete or
    renumber this one's work. A caller that already holds the lock (a crawl, an import
    into one set) passes it as `lock`; the writer then leaves releasing it to the caller.
    An image over `max_pixels` is refused (TooManyPixels, naming its key); None writes any size.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        classes: Sequence[str],
        prefix: str = "shard",
        max_samples: int = 1000,
        max_bytes: int = 256 * 1024 * 1024,
        shuffle_seed: int | None = None,
        lock: OutputLock | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        if max_samples < 1 or max_bytes < 1:
            raise ValueError("max_samples and max_bytes must be positive")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
            raise ValueError(f"shard prefix {prefix!r}: letters, digits, '_' and '-' only")
        self.out_dir = str(out_dir)
        self.classes = validate_classes(classes)
        self.prefix = prefix
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.shuffle_seed = shuffle_seed
        self.max_pixels = max_pixels
        if lock is not None and not lock.covers(self.out_dir):
            raise ValueError(f"the lock given for {self.out_dir} is not held, or is another directory's")
        self._own_lock = lock is None
        self._lock = OutputLock(self.out_dir).acquire() if lock is None else lock
        try:
            self._check_classes()
            self._discard_unfinished()
            self._known: dict[str, str] = self._finished_keys()
        except BaseException:
            self._release_lock()
            raise
        self._next_index = 1 + max((self._index(s) for s in self.finished_shards()), default=-1)
        self._tar: wds.TarWriter | None = None
        self._tar_file: Any = None
        self._tmp_tar: Path | None = None
        self._tar_commit: contextlib.ExitStack | None = None
        self._rows: list[dict[str, Any]] = []
        self._bytes = 0
        self.written = 0

    # -- set state --------------------------------------------------------------------

    def _check_classes(self) -> None:
        stats_path = join(self.out_dir, STATS_NAME)
        if exists(stats_path):
            existing = read_json(stats_path)["classes"]
            if existing != self.classes:
                raise ValueError(f"{stats_path}: set has classes {existing}, writer was given {self.classes}")

    def finished_shards(self) -> list[str]:
        """Names of finished shards (their stats file exists), in order."""
        return _finished(self.out_dir, self.prefix)

    def _index(self, name: str) -> int:
        return int(name.rsplit("-", 1)[1])

    def _discard_unfinished(self) -> None:
        """Remove temp files and any shard whose stats file (its completion marker) is missing."""
        atomic.remove_temp_files(self.out_dir)
        finished = set(self.finished_shards())
        for name in names(self.out_dir, f"{self.prefix}-*"):
            stem, suffix = os.path.splitext(name)
            if suffix in (".tar", ".parquet") and stem not in finished:
                path = join(self.out_dir, name)
                log.warning("removing unfinished shard file %s", path)
                remove(path)

    def _finished_keys(self) -> dict[str, str]:
        known: dict[str, str] = {}
        for name in self.finished_shards():
            keys = read_parquet(join(self.out_dir, f"{name}.parquet"), columns=["key"]).column("key").to_pylist()
            for key in keys:
                known[key] = f"{name}.tar"
        return known

    def __contains__(self, key: str) -> bool:
        return key in self._known

    # -- writing -----------------------------------------------------------------------

    def write(self, sample: Sample) -> None:
        if not 0 <= sample.label < len(self.classes):
            raise ValueError(f"sample {sample.key}: label {sample.label} outside class list {self.classes}")
        if sample.key in self._known:
            where = self._known[sample.key]
            current = shard_name(self.prefix, self._next_index) + ".tar"
            raise DuplicateKeyError(
                f"duplicate key {sample.key!r}: already in {join(self.out_dir, where)}, written again into "
                f"{join(self.out_dir, current)}"
            )
        width, height = _image_size(sample, self.max_pixels)
        if self._tar is None:
            self._open_shard()
        meta = {
            **sample.meta,
            "label_name": self.classes[sample.label],
            "width": width,
            "height": height,
            "sha256": sample.sha256,
            "schema_version": SCHEMA_VERSION,
        }
        assert self._tar is not None
        members = {
            sample.ext: sample.image,
            "cls": str(sample.label).encode(),
            "json": json.dumps(meta, sort_keys=True, default=str).encode(),
        }
        offset = self._tar.tarstream.offset  # tarfile counts what it wrote, headers and padding included
        self._tar.write({"__key__": sample.key, **members})
        name = shard_name(self.prefix, self._next_index)
        self._rows.append(manifest_row(sample, f"{name}.tar", self.classes[sample.label], width, height, offset))
        self._known[sample.key] = f"{name}.tar"
        self._bytes += sum(_tar_member_size(len(data)) for data in members.values())
        self.written += 1
        if len(self._rows) >= self.max_samples or self._bytes >= self.max_bytes:
            self._finish_shard()

    def _open_shard(self) -> None:
        name = shard_name(self.prefix, self._next_index)
        # The tar is written under a temporary name (on an object store: staged locally) and
        # made final after its manifest rows, by leaving this context.
        self._tar_commit = contextlib.ExitStack()
        self._tmp_tar = self._tar_commit.enter_context(atomic.atomic_path(join(self.out_dir, f"{name}.tar")))
        self._tar_file = open(self._tmp_tar, "wb")
        # A fixed integer mtime makes the same samples give byte-identical tars, and an
        # integer keeps tarfile from adding a PAX header per member (slower to read).
        self._tar = wds.TarWriter(self._tar_file, encoder=False, mtime=0)

    def _finish_shard(self) -> None:
        """Make the open shard final: tar and rows renamed into place, then the stats marker."""
        if self._tar is None:
            return
        assert self._tar_commit is not None
        name = shard_name(self.prefix, self._next_index)
        self._tar.close()
        self._tar_file.close()
        atomic.write_parquet(join(self.out_dir, f"{name}.parquet"), rows_to_table(self._rows))
        self._tar_commit.close()  # the tar under its final name
        per_class = Counter(row["label_name"] for row in self._rows)
        atomic.write_json(
            join(self.out_dir, f"{name}{_STATS_SUFFIX}"),
            {
                "shard": f"{name}.tar",
                "count": len(self._rows),
                "bytes": self._bytes,
                "per_class": dict(sorted(per_class.items())),
                "finished_at": time.time(),
            },
        )
        log.debug("finished shard %s (%d samples)", name, len(self._rows))
        self._tar = self._tar_file = self._tmp_tar = self._tar_commit = None
        self._rows, self._bytes = [], 0
        self._next_index += 1

    def close(self) -> None:
        try:
            self._finish_shard()
            finalize(self.out_dir, self.classes, self.prefix, self.shuffle_seed)
        finally:
            self._release_lock()

    def _release_lock(self) -> None:
        if self._own_lock and self._lock.held:
            self._lock.release()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        # Finished samples are kept even when the caller fails: they are complete.
        self.close()


def finalize(
    out_dir: str | os.PathLike, classes: Sequence[str], prefix: str = "shard", shuffle_seed: int | None = None
) -> dict[str, Any]:
    """Rebuild `manifest.parquet`, `sizes.json` and `stats.json` from the finished shards."""
    out_dir = str(out_dir)
    names = _finished(out_dir, prefix)
    tables = [read_parquet(join(out_dir, f"{name}.parquet")) for name in names]
    # "default" promotion: shards written before a column existed join with nulls in it.
    manifest = pa.concat_tables(tables, promote_options="default") if tables else SCHEMA.empty_table()
    atomic.write_parquet(join(out_dir, MANIFEST_NAME), manifest)
    sizes = {f"{name}.tar": read_json(join(out_dir, f"{name}{_STATS_SUFFIX}"))["count"] for name in names}
    atomic.write_json(join(out_dir, SIZES_NAME), sizes)
    label_names = manifest.column("label_name").to_pylist()
    splits = manifest.column("split").to_pylist()
    stats = {
        "schema_version": SCHEMA_VERSION,
        "classes": list(classes),
        "num_samples": manifest.num_rows,
        "num_shards": len(names),
        "per_class": {c: label_names.count(c) for c in classes},
        "per_split": dict(sorted(Counter(splits).items())),
        "shuffle_seed": shuffle_seed,
        "shards": [f"{name}.tar" for name in names],
    }
    atomic.write_json(join(out_dir, STATS_NAME), stats)
    return stats


def _finished(out_dir: str, prefix: str) -> list[str]:
    """Names of the finished shards in `out_dir` (their stats file exists), in order."""
    return [name[: -len(_STATS_SUFFIX)] for name in names(out_dir, f"{prefix}-*{_STATS_SUFFIX}")]
