"""The decode stage: image bytes in, an upright RGB `PIL.Image` (or a recorded reason) out.

Web bytes are hostile. The pixel count is read from the header (Pillow opens lazily)
and checked before any pixel is decoded, so a 400 KB PNG declaring 20000x20000 pixels
costs nothing; Pillow's own `DecompressionBombWarning` is turned into an error for this
call only (`warnings.catch_warnings`, no global state changed); only common raster
formats are opened (never EPS, which would run Ghostscript). JPEGs may be decoded at a
reduced scale (`draft_min_side`) when the consumer needs no more pixels than that, which
is most of the cost saved when faces are off.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from typing import Protocol

from PIL import Image, ImageOps, UnidentifiedImageError

from shards.pixels import DEFAULT_MAX_PIXELS

log = logging.getLogger(__name__)

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


@dataclass(frozen=True)
class DecodeConfig:
    #: Largest accepted image, in pixels, read from the header before decoding.
    max_pixels: int = DEFAULT_MAX_PIXELS
    #: Smallest accepted side, in pixels (0: any); smaller pictures are counted as `too_small`. Under 32 px
    #: a picture holds no face worth a 112 px crop (it would be blur upscaled 3.5x and more, and FER's
    #: smallest common source, FER2013, is 48 px); it matters for `--faces none`, where the picture *is*
    #: the face: the detectors' own floor (`faces.min_face_size`, 40) already refuses such faces.
    min_side: int = 32
    #: When set, JPEGs are decoded at the smallest 1/2, 1/4 or 1/8 scale that keeps both sides >= this.
    draft_min_side: int | None = None
    formats: tuple[str, ...] = FORMATS

    def validate(self) -> "DecodeConfig":
        if self.max_pixels <= 0:
            raise ValueError(f"decode setting max_pixels must be positive, got {self.max_pixels}")
        if self.min_side < 0:
            raise ValueError(f"decode setting min_side must be >= 0, got {self.min_side}")
        if self.draft_min_side is not None and self.draft_min_side <= 0:
            raise ValueError(f"decode setting draft_min_side must be positive, got {self.draft_min_side}")
        unknown = set(self.formats) - set(Image.registered_extensions().values())
        if unknown:
            raise ValueError(f"decode setting formats: Pillow cannot read {sorted(unknown)}")
        return self


@dataclass
class DecodeResult:
    status: str  # "ok", "not_image", "truncated", "too_many_pixels", "decompression_bomb", "too_small", "decode_error"
    image: Image.Image | None = None
    error: str | None = None
    width: int | None = None  # as stored (before EXIF rotation and draft scaling)
    height: int | None = None
    format: str | None = None
    #: Original pixels per decoded pixel (> 1 when a JPEG was decoded at a reduced scale).
    scale: float = 1.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class DecodeStage(Protocol):
    def __call__(self, data: bytes) -> DecodeResult: ...


class Decoder:
    def __init__(self, config: DecodeConfig | None = None) -> None:
        self.config = (config or DecodeConfig()).validate()

    def __call__(self, data: bytes) -> DecodeResult:
        cfg = self.config
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                im = Image.open(io.BytesIO(data), formats=list(cfg.formats))
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                return DecodeResult("decompression_bomb", error=str(exc))
            except UnidentifiedImageError as exc:
                return DecodeResult("not_image", error=str(exc)[:300])
            except Exception as exc:  # Pillow raises many types for malformed headers
                return DecodeResult("not_image", error=f"{type(exc).__name__}: {exc}"[:300])
            width, height = im.size
            result = DecodeResult("ok", width=width, height=height, format=im.format)
            if width * height > cfg.max_pixels:
                result.status, result.error = "too_many_pixels", f"{width}x{height} > {cfg.max_pixels} pixels"
                return result
            if min(width, height) < cfg.min_side:
                result.status, result.error = "too_small", f"{width}x{height}: a side under {cfg.min_side}"
                return result
            try:
                if cfg.draft_min_side and im.format == "JPEG":
                    im.draft("RGB", (cfg.draft_min_side, cfg.draft_min_side))
                im.load()
                im = ImageOps.exif_transpose(im)
                if im.mode != "RGB":
                    im = im.convert("RGB")
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                result.status, result.error = "decompression_bomb", str(exc)
                return result
            except OSError as exc:
                # Pillow reports cut-off data as OSError ("image file is truncated", "broken data stream").
                result.status, result.error = "truncated", str(exc)[:300]
                return result
            except Exception as exc:  # corrupt data inside a valid header
                result.status, result.error = "decode_error", f"{type(exc).__name__}: {exc}"[:300]
                return result
        result.image = im
        result.scale = max(width, height) / max(im.size)
        return result
