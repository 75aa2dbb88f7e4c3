"""Atomic file writes: a reader never sees half a file, a crash never leaves one under its final name.

Everything the project persists (shards, manifests, stats, relabel tables, reports,
checkpoints) goes through these helpers so that "the file exists" always means
"the file is complete". A destination may be an object-store URL (`shards.fs`): the
bytes are then written to a local temporary file and uploaded when complete;
an object store shows an object only once its upload completed, so the same holds there.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

from shards.fs import is_local, names, open_fs


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary file lives in the same directory so the final rename is atomic
    (same file system) and is named `.<name>.<random>.tmp` so listings skip it. Whatever
    wrote it (a file object, torch.save, pyarrow, ONNX), its bytes are fsynced before the
    rename and the rename is fsynced after, so a power loss cannot leave an empty file
    under the final name.
    """
    fs, fs_path = open_fs(str(path))
    if not is_local(fs):
        with _uploaded(fs, fs_path) as tmp:
            yield tmp
        return
    path = Path(fs_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes files private (0600); results are meant to be shared
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync(tmp_path)
        os.replace(tmp_path, path)
        _fsync(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def _uploaded(fs: Any, path: str) -> Iterator[Path]:
    """A local temporary file, uploaded to `path` on `fs` if the block succeeds (a store shows no half-uploaded object)."""
    with tempfile.TemporaryDirectory(prefix=".upload-") as tmp_dir:
        tmp = Path(tmp_dir) / path.rsplit("/", 1)[-1]
        yield tmp
        fs.put_file(str(tmp), path)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file for writing that replaces `path` when closed without error."""
    with atomic_path(path) as tmp:
        with open(tmp, mode) as f:
            yield f


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_parquet(path: str | os.PathLike, table: "pyarrow.Table") -> None:  # noqa: F821
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def is_temp(path: str | os.PathLike) -> bool:
    """True for the leftovers of an interrupted atomic write."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(".tmp")


def remove_temp_files(directory: str | os.PathLike) -> list[str]:
    """Delete what interrupted atomic writes left in `directory` (none of it is ever read); returns the paths.

    Only local directories have any: a write to an object store stages its bytes on the writer's disk.
    """
    fs, root = open_fs(str(directory))
    if not is_local(fs):
        return []
    leftovers = [os.path.join(root, name) for name in names(str(directory), ".*.tmp")]
    for path in leftovers:
        os.unlink(path)
    return leftovers
