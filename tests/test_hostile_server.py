"""A crawl of a hostile web server: every failure counted under its own reason, nothing partial written.

The server runs in this process on 127.0.0.1; a second one on 127.0.0.2 plays the
"internal" host a redirect points at (also spelled with fullwidth digits or ideographic
full stops, which the HTTP client turns into 127.0.0.2). 127.0.0.2 is left off the
allow-list, so the crawl must refuse it, and that server must see no request at all.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from PIL import Image

from crawler import build
from crawler.http import USER_AGENT
from crawler.localweb import ServerThread
from shards import key_from_source, read_manifest
from shards.verify import verify

GOOD = [f"/img/good-{i}.jpg" for i in range(6)]


def photo_jpeg(seed: int, size: int = 160) -> bytes:
    """A distinct random image (random pHash, so no two are near copies)."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size // 8, size // 8, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize((size, size), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def bomb_png(width: int = 10_000, height: int = 10_000) -> bytes:
    """A real 1-bit PNG of width x height zeros: about 12 KB on the wire, 100 M pixels decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def tiny_png() -> bytes:
    """A valid 2x2 picture: with --faces none it would become a whole 112 px crop of blur."""
    buf = io.BytesIO()
    Image.new("RGB", (2, 2), (200, 150, 120)).save(buf, format="PNG")
    return buf.getvalue()


def respell(base_url: str, table: dict[int, int]) -> str:
    """`http://HOST:PORT` with HOST's characters translated: a spelling HTTP clients map back to the same host."""
    scheme, _, rest = base_url.partition("://")
    host, _, port = rest.partition(":")
    return f"{scheme}://{host.translate(table)}:{port}"


def fullwidth(base_url: str) -> str:
    """１２７.０.０.２ for 127.0.0.2 (fullwidth digits)."""
    return respell(base_url, {ord(d): 0xFF10 + int(d) for d in "0123456789"})


def ideographic(base_url: str) -> str:
    """127。0。0。2 for 127.0.0.2 (ideographic full stops)."""
    return respell(base_url, {ord("."): 0x3002})


