"""Video: frames sampled with PyAV, watch pages resolved by yt-dlp, faces written with their frame times.

The videos are encoded here with PyAV from photos that ship in packages (scikit-image's
astronaut, matplotlib's Grace Hopper), so MTCNN has real faces to find. The server runs
on 127.0.0.1 in this process; a second one on 127.0.0.2 plays an internal host left off
the allow-list, which must see no request. YouTube itself cannot be reached here: yt-dlp
resolves pages through its generic extractor, the same call it makes for a watch page.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import os
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from PIL import Image

from crawler import build
from crawler.frames import FFMPEG_OPTIONS, FrameConfig, container_format, sample_frames, sample_times
from crawler.localweb import ServerThread
from shards import key_from_source, read_manifest
from shards.verify import verify
from test_faces import astronaut, grace_hopper

av = pytest.importorskip("av")
pytest.importorskip("yt_dlp")

SIZE = 320


def encode_video(pictures: list[tuple[Image.Image, float]], fps: int = 10, container: str = "mp4",
                 codec: str = "mpeg4") -> bytes:
    """A video (MPEG-4 in MP4 unless told otherwise) showing each picture for its number of seconds."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        for picture, seconds in pictures:
            frame = av.VideoFrame.from_image(picture.convert("RGB").resize((SIZE, SIZE)))
            for _ in range(round(seconds * fps)):
                for packet in stream.encode(frame):
                    out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def audio_only() -> bytes:
    """An M4A file (ISO BMFF, an allowed container) holding sound only."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 8000), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def difference(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=float) - np.asarray(b.convert("RGB").resize(a.size), dtype=float)).mean())


def test_sample_times_are_spaced_and_capped() -> None:
    cfg = FrameConfig(every_s=2.0, max_frames=4)
    assert sample_times(5.0, cfg) == [0.0, 2.0, 4.0]
    assert sample_times(4.0, cfg) == [0.0, 2.0]
    assert sample_times(80.0, cfg) == [0.0, 20.0, 40.0, 60.0]  # spread over the whole video
    assert sample_times(None, cfg) == [0.0]
    with pytest.raises(ValueError, match="every_s"):
        FrameConfig(every_s=0).validate()


def test_frames_are_the_pictures_shown_at_those_times() -> None:
    pictures = [astronaut(), grace_hopper(), astronaut().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    data = encode_video([(p, 1.0) for p in pictures])
    result = sample_frames(data, FrameConfig(every_s=1.0))
    assert result.ok and (result.width, result.height) == (SIZE, SIZE)
    assert result.duration_s == pytest.approx(3.0, abs=0.2)
    assert [f.time_s for f in result.frames] == [0.0, 1.0, 2.0]
    for frame, picture in zip(result.frames, pictures):
        assert frame.image.mode == "RGB"
        assert difference(frame.image, picture) < 12  # the picture, through lossy coding
        assert min(difference(frame.image, other) for other in pictures if other is not picture) > 25


def test_broken_files_are_statuses() -> None:
    data = encode_video([(grace_hopper(), 1.0)])
    assert sample_frames(b"<html>not a video</html>", FrameConfig()).status == "not_video"
    assert sample_frames(audio_only(), FrameConfig()).status == "no_video_stream"
    large = sample_frames(data, FrameConfig(max_pixels=SIZE * SIZE - 1))
    assert (large.status, large.frames) == ("frame_too_large", [])
    truncated = sample_frames(data[: len(data) // 3], FrameConfig())
    assert truncated.status in ("ok", "video_error", "not_video")  # whatever survives, no exception


def ffconcat_of(name: str) -> bytes:
    return f"ffconcat version 1.0\nfile '{name}'\n".encode()


#: An SDP description: FFmpeg's sdp demuxer would open RTP/UDP sockets on port 5004 and wait for packets.
SDP = (b"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=stream\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       b"m=video 5004 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n")
#: Other bodies FFmpeg would obey if it guessed: playlists (segment URLs), a manifest, text, a picture.
NOT_VIDEO = {
    "hls": b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nsecret.png\n#EXT-X-ENDLIST\n",
    "dash": b'<?xml version="1.0"?><MPD xmlns="urn:mpeg:dash:schema:mpd:2011"><Period><AdaptationSet>'
            b'<Representation><BaseURL>file:secret.png</BaseURL></Representation></AdaptationSet></Period></MPD>',
    "tty": b"OPENVERSE_CLIENT_SECRET=hunter2\n" * 40,
    "image2": b"",  # filled with a PNG below
    "sdp": SDP,
}


def png_of(colour: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def planted(tmp_path: Path, monkeypatch) -> Path:
    """A 'secret' picture in the working directory, where an ffconcat list would find it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.png").write_bytes(png_of((255, 0, 0)))
    return tmp_path / "secret.png"


