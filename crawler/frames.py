"""The frame stage: video bytes in, a few upright RGB frames (or a recorded reason) out.

The paper's WebEmotion images were frames of search-result videos. A video holds the
same face for seconds, so frames are taken at fixed times (`every_s` apart, at most
`max_frames`, spread over the whole video when it is longer) rather than all of them;
near-identical frames that remain are removed later by the pHash stage. Each target
time is reached by seeking to the keyframe before it and decoding forward, so a long
video costs a few group-of-pictures decodes, not a full decode. Frame size is checked
against `max_pixels` before a frame is converted, as the image decoder checks headers.
PyAV (FFmpeg) is an optional extra, imported on first use.

Video bytes come from the open web, and FFmpeg left to guess a format from them obeys
some formats that open other things: an ffconcat list reads files of the working
directory (a frame of `secret.png` would become a sample), SDP opens UDP sockets, HLS
and DASH playlists fetch segment URLs, image2 reads file patterns, tty renders text as a
picture. So the container is named here from its own magic bytes, and only the formats a
video file is (`CONTAINERS`: ISO BMFF, i.e. MP4/MOV/M4A/3GP, and Matroska/WebM) are opened,
with that demuxer forced (FFmpeg never guesses), `format_whitelist` holding only those
demuxers and `protocol_whitelist` naming no protocol, so a demuxer cannot open a file or a
socket of its own; only the bytes in memory are read. Anything else is `not_video`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

INSTALL_HINT = "pip install 'scn-scale[video]'"

#: FFmpeg demuxer -> what it reads. Nothing else is ever opened.
CONTAINERS = {"mov": "ISO BMFF: MP4, MOV, M4A, 3GP", "matroska": "Matroska, WebM"}
#: Box types an ISO BMFF file starts with (`ftyp`; QuickTime files may start with another top-level box).
_ISO_BMFF_FIRST_BOXES = frozenset({b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide"})
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"
#: What FFmpeg is told: these demuxers only, and no protocol at all for anything a demuxer would open
#: itself (no FFmpeg protocol is called "none"; the input is read from memory, through no protocol).
FFMPEG_OPTIONS = {"format_whitelist": ",".join(CONTAINERS), "protocol_whitelist": "none"}


@dataclass(frozen=True)
class FrameConfig:
    #: Seconds between sampled frames.
    every_s: float = 1.0
    #: Most frames taken from one video; a longer video gets them spread evenly over its length.
    max_frames: int = 32
    #: Largest accepted frame, in pixels.
    max_pixels: int = 8_000_000
    #: Largest video accepted by the fetch stage, in bytes (images keep `fetch.max_bytes`).
    max_bytes: int = 200 * 1024 * 1024

    def validate(self) -> "FrameConfig":
        for name in ("every_s", "max_frames", "max_pixels", "max_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"frames setting {name} must be positive, got {getattr(self, name)}")
        return self


@dataclass
class Frame:
    time_s: float
    image: Image.Image


@dataclass
class FrameResult:
    status: str  # "ok", "not_video", "no_video_stream", "frame_too_large", "video_error"
    frames: list[Frame] = field(default_factory=list)
    error: str | None = None
    width: int | None = None
    height: int | None = None
    duration_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def sample_times(duration_s: float | None, cfg: FrameConfig) -> list[float]:
    """Target times: 0, every_s, 2*every_s, ... below the duration, thinned evenly to max_frames."""
    if not duration_s or duration_s <= 0:
        return [0.0]  # unknown length (a live or broken index): the first frame only
    count = int(duration_s // cfg.every_s) + (duration_s % cfg.every_s > 0)
    if count <= cfg.max_frames:
        return [i * cfg.every_s for i in range(count)]
    step = duration_s / cfg.max_frames
    return [i * step for i in range(cfg.max_frames)]


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise RuntimeError(f"sampling video frames needs PyAV: {INSTALL_HINT}") from None
    return av


def container_format(data: bytes) -> str | None:
    """The demuxer of `CONTAINERS` whose magic bytes `data` starts with, or None."""
    if len(data) >= 8 and data[4:8] in _ISO_BMFF_FIRST_BOXES:
        return "mov"
    if data.startswith(_EBML_MAGIC):
        return "matroska"
    return None


def sample_frames(data: bytes, cfg: FrameConfig) -> FrameResult:
    """Frames of one video at `sample_times`; a broken or hostile file is a status, never an exception."""
    av = _av()
    fmt = container_format(data)
    if fmt is None:
        return FrameResult("not_video", error=f"not a video container ({'; '.join(CONTAINERS.values())}): "
                                              f"starts with {data[:16]!r}")
    try:
        container = av.open(io.BytesIO(data), mode="r", format=fmt, options=FFMPEG_OPTIONS)
    except av.error.FFmpegError as e:
        return FrameResult("not_video", error=f"{type(e).__name__}: {e}"[:300])
    with container:
        if not container.streams.video:
            return FrameResult("no_video_stream", error="the file has no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        duration = _duration(container, stream)
        result = FrameResult("ok", width=width, height=height, duration_s=duration)
        if width * height > cfg.max_pixels:
            result.status, result.error = "frame_too_large", f"{width}x{height} frames > {cfg.max_pixels} pixels"
            return result
        try:
            for t in sample_times(duration, cfg):
                frame = _frame_at(container, stream, t)
                if frame is None:
                    break  # past the last decodable frame
                result.frames.append(Frame(round(float(frame.time or 0.0), 3), frame.to_image().convert("RGB")))
        except av.error.FFmpegError as e:
            result.error = f"{type(e).__name__}: {e}"[:300]
            if not result.frames:
                result.status = "video_error"
        return result


def _duration(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # microseconds (av.time_base)
    return None


def _frame_at(container: Any, stream: Any, t: float) -> Any:
    """The first frame at or after time `t`: seek to the keyframe before it, decode forward."""
    if stream.time_base is not None:
        container.seek(int(t / stream.time_base), stream=stream, backward=True, any_frame=False)
    for frame in container.decode(stream):
        if frame.time is None or frame.time >= t - 1e-3:
            return frame
    return None
