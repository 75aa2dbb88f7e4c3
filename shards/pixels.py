"""The pixel cap: an image's declared size, read from its header, checked before anything decodes it.

A 17 KB PNG may declare 12000x12000 pixels, a 432 MB RGB tensor once decoded, and a
shard set may come from a hostile crawl or another tool: a loader worker that decodes
what a header declares can be killed for memory sample after sample. Pillow opens
lazily (`Image.open` reads the header only), so the size costs nothing to learn. Every
reader of shard images (the training and evaluation stream, reports and galleries,
verify, split) and the writer ask `image_size` first; an image Pillow refuses to open as a
decompression bomb counts as over the cap whatever the cap. The writer refuses an image over the cap, naming its
key, unless it is told otherwise (`max_pixels=None`).
"""

from __future__ import annotations

import io
import os
import warnings

from PIL import Image

#: Largest image read from a shard, in pixels (the crawler's `decode.max_pixels` default too).
DEFAULT_MAX_PIXELS = 40_000_000


class TooManyPixels(ValueError):
    """An image declares more pixels than the cap allows."""


def image_size(source: bytes | str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Width and height from the image header alone; TooManyPixels over `max_pixels` (None: no cap).

    Raises what Pillow raises for bytes (or a file) that are not an image.
    """
    data = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the cap below decides, naming the size
        try:
            with Image.open(data) as im:
                width, height = im.size
        except Image.DecompressionBombError as exc:  # twice Pillow's own limit: it will not even open it
            raise TooManyPixels(str(exc)) from None
    if max_pixels is not None and width * height > max_pixels:
        raise TooManyPixels(f"{width}x{height} is {width * height} pixels, over the cap of {max_pixels}")
    return width, height
