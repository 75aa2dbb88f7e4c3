"""A fast, defensive reader of the tar members in a shard.

Python's `tarfile` parses every header field of every member (three members per
sample here), which cost a quarter of the reader's time in `bench/shard_read.py`.
Training only needs each member's name and bytes, so this reads just those: the
ustar name, prefix, size and type fields, plus PAX `path`/`size` records so tars
written by other tools read too. `shards.verify` keeps using `tarfile`, so a bug
here cannot hide a fault there.

Shards may come from anywhere, so every malformed byte is a `TarFormatError` naming the
shard and the offset, never another exception, a hang or an unbounded allocation: names
that are not UTF-8, PAX records that do not advance, sizes past the end of the file.
"""

from __future__ import annotations

import os
from typing import BinaryIO, Iterator

from webdataset.tariterators import base_plus_ext

BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")
_PAX = (b"x", b"g")
#: The largest member read from a stream whose size is unknown: a garbage size field must not allocate terabytes.
MAX_UNSIZED_MEMBER = 1 << 30


class TarFormatError(ValueError):
    """The stream is not a readable tar; the message says where it broke."""


def _octal(field: bytes, where: str) -> int:
    text = field.rstrip(b"\0 ").strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"{where}: bad size field {field!r}") from None


def _text(data: bytes, where: str, what: str) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise TarFormatError(f"{where}: {what} is not UTF-8: {data[:40]!r}") from None


def _pax_records(data: bytes, where: str) -> dict[str, str]:
    """PAX records are `<length> <key>=<value>\\n`, the length counting the whole record."""
    records, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        length = int(data[pos:space]) if space > pos and data[pos:space].isdigit() else 0
        if length <= space - pos or pos + length > len(data):
            raise TarFormatError(f"{where}: bad PAX record at byte {pos} of its header")
        key, sep, value = data[space + 1 : pos + length - 1].partition(b"=")
        if not sep:
            raise TarFormatError(f"{where}: PAX record at byte {pos} has no '='")
        records[_text(key, where, "a PAX key")] = _text(value, where, "a PAX value")
        pos += length
    return records


def _size_of(stream: BinaryIO) -> int | None:
    """The stream's total size when it can tell (files, fsspec files, seekable buffers), else None."""
    try:
        return os.fstat(stream.fileno()).st_size
    except (AttributeError, OSError, ValueError):
        pass
    size = getattr(stream, "size", None)
    if isinstance(size, int):
        return size
    try:
        here = stream.tell()
        end = stream.seek(0, os.SEEK_END)
        stream.seek(here)
        return end
    except (AttributeError, OSError, ValueError):
        return None


def _read_exact(stream: BinaryIO, n: int, where: str) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise TarFormatError(f"{where}: truncated (wanted {n} bytes, got {len(data)})")
    return data


def name_at(stream: BinaryIO, offset: int) -> str | None:
    """The name of the regular member whose ustar header starts at `offset`, or None if no such header
    is there: the check before trusting a recorded offset (a shard rewritten since would misplace it)."""
    stream.seek(offset)
    header = stream.read(BLOCK)
    stream.seek(offset)
    if len(header) < BLOCK or bytes(header[257:262]) != b"ustar" or header[156:157] not in _REGULAR:
        return None
    try:
        name, prefix = header[0:100].rstrip(b"\0").decode(), header[345:500].rstrip(b"\0").decode()
    except UnicodeDecodeError:
        return None
    return f"{prefix}/{name}" if prefix else name


def leading_sample(members: Iterator[tuple[str, bytes]], key: str) -> dict[str, bytes]:
    """The members (extension -> bytes) at the head of `members` that belong to sample `key`.
    Keys hold no dots, so a member's extension follows its first dot."""
    sample: dict[str, bytes] = {}
    for name, data in members:
        member_key, _, ext = name.partition(".")
        if member_key != key:
            break
        sample[ext] = data
    return sample


def members_at(stream: BinaryIO, url: str, key: str, offset: int) -> dict[str, bytes] | None:
    """The members of the sample `key` whose first member's header starts at `offset`, or None if
    it does not: a recorded offset is a hint that a shard rewritten since may have made wrong."""
    name = name_at(stream, offset)
    if name is None or name.partition(".")[0] != key:
        return None
    return leading_sample(iter_members(stream, url), key)


def iter_members(stream: BinaryIO, url: str = "<stream>", skip_samples: int = 0) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file, in archive order.

    The first `skip_samples` samples (runs of members sharing a webdataset key) are
    passed over by seeking, their data unread: a reader that starts in the middle of a
    shard pays for headers only.
    """
    total = _size_of(stream)
    pax: dict[str, str] = {}
    seen, last_key = 0, None  # samples met while skipping, and the key of the last one
    while True:
        offset = stream.tell()
        header = stream.read(BLOCK)
        if header == bytes(BLOCK):
            return  # the end-of-archive marker
        where = f"{url} @ {offset}"
        if len(header) < BLOCK:
            raise TarFormatError(f"{where}: truncated (no end-of-archive marker)")
        if bytes(header[257:262]) != b"ustar":
            raise TarFormatError(f"{where}: not a ustar header")
        kind = header[156:157]
        size = _octal(header[124:136], where)
        if "size" in pax:
            if not pax["size"].isdigit():
                raise TarFormatError(f"{where}: bad PAX size {pax['size'][:40]!r}")
            size = int(pax["size"])
        padded = size + (-size % BLOCK)
        limit = MAX_UNSIZED_MEMBER if total is None else total
        if offset + BLOCK + padded > limit:
            raise TarFormatError(f"{where}: truncated (a member of {size} bytes runs past {limit} bytes)")
        if kind in _PAX:
            data = _read_exact(stream, padded, where)[:size]
            if kind == b"x":
                pax = _pax_records(data, where)
            continue
        if kind not in _REGULAR:
            pax = {}
            stream.seek(padded, os.SEEK_CUR)
            continue
        name = _text(header[0:100].rstrip(b"\0"), where, "the member name")
        prefix = _text(header[345:500].rstrip(b"\0"), where, "the name prefix")
        if prefix:
            name = f"{prefix}/{name}"
        name = pax.get("path", name)
        pax = {}
        if skip_samples:
            key = base_plus_ext(name)[0]
            if key != last_key:
                seen, last_key = seen + 1, key
            if seen <= skip_samples:
                stream.seek(padded, os.SEEK_CUR)
                continue
            skip_samples = 0  # past the skipped samples: no more keys to count
        yield name, _read_exact(stream, padded, where)[:size]
