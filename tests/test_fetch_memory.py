"""The in-flight byte budget bounds a crawl's memory, whatever its concurrency.

A server on 127.0.0.1 (in this process) serves twelve 100 MB bodies, half with a
Content-Length and half chunked (whose room is the byte cap until they are read). A
work shard of them runs through the crawl's own task (`process_work_shard`: fetch,
hash, decode) in a subprocess with 64 connections; without the budget they would hold
1.2 GB at once. The subprocess's peak resident memory, as the kernel counts it (VmHWM:
not `ru_maxrss`, which keeps the parent's peak across fork and exec), must grow by less
than the budget over what it had before the crawl.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import web

from crawler.localweb import ServerThread

REPO = Path(__file__).resolve().parents[1]
BODY = 100 * 1000 * 1000
BODIES = 12
MiB = 1024 * 1024
BUDGET = 256 * MiB
CAP = 128 * MiB

CRAWL = """
import json, re, sys
from crawler.fetch import FetchConfig
from crawler.pipeline import PipelineConfig, process_work_shard
from crawler.decode import DecodeConfig
from crawler.faces import FaceConfig
from crawler.frames import FrameConfig

def peak_rss():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1)) * 1024

base, budget, cap, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
fetch = FetchConfig(allow_hosts=("127.0.0.1",), max_bytes=cap, inflight_bytes=budget, concurrency=64,
                    per_host_concurrency=64, per_host_rate=0, timeout_s=60, retries=0)
config = PipelineConfig(fetch=fetch, faces=FaceConfig(mode="none"), decode=DecodeConfig(max_pixels=10**12),
                        frames=FrameConfig(max_bytes=cap)).validate()

def candidates(paths):
    return [{"candidate_id": p, "url": base + p, "provider": "urllist", "labels": ["happiness"],
             "label": "happiness", "skip": None, "media_type": "image", "key": p.strip("/")} for p in paths]

process_work_shard(0, candidates(["/small"]), config)  # every stage built and warm: the baseline
before = peak_rss()
out = process_work_shard(1, candidates([f"/body/{i}" for i in range(n)]), config)
peak = peak_rss()
print(json.dumps({"before": before, "peak": peak, "bytes": out.status.column("bytes").to_pylist()}))
"""


class Bodies:
    """100 MB of zeros per request, written as the client reads; counts requests open at once."""

    def __init__(self) -> None:
        self.open = self.most_open = 0
        app = web.Application()
        app.router.add_get("/small", self.small)
        app.router.add_get("/body/{i}", self.body)
        self.server = ServerThread(app, "127.0.0.1")

    async def small(self, request: web.Request) -> web.Response:
        return web.Response(body=b"\x00" * 1000, content_type="image/png")

    async def body(self, request: web.Request) -> web.StreamResponse:
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            stated = int(request.match_info["i"]) % 2 == 0
            response = web.StreamResponse(headers={"Content-Type": "image/png"})
            if stated:
                response.content_length = BODY
            await response.prepare(request)
            chunk = b"\x00" * MiB
            for start in range(0, BODY, MiB):
                await response.write(chunk[: min(MiB, BODY - start)])
            await response.write_eof()
            return response
        finally:
            self.open -= 1


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak memory from Linux's /proc")
def test_memory_of_a_crawl_of_100_mb_bodies_stays_under_the_budget() -> None:
    bodies = Bodies()
    with bodies.server:
        done = subprocess.run([sys.executable, "-c", CRAWL, bodies.server.base_url, str(BUDGET), str(CAP),
                               str(BODIES)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout.splitlines()[-1])
    growth = measured["peak"] - measured["before"]
    print(f"\n{BODIES} bodies of {BODY / MiB:.0f} MiB, 64 connections, {bodies.most_open} requests open at once: "
          f"peak memory grew by {growth / MiB:.0f} MiB (budget {BUDGET / MiB:.0f} MiB; "
          f"unbudgeted it would have held {BODIES * BODY / MiB:.0f} MiB)")
    assert measured["bytes"] == [BODY] * BODIES  # every body was read whole
    assert bodies.most_open >= BODIES // 2  # the connections really were concurrent
    assert growth < BUDGET
