"""The decode stage: hostile bytes become statuses; good ones an upright RGB image."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image

from crawler.decode import DecodeConfig, Decoder
from test_hostile_server import bomb_png


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def gradient(width: int = 64, height: int = 48) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)
    y = np.linspace(0, 255, height, dtype=np.uint8)
    pixels = np.stack([np.tile(x, (height, 1)), np.tile(y[:, None], (1, width)), np.full((height, width), 80, np.uint8)], -1)
    return Image.fromarray(pixels)


def test_good_jpeg_and_png() -> None:
    decode = Decoder()
    for fmt in ("JPEG", "PNG", "WEBP"):
        result = decode(encode(gradient(), fmt))
        assert result.ok, result
        assert result.image.mode == "RGB" and result.image.size == (64, 48)
        assert (result.width, result.height, result.format) == (64, 48, fmt)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "1", "CMYK", "I;16"])
def test_any_mode_becomes_rgb(mode: str) -> None:
    image = gradient().convert(mode) if mode != "I;16" else Image.new("I;16", (40, 32))
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    result = Decoder()(encode(image, fmt))
    assert result.ok and result.image.mode == "RGB"


def test_exif_orientation_is_applied() -> None:
    image = gradient(64, 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    result = Decoder()(encode(image, "JPEG", exif=exif))
    assert result.ok
    assert result.image.size == (32, 64)
    assert (result.width, result.height) == (64, 32)  # as stored


def test_not_an_image() -> None:
    decode = Decoder()
    for data in (b"<!DOCTYPE html><html><body>Access denied</body></html>", b"", b"\x00" * 100, b"GIF89a"):
        assert decode(data).status == "not_image"


def test_unlisted_formats_are_not_opened() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    assert Decoder()(eps).status == "not_image"  # never handed to Ghostscript
    bmp = encode(gradient(), "BMP")
    assert Decoder(DecodeConfig(formats=("JPEG", "PNG")))(bmp).status == "not_image"
    assert Decoder()(bmp).ok


def test_truncated() -> None:
    data = encode(gradient(256, 256), "JPEG", quality=95)
    result = Decoder()(data[: len(data) // 2])
    assert result.status == "truncated" and result.image is None
    png = encode(gradient(256, 256), "PNG")
    assert Decoder()(png[: len(png) // 2]).status == "truncated"


def test_pixel_count_is_checked_from_the_header() -> None:
    bomb = bomb_png(7_000, 7_000)  # 49 M pixels: under Pillow's own limit, over ours
    result = Decoder(DecodeConfig(max_pixels=40_000_000))(bomb)
    assert result.status == "too_many_pixels"
    assert (result.width, result.height) == (7_000, 7_000)


def test_decompression_bombs() -> None:
    decode = Decoder(DecodeConfig(max_pixels=10**12))  # let Pillow's checks speak
    assert decode(bomb_png(10_000, 10_000)).status == "decompression_bomb"  # a warning, made an error
    assert decode(bomb_png(20_000, 20_000)).status == "decompression_bomb"  # Pillow's own error


def test_warning_filters_are_left_as_they_were() -> None:
    before = list(warnings.filters)
    Decoder()(bomb_png(10_000, 10_000))
    assert warnings.filters == before
    assert Image.MAX_IMAGE_PIXELS == 89_478_485


def test_too_small() -> None:
    assert Decoder(DecodeConfig(min_side=50))(encode(gradient(64, 48))).status == "too_small"
    # On by default: a 2x2 picture is no face, whatever the face mode does with it next.
    assert Decoder()(encode(gradient(2, 2), "PNG")).status == "too_small"
    assert Decoder()(encode(gradient(32, 32), "PNG")).ok
    assert Decoder(DecodeConfig(min_side=0))(encode(gradient(2, 2), "PNG")).ok


def test_draft_decodes_big_jpegs_small() -> None:
    data = encode(gradient(1600, 1200))
    result = Decoder(DecodeConfig(draft_min_side=200))(data)
    assert result.ok
    assert min(result.image.size) >= 200 and result.image.size[0] < 1600
    assert result.scale == pytest.approx(1600 / result.image.size[0], rel=0.01)
    assert (result.width, result.height) == (1600, 1200)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        DecodeConfig(max_pixels=0).validate()
    with pytest.raises(ValueError):
        DecodeConfig(formats=("EXR-NOT-A-FORMAT",)).validate()
