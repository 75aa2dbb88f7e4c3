"""File-system access for shard sets, crawls, runs and reports: local paths and object-store URLs alike.

Clusters keep their data in object storage (s3://, gs://), laptops and tests in a
directory; fsspec gives both one interface. Every command reaches its inputs and outputs
through `open_fs`, so a URL whose scheme fsspec does not know, or whose package is not
installed, is one error naming it in every command, never a local folder named after it
(`pathlib.Path("s3://b/x")` is the relative path `s3:/b/x`).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import fsspec


class UnknownScheme(ValueError):
    """A URL this installation cannot open; the message names the URL and what to install."""


def open_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The file system of `url` and the path inside it; UnknownScheme for a scheme that cannot be opened here."""
    url = str(url)
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as exc:  # a scheme fsspec knows whose package is missing (gs:// without gcsfs)
        raise UnknownScheme(f"{url}: cannot open this URL here ({exc})") from exc
    except ValueError as exc:
        if "Protocol not known" not in str(exc):
            raise
        scheme = fsspec.core.split_protocol(url)[0]
        raise UnknownScheme(f"{url}: unknown URL scheme {scheme!r} (a local path, or s3://, gs://, ... with "
                            "their fsspec package installed)") from exc
    return fs, path.rstrip("/")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether `fs` is this machine's own file system (renames are atomic, flock works)."""
    return "file" in fs.protocol


def join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if root else name


def to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A URL that `fsspec.open` reads again, on any node."""
    return fs.unstrip_protocol(path)


def exists(url: str) -> bool:
    fs, path = open_fs(url)
    return fs.exists(path)


def is_file(url: str) -> bool:
    fs, path = open_fs(url)
    return fs.isfile(path)


def is_dir(url: str) -> bool:
    """A directory, or on an object store a prefix that holds objects."""
    fs, path = open_fs(url)
    return fs.isdir(path)


def names(url: str, pattern: str = "*") -> list[str]:
    """The sorted names (not paths) in directory `url` matching the glob `pattern`; none for a missing directory."""
    fs, path = open_fs(url)
    return sorted(p.rsplit("/", 1)[-1] for p in fs.glob(join(path, pattern)))


def read_bytes(url: str) -> bytes:
    fs, path = open_fs(url)
    return fs.cat_file(path)


def read_json(url: str) -> Any:
    """A JSON file (local path or URL); one that is not UTF-8 JSON is a ValueError naming it (a missing one,
    FileNotFoundError), so a command can report a corrupt `stats.json` as that file and not as a parser's position."""
    fs, path = open_fs(url)
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError alike
        raise ValueError(f"{url}: not a readable JSON file ({exc})") from exc


def read_parquet(url: str, columns: Sequence[str] | None = None) -> "pyarrow.Table":  # noqa: F821
    """A parquet file through fsspec (the store's own client and credentials, as every other read)."""
    import pyarrow.parquet as pq

    fs, path = open_fs(url)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=list(columns) if columns is not None else None)


def remove(url: str) -> None:
    fs, path = open_fs(url)
    fs.rm(path)