class HostileWeb:
    """Routes that each misbehave one way; counts hits per path and the User-Agents seen."""

    def __init__(self, internal_url: str) -> None:
        self.hits: Counter = Counter()
        self.user_agents: set[str] = set()
        self.streamed = 0
        self.internal_url = internal_url
        self.images = {path: photo_jpeg(i) for i, path in enumerate(GOOD)}
        self.images["/img/after-429.jpg"] = photo_jpeg(100)
        self.images["/img/redirected.jpg"] = photo_jpeg(101)
        self.images["/img/otherbot.jpg"] = photo_jpeg(102)
        self.bomb = bomb_png()
        self.tiny = tiny_png()
        app = web.Application(middlewares=[self._count])
        app.router.add_get("/img/{name}", self._image)
        app.router.add_get("/status/{code}", self._status)
        app.router.add_get("/always-429", self._always_429)
        app.router.add_get("/slow.jpg", self._slow)
        app.router.add_get("/truncated.jpg", self._truncated)
        app.router.add_get("/html.jpg", self._html)
        app.router.add_get("/huge-declared.jpg", self._huge_declared)
        app.router.add_get("/huge-stream.jpg", self._huge_stream)
        app.router.add_get("/bomb.png", self._bomb)
        app.router.add_get("/tiny.png", self._tiny)
        app.router.add_get("/loop-a", self._redirect("/loop-b"))
        app.router.add_get("/loop-b", self._redirect("/loop-a"))
        app.router.add_get("/to-good", self._redirect("/img/redirected.jpg"))
        app.router.add_get("/to-internal", self._redirect_internal)
        app.router.add_get("/to-internal-spelled", self._redirect_internal_spelled)
        app.router.add_get("/to-file", self._redirect("file:///etc/passwd"))
        app.router.add_get("/noai.jpg", self._robots("noai"))
        app.router.add_get("/agent-noimageai.jpg", self._robots("scn-scale: noimageai, nofollow"))
        app.router.add_get("/otherbot.jpg", self._robots("otherbot: noai"))
        self.server = ServerThread(app, "127.0.0.1")

    @web.middleware
    async def _count(self, request, handler):
        self.hits[request.path] += 1
        self.user_agents.add(request.headers.get("User-Agent", ""))
        return await handler(request)

    def _jpeg(self, data: bytes, **headers: str) -> web.Response:
        return web.Response(body=data, content_type="image/jpeg", headers=headers)

    async def _image(self, request):
        path = request.path
        if path == "/img/after-429.jpg" and self.hits[path] == 1:
            return web.Response(status=429, headers={"Retry-After": "1"}, text="slow down")
        if path not in self.images:
            return web.Response(status=404)
        return self._jpeg(self.images[path])

    async def _status(self, request):
        return web.Response(status=int(request.match_info["code"]), text="no")

    async def _always_429(self, request):
        return web.Response(status=429, headers={"Retry-After": "3600"}, text="come back in an hour")

    async def _slow(self, request):
        # Each piece arrives quickly (a per-read timeout would never fire); the whole takes 2 s.
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        await response.prepare(request)
        try:
            for _ in range(20):
                await response.write(b"\xff" * 100)
                await asyncio.sleep(0.1)
            await response.write_eof()
        except (ConnectionResetError, RuntimeError):
            pass
        return response

    async def _truncated(self, request):
        data = photo_jpeg(7, size=320)
        return self._jpeg(data[: len(data) // 2])

    async def _html(self, request):
        return self._jpeg(b"<!DOCTYPE html><html><body><h1>Access denied</h1></body></html>")

    async def _huge_declared(self, request):
        return self._jpeg(b"\xff\xd8" + b"\x00" * (2 * 1024 * 1024))

    async def _huge_stream(self, request):
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})  # chunked: no Content-Length
        await response.prepare(request)
        try:
            for _ in range(800):  # 50 MB if nobody hangs up
                await response.write(b"\x00" * 65536)
                self.streamed += 65536
            await response.write_eof()
        except (ConnectionResetError, RuntimeError):
            pass
        return response

    async def _bomb(self, request):
        return web.Response(body=self.bomb, content_type="image/png")

    async def _tiny(self, request):
        return web.Response(body=self.tiny, content_type="image/png")

    def _redirect(self, location: str):
        async def handler(request):
            return web.Response(status=302, headers={"Location": location})

        return handler

    async def _redirect_internal(self, request):
        return web.Response(status=302, headers={"Location": f"{self.internal_url}/img/good-0.jpg"})

    async def _redirect_internal_spelled(self, request):
        # aiohttp sends header values as UTF-8: this Location goes out as raw UTF-8 bytes.
        return web.Response(status=302, headers={"Location": f"{fullwidth(self.internal_url)}/img/good-2.jpg"})

    def _robots(self, value: str):
        async def handler(request):
            return self._jpeg(self.images["/img/otherbot.jpg"], **{"X-Robots-Tag": value})

        return handler


@pytest.fixture
def servers():
    hits: Counter = Counter()

    @web.middleware
    async def count(request, handler):
        hits[request.path] += 1
        return await handler(request)

    async def anything(request):
        return web.Response(body=photo_jpeg(1), content_type="image/jpeg")

    internal_app = web.Application(middlewares=[count])
    internal_app.router.add_get("/{tail:.*}", anything)
    with ServerThread(internal_app, "127.0.0.2") as internal:
        hostile = HostileWeb(internal.base_url)
        with hostile.server:
            yield hostile, hits


#: url path (or full URL) -> the status its candidate must end with.
EXPECTED = {
    "/status/404": "http_404",
    "/status/500": "http_500",
    "/always-429": "http_429",
    "/slow.jpg": "timeout",
    "/truncated.jpg": "truncated",
    "/html.jpg": "not_image",
    "/huge-declared.jpg": "too_large",
    "/huge-stream.jpg": "too_large",
    "/bomb.png": "decompression_bomb",
    "/tiny.png": "too_small",
    "/loop-a": "redirect_loop",
    "/to-internal": "forbidden_address",
    "/to-internal-spelled": "forbidden_address",
    "/to-file": "bad_scheme",
    "/noai.jpg": "opted_out",
    "/agent-noimageai.jpg": "opted_out",
    "ftp://127.0.0.1/pictures/face.jpg": "bad_scheme",
    "INTERNAL/img/good-1.jpg": "forbidden_address",
    "IDEOGRAPHIC/img/good-3.jpg": "forbidden_address",
    **{path: "ok" for path in GOOD},
    "/img/after-429.jpg": "ok",
    "/to-good": "ok",
    "/otherbot.jpg": "ok",
}