def test_only_video_containers_are_opened_and_ffmpeg_opens_nothing_itself(planted: Path) -> None:
    body = ffconcat_of(planted.name)
    # The hazard is real here: FFmpeg left to guess reads the planted file as a frame.
    with av.open(io.BytesIO(body)) as guessed:
        assert guessed.format.name == "concat"
        assert next(guessed.decode(video=0)).to_image().size == (64, 48)
    result = sample_frames(body, FrameConfig())
    assert (result.status, result.frames) == ("not_video", [])
    for name, data in {**NOT_VIDEO, "image2": png_of((0, 0, 255))}.items():
        assert container_format(data) is None, name
        assert sample_frames(data, FrameConfig()).status == "not_video", name
    # Under the sniffing, FFmpeg's own options hold too: concat is not an allowed demuxer, and nothing
    # a demuxer would open itself gets a protocol.
    with pytest.raises(av.error.FFmpegError):
        av.open(io.BytesIO(body), options=FFMPEG_OPTIONS)
    with pytest.raises(av.error.FFmpegError):
        av.open(io.BytesIO(body), options={"protocol_whitelist": FFMPEG_OPTIONS["protocol_whitelist"]})
    # Real videos still open: MP4 and MOV (ISO BMFF), WebM and Matroska.
    picture = grace_hopper()
    for container, codec, fmt in (("mp4", "mpeg4", "mov"), ("mov", "mpeg4", "mov"), ("webm", "libvpx", "matroska"),
                                  ("matroska", "mpeg4", "matroska")):
        data = encode_video([(picture, 1.0)], container=container, codec=codec)
        assert container_format(data) == fmt, container
        decoded = sample_frames(data, FrameConfig())
        assert decoded.ok and len(decoded.frames) == 1, container
        assert difference(decoded.frames[0].image, picture) < 15, container


