"""File-system access for shard sets: local paths and object-store URLs alike.

Clusters read shards from object storage (s3://, gs://), laptops and tests from a
directory; fsspec gives both one interface.
"""

from __future__ import annotations

import json
from typing import Any

import fsspec


def open_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The file system of `url` and the path inside it."""
    fs, path = fsspec.core.url_to_fs(str(url))
    return fs, path.rstrip("/")


def join(root: str, name: str) -> str:
    return f"{root}/{name}" if root else name


def to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A URL that `fsspec.open` reads again, on any node."""
    return fs.unstrip_protocol(path)


def read_json(url: str) -> Any:
    """A JSON file (local path or URL); one that is not UTF-8 JSON is a ValueError naming it (a missing one,
    FileNotFoundError), so a command can report a corrupt `stats.json` as that file and not as a parser's position."""
    fs, path = open_fs(url)
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError alike
        raise ValueError(f"{url}: not a readable JSON file ({exc})") from exc