def test_hostile_crawl(servers, tmp_path: Path, capsys) -> None:
    hostile, internal_hits = servers
    base, internal = hostile.server.base_url, hostile.internal_url
    urls = {}
    for path in EXPECTED:
        if path.startswith("INTERNAL"):
            urls[path] = internal + path[len("INTERNAL"):]
        elif path.startswith("IDEOGRAPHIC"):
            urls[path] = ideographic(internal) + path[len("IDEOGRAPHIC"):]
        elif "://" in path:
            urls[path] = path
        else:
            urls[path] = base + path
    url_list = tmp_path / "urls.csv"
    with open(url_list, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "label"])
        for i, url in enumerate(urls.values()):
            writer.writerow([url, ("happiness", "sadness")[i % 2]])
    out = tmp_path / "out"
    settings = [
        "fetch.timeout_s=0.5", "fetch.retries=2", "fetch.backoff_s=0.01", "fetch.backoff_max_s=0.05",
        "fetch.retry_after_max_s=5", "fetch.max_bytes=262144", "fetch.per_host_rate=0", "fetch.max_redirects=3",
    ]
    argv = ["--provider", "urllist", "--input", str(url_list), "--out", str(out), "--faces", "none",
            "--allow-host", "127.0.0.1", "--workers", "0", "--work-shard-size", "8", "--shard-size", "4",
            "--no-progress"]
    for item in settings:
        argv += ["--set", item]
    assert build.main(argv) == 0
    printed = capsys.readouterr().out

    # Each candidate ended with its own reason, in the per-work-shard status rows.
    status = [row for path in sorted((out / "work").glob("ws-*.status.parquet"))
              for row in pq.read_table(path).to_pylist()]
    assert len(status) == len(EXPECTED)
    by_url = {row["url"]: row for row in status}
    got = {path: by_url[url]["status"] for path, url in urls.items()}
    assert got == EXPECTED
    for row in status:
        if row["status"] != "ok":
            assert row["error"], row

    # The summary counts every failure under its reason.
    summary = json.loads((out / "crawl_summary.json").read_text())
    expected_failed = Counter(v for v in EXPECTED.values() if v not in ("ok", "opted_out", "too_small"))
    assert summary["failed"] == dict(expected_failed)
    assert summary["opted_out"] == 2
    assert summary["too_small"] == 1 and "too small" in printed
    assert summary["candidates"] == len(EXPECTED)
    good = [p for p, s in EXPECTED.items() if s == "ok"]
    assert summary["written"] == len(good)
    for reason in expected_failed:
        assert reason in printed

    # Retries: never a 404; 5xx up to the limit; a 429 waits for Retry-After, one too long is not waited for.
    assert hostile.hits["/status/404"] == 1
    assert hostile.hits["/status/500"] == 3
    assert hostile.hits["/img/after-429.jpg"] == 2
    assert by_url[urls["/img/after-429.jpg"]]["fetch_s"] >= 1.0
    assert hostile.hits["/always-429"] == 1
    # The byte cap stops a stream early: far less than its 50 MB was ever sent.
    assert hostile.streamed < 16 * 1024 * 1024
    # Nothing left the allowed host: the internal server was never asked.
    assert sum(internal_hits.values()) == 0
    assert hostile.user_agents == {USER_AGENT}

    # Nothing partial: the set verifies, holds exactly the good images, and no temporary file is left.
    report = verify(out)
    assert report.faults == []
    keys = set(read_manifest(str(out), columns=["key"]).column("key").to_pylist())
    assert keys == {key_from_source("urllist", urls[p]) for p in good}
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
