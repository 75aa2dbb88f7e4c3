"""File-system access for shard sets, crawls, runs and reports: local paths and object-store URLs alike.

Clusters keep their data in object storage (s3://, gs://), laptops and tests in a
directory; fsspec gives both one interface. Every command reaches its inputs and outputs
through `open_fs`, so a URL whose scheme fsspec does not know, or whose package is not
installed, is one error naming it in every command, never a local folder named after it
(`pathlib.Path("s3://b/x")` is the relative path `s3:/b/x`).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

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


def _fresh(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """`open_fs`, with what the file system remembers of `url`'s listing forgotten: s3fs and gcsfs cache
    listings, and a resume or a lock must see what another process or node wrote since."""
    fs, path = open_fs(url)
    fs.invalidate_cache(path)
    return fs, path


def exists(url: str) -> bool:
    fs, path = _fresh(url)
    return fs.exists(path)


def is_file(url: str) -> bool:
    fs, path = _fresh(url)
    return fs.isfile(path)


def is_dir(url: str) -> bool:
    """A directory, or on an object store a prefix that holds objects."""
    fs, path = _fresh(url)
    return fs.isdir(path)


def names(url: str, pattern: str = "*") -> list[str]:
    """The sorted names (not paths) in directory `url` matching the glob `pattern`; none for a missing directory."""
    fs, path = _fresh(url)
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


@contextlib.contextmanager
def local_dir(url: str) -> Iterator[Path]:
    """A local directory standing for the output directory `url`: `url` itself on this machine; for an
    object store, a temporary one whose files are uploaded under `url` when the block succeeds.

    For outputs a command writes whole at its end from one process (reports, whose HTML page reads
    its PNGs back to inline them; an exported model): their writers want files. Files are uploaded
    one whole object each, in the order they were written, so a page comes after its pictures;
    nothing is uploaded when the block fails.
    """
    fs, path = open_fs(url)
    if is_local(fs):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix=".staged-") as tmp:
        yield Path(tmp)
        upload(Path(tmp), url)


def upload(local: Path, url: str) -> None:
    """Copy the files under the local directory `local` to `url`, each whole, in the order they were
    written (a set's stats.json, a report's page last); hidden files (locks, temporaries) stay."""
    fs, path = open_fs(url)
    files = [p for p in local.rglob("*") if p.is_file() and not p.name.startswith(".")]
    for file in sorted(files, key=lambda p: p.stat().st_mtime_ns):
        fs.put_file(str(file), join(path, file.relative_to(local).as_posix()))


def remove(url: str, recursive: bool = False) -> None:
    """Delete a file, or with `recursive` a directory (a prefix on an object store) and all it holds."""
    fs, path = open_fs(url)
    fs.rm(path, recursive=recursive)
