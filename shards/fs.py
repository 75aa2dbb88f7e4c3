"""File-system access for shard sets: local paths and object-store URLs alike.

Clusters read shards from object storage (s3://, gs://), laptops and tests from a
directory; fsspec gives both one interface.
"""

from __future__ import annotations

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
