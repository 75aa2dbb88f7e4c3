"""A fast reader of the tar members in a shard.

Python's `tarfile` parses every header field of every member (three members per
sample here), which cost a quarter of the reader's time in `bench/shard_read.py`.
Training only needs each member's name and bytes, so this reads just those: the
ustar name, prefix, size and type fields, plus PAX `path`/`size` records so tars
written by other tools read too. `shards.verify` keeps using `tarfile`, so a bug
here cannot hide a fault there.
"""

from __future__ import annotations

from typing import BinaryIO, Iterator

BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")
_PAX = (b"x", b"g")


class TarFormatError(ValueError):
    """The stream is not a readable tar; the message says where it broke."""


def _octal(field: bytes, where: str) -> int:
    text = field.rstrip(b"\0 ").strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"{where}: bad size field {field!r}") from None


def _pax_records(data: bytes) -> dict[str, str]:
    """PAX records are `<length> <key>=<value>\\n`, the length counting the whole record."""
    records, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode()] = value.decode()
        pos += length
    return records


def _read_exact(stream: BinaryIO, n: int, where: str) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise TarFormatError(f"{where}: truncated (wanted {n} bytes, got {len(data)})")
    return data


def iter_members(stream: BinaryIO, url: str = "<stream>") -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file, in archive order."""
    pax: dict[str, str] = {}
    while True:
        header = stream.read(BLOCK)
        if header == bytes(BLOCK):
            return  # the end-of-archive marker
        if len(header) < BLOCK:
            raise TarFormatError(f"{url}: truncated (no end-of-archive marker)")
        where = f"{url} @ {stream.tell() - BLOCK}"
        if bytes(header[257:262]) != b"ustar":
            raise TarFormatError(f"{where}: not a ustar header")
        kind = header[156:157]
        size = int(pax["size"]) if "size" in pax else _octal(header[124:136], where)
        data = _read_exact(stream, size + (-size % BLOCK), where)[:size]  # with padding to the next block
        if kind in _PAX:
            if kind == b"x":
                pax = _pax_records(data)
            continue
        if kind not in _REGULAR:
            pax = {}
            continue
        name = header[0:100].rstrip(b"\0").decode()
        prefix = header[345:500].rstrip(b"\0").decode()
        if prefix:
            name = f"{prefix}/{name}"
        if "path" in pax:
            name = pax["path"]
        pax = {}
        yield name, data