def _udp_sockets() -> set[str]:
    """Inodes of the UDP sockets this process holds."""
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # an fd closed while listed
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:["):
                mine.add(link[8:-1])
    udp = set()
    for table in ("/proc/self/net/udp", "/proc/self/net/udp6"):
        with open(table) as f:
            udp |= {line.split()[9] for line in f.readlines()[1:]}
    return mine & udp


def test_an_sdp_body_returns_at_once_and_opens_no_socket() -> None:
    seen: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.update(_udp_sockets())

    before = _udp_sockets()
    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.monotonic()
    try:
        results = [sample_frames(SDP, FrameConfig()) for _ in range(50)]
    finally:
        done.set()
        watcher.join()
    assert time.monotonic() - start < 2  # FFmpeg's sdp demuxer would wait ~20 s for RTP packets
    assert {r.status for r in results} == {"not_video"}
    assert seen - before == set()


@pytest.fixture
def video_web():
    """/v/*.mp4 are videos served as files; /watch/* are pages only yt-dlp turns into media URLs."""
    internal_hits: Counter = Counter()

    async def internal(request):
        internal_hits[request.path] += 1
        return web.Response(body=VIDEOS["/v/grace.mp4"], content_type="video/mp4")

    async def video(request):
        body = VIDEOS.get(request.path)
        if body is None:
            raise web.HTTPNotFound()
        return web.Response(body=body, content_type="video/mp4")

    async def trickle(request):  # a page that never ends, one byte a second: no per-read timeout fires
        response = web.StreamResponse(headers={"Content-Type": "text/html"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write(b"<html><head><title>")
            while True:
                await response.write(b"x")
                await asyncio.sleep(1)
        return response

    async def endless(request):  # a page that never ends, as fast as it can
        response = web.StreamResponse(headers={"Content-Type": "text/html"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write(b"<html><body>")
            while True:
                await response.write(b"a" * 65536)
                SENT["endless"] += 65536
        return response

    internal_app = web.Application()
    internal_app.router.add_get("/{tail:.*}", internal)
    app = web.Application()
    app.router.add_get("/page/trickle", trickle)
    app.router.add_get("/page/endless", endless)
    app.router.add_get("/{tail:.*}", video)
    SENT["endless"] = 0
    with ServerThread(internal_app, "127.0.0.2") as inside, ServerThread(app, "127.0.0.1") as server:
        yield server.base_url, inside.base_url, internal_hits


#: Bytes the endless page has sent.
SENT = {"endless": 0}


VIDEOS = {
    # Two seconds of one person: at one frame a second, the second frame is a near copy of the first.
    "/v/grace.mp4": encode_video([(grace_hopper(), 2.0)]),
    "/watch/astronaut.mp4": encode_video([(astronaut(), 2.0)]),
    "/v/broken.mp4": b"<!DOCTYPE html><html><body>Video unavailable</body></html>",
    "/v/clip.webm": encode_video([(astronaut(), 1.0)], container="webm", codec="libvpx"),
    "/v/concat.mp4": ffconcat_of("secret.png"),
    "/v/stream.sdp": SDP,
}


def test_a_trickling_or_endless_page_costs_its_deadline_and_its_cap(video_web) -> None:
    from crawler.netguard import AllowList
    from crawler.resolve import Resolver

    base, _, _ = video_web
    resolve = Resolver(AllowList.parse(["127.0.0.1"]), timeout_s=5, max_bytes=256 << 10, total_s=1.5)
    start = time.monotonic()
    trickled = resolve(f"{base}/page/trickle")
    assert time.monotonic() - start < 4
    assert trickled.status == "timeout" and "1.5s" in trickled.error
    resolve = Resolver(AllowList.parse(["127.0.0.1"]), timeout_s=5, max_bytes=256 << 10, total_s=20)
    tracemalloc.start()
    try:
        start = time.monotonic()
        endless = resolve(f"{base}/page/endless")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert endless.status == "too_large" and str(256 << 10) in endless.error
    assert time.monotonic() - start < 10
    assert peak < 16 << 20  # the page's cap and yt-dlp's copies of it, not what the server would send
    assert SENT["endless"] < 32 << 20  # the connection was closed soon after the cap, not read on
    assert resolve(f"{base}/v/grace.mp4").status == "ok"  # the same resolver serves the next page


def test_crawl_of_videos_and_watch_pages(video_web, tmp_path: Path, capsys) -> None:
    base, internal, internal_hits = video_web
    rows = [
        (f"{base}/v/grace.mp4", "neutral", "video"),
        (f"{base}/watch/astronaut.mp4", "happiness", "video_page"),
        (f"{base}/v/broken.mp4", "sadness", "video"),
        (f"{base}/watch/missing", "sadness", "video_page"),
        (f"{internal}/watch/inside.mp4", "anger", "video_page"),
    ]
    urls = tmp_path / "videos.csv"
    with open(urls, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "label", "media_type"])
        writer.writerows(rows)
    out = tmp_path / "out"
    argv = ["--provider", "urllist", "--input", str(urls), "--out", str(out), "--faces", "mtcnn",
            "--allow-host", "127.0.0.1", "--workers", "0", "--no-progress", "--set", "frames.every_s=1.0",
            "--set", "fetch.timeout_s=10", "--set", "torch_threads=1"]
    assert build.main(argv) == 0

    status = {row["url"]: row for path in sorted((out / "work").glob("ws-*.status.parquet"))
              for row in pq.read_table(path).to_pylist()}
    assert {url: status[url]["status"] for url, _, _ in rows} == {
        f"{base}/v/grace.mp4": "ok",
        f"{base}/watch/astronaut.mp4": "ok",
        f"{base}/v/broken.mp4": "not_video",
        f"{base}/watch/missing": "resolve_failed",
        f"{internal}/watch/inside.mp4": "forbidden_address",
    }
    assert status[f"{base}/watch/astronaut.mp4"]["final_url"] == f"{base}/watch/astronaut.mp4"
    assert status[f"{base}/v/grace.mp4"]["frames"] == 2
    assert "HTTP Error 404" in status[f"{base}/watch/missing"]["error"]
    assert internal_hits == Counter()  # refused before yt-dlp sent anything

    assert verify(out).faults == []
    manifest = {row["key"]: row for row in read_manifest(str(out)).to_pylist()}
    grace_key = key_from_source("urllist", f"{base}/v/grace.mp4")
    astronaut_key = key_from_source("urllist", f"{base}/watch/astronaut.mp4")
    assert sorted(manifest) == sorted([f"{grace_key}-t0", f"{astronaut_key}-t0"])  # the 1 s frames: near copies
    meta = json.loads(manifest[f"{astronaut_key}-t0"]["meta"])
    assert (meta["frame_time_s"], meta["provider"], meta["url"]) == (0.0, "urllist", f"{base}/watch/astronaut.mp4")
    assert meta["video_duration_s"] == pytest.approx(2.0, abs=0.2)
    assert manifest[f"{astronaut_key}-t0"]["label_name"] == "happiness" and len(meta["landmarks"]) == 5

    summary = json.loads((out / "crawl_summary.json").read_text())
    assert summary["video_frames"] == 4 and summary["duplicates"] == {"near": 2}
    assert summary["failed"] == {"forbidden_address": 1, "not_video": 1, "resolve_failed": 1}
    assert "video frames sampled" in capsys.readouterr().out


def test_hostile_videos_and_pages_give_no_sample_and_the_good_rows_are_written(video_web, planted: Path,
                                                                              tmp_path: Path) -> None:
    base, _, _ = video_web
    rows = [
        (f"{base}/v/grace.mp4", "neutral", "video"),
        (f"{base}/v/clip.webm", "happiness", "video"),
        (f"{base}/v/concat.mp4", "anger", "video"),  # ffconcat of the planted secret.png
        (f"{base}/v/stream.sdp", "anger", "video"),
        (f"{base}/page/trickle", "sadness", "video_page"),
        (f"{base}/page/endless", "sadness", "video_page"),
    ]
    urls = tmp_path / "hostile.csv"
    with open(urls, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "label", "media_type"])
        writer.writerows(rows)
    out = tmp_path / "out"
    argv = ["--provider", "urllist", "--input", str(urls), "--out", str(out), "--faces", "none",
            "--allow-host", "127.0.0.1", "--workers", "0", "--no-progress", "--set", "fetch.total_timeout_s=4",
            "--set", "fetch.max_bytes=131072"]  # videos keep frames.max_bytes; a page gets 128 KiB and 4 s
    start = time.monotonic()
    assert build.main(argv) == 0
    assert time.monotonic() - start < 60

    status = {row["url"]: row["status"] for path in sorted((out / "work").glob("ws-*.status.parquet"))
              for row in pq.read_table(path).to_pylist()}
    assert status == {rows[0][0]: "ok", rows[1][0]: "ok", rows[2][0]: "not_video", rows[3][0]: "not_video",
                      rows[4][0]: "timeout", rows[5][0]: "too_large"}
    keys = read_manifest(str(out), columns=["key"]).column("key").to_pylist()
    sources = {key.split("-t")[0] for key in keys}
    assert sources == {key_from_source("urllist", rows[0][0]), key_from_source("urllist", rows[1][0])}
    summary = json.loads((out / "crawl_summary.json").read_text())
    assert summary["failed"] == {"not_video": 2, "timeout": 1, "too_large": 1}
    assert verify(out).faults == []


def test_url_list_names_a_bad_media_type(tmp_path: Path) -> None:
    from crawler.providers import get_provider

    urls = tmp_path / "urls.csv"
    urls.write_text("url,label,media_type\nhttps://example.org/a.mp4,happiness,video\nhttps://example.org/b.mp3,sadness,audio\n")
    with pytest.raises(ValueError, match=r"urls.csv: row 2: media_type 'audio' is not one of"):
        get_provider("urllist", input=str(urls))
