"""Video: frames sampled with PyAV, watch pages resolved by yt-dlp, faces written with their frame times.

The videos are encoded here with PyAV from photos that ship in packages (scikit-image's
astronaut, matplotlib's Grace Hopper), so MTCNN has real faces to find. The server runs
on 127.0.0.1 in this process; a second one on 127.0.0.2 plays an internal host left off
the allow-list, which must see no request. YouTube itself cannot be reached here: yt-dlp
resolves pages through its generic extractor, the same call it makes for a watch page.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from PIL import Image

from crawler import build
from crawler.frames import FrameConfig, sample_frames, sample_times
from crawler.localweb import ServerThread
from shards import key_from_source, read_manifest
from shards.verify import verify
from test_faces import astronaut, grace_hopper

av = pytest.importorskip("av")
pytest.importorskip("yt_dlp")

SIZE = 320


def encode_video(pictures: list[tuple[Image.Image, float]], fps: int = 10) -> bytes:
    """An MPEG-4 video showing each picture for its number of seconds."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=fps)
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
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 8000), dtype=np.int16), format="s16", layout="mono")
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

    internal_app = web.Application()
    internal_app.router.add_get("/{tail:.*}", internal)
    app = web.Application()
    app.router.add_get("/{tail:.*}", video)
    with ServerThread(internal_app, "127.0.0.2") as inside, ServerThread(app, "127.0.0.1") as server:
        yield server.base_url, inside.base_url, internal_hits


VIDEOS = {
    # Two seconds of one person: at one frame a second, the second frame is a near copy of the first.
    "/v/grace.mp4": encode_video([(grace_hopper(), 2.0)]),
    "/watch/astronaut.mp4": encode_video([(astronaut(), 2.0)]),
    "/v/broken.mp4": b"<!DOCTYPE html><html><body>Video unavailable</body></html>",
}


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


def test_url_list_names_a_bad_media_type(tmp_path: Path) -> None:
    from crawler.providers import get_provider

    urls = tmp_path / "urls.csv"
    urls.write_text("url,label,media_type\nhttps://example.org/a.mp4,happiness,video\nhttps://example.org/b.mp3,sadness,audio\n")
    with pytest.raises(ValueError, match=r"urls.csv: row 2: media_type 'audio' is not one of"):
        get_provider("urllist", input=str(urls))
