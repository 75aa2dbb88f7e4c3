"""A crawl whose search API cannot be reached stops in seconds with one line naming the provider, the URL and
the cause, with the default retry settings, as a user runs it: a real server on 127.0.0.1 that answers 503 to
everything, a port nobody listens on, and a host name that does not resolve (`.invalid` never does, RFC 2606)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from aiohttp import web

from crawler.http import guarded_session
from crawler.localweb import ServerThread
from crawler.netguard import AllowList
from crawler.providers.base import JsonApi, ProviderError, RatePolicy, RetryPolicy

REPO = Path(__file__).resolve().parents[1]
#: Six queries over four workers: every query would be retried for about 15 s without the first-contact limit.
QUERIES = """\
happiness:
  en: [happy face, smiling face]
sadness:
  en: [sad face, crying face]
anger:
  en: [angry face, furious face]
"""
#: A bound, not a measurement: the limit is 10 s of failing; the rest is Python starting and importing.
WITHIN_S = 30


def crawl(tmp_path: Path, provider: str, api_base: str) -> tuple[subprocess.CompletedProcess, float]:
    (tmp_path / "queries.yaml").write_text(QUERIES)
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "crawler.build", "--provider", provider, "--api-base", api_base,
         "--queries", str(tmp_path / "queries.yaml"), "--out", str(tmp_path / "out"), "--faces", "none",
         "--workers", "0", "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    return done, time.monotonic() - start


def the_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1, done.stderr  # the crawl could not run (2 is kept for bad arguments)
    lines = done.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and "Traceback" not in done.stderr, done.stderr  # one line, last; the retries logged before
    assert errors[0].startswith("error: the crawl could not run: discovery failed: ")
    return errors[0]


def test_a_server_answering_503_to_everything(tmp_path: Path) -> None:
    hits: Counter = Counter()

    async def unavailable(request: web.Request) -> web.Response:
        hits[request.query.get("q")] += 1
        return web.Response(status=503, text="upstream down")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", unavailable)
    with ServerThread(app, "127.0.0.1") as server:
        done, elapsed = crawl(tmp_path, "openverse", server.base_url)
    line = the_error_line(done)
    assert f"openverse: {server.base_url}/v1/images/?q=" in line
    assert "answered HTTP 503: nothing but server errors" in line
    assert elapsed < WITHIN_S
    assert sum(hits.values()) <= 40  # not every query's every retry


def test_a_closed_port(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done, elapsed = crawl(tmp_path, "wikimedia", f"http://127.0.0.1:{port}")
    line = the_error_line(done)
    assert f"wikimedia: http://127.0.0.1:{port}/w/api.php?" in line
    assert f"cannot be reached: connection refused by 127.0.0.1:{port}" in line
    assert elapsed < WITHIN_S


def test_a_host_name_that_does_not_resolve(tmp_path: Path) -> None:
    done, elapsed = crawl(tmp_path, "localweb", "http://nonexistent.invalid:8470")
    line = the_error_line(done)
    assert "localweb: http://nonexistent.invalid:8470/" in line
    assert "cannot be reached: no such host: nonexistent.invalid does not resolve" in line
    assert "address guard" not in line  # the clear cause, not a refusal it never reached
    assert elapsed < WITHIN_S


def test_an_api_that_answered_once_is_retried_as_before() -> None:
    """The limit is for first contact only: a provider that answered and then fails is retried per query."""
    calls: Counter = Counter()

    async def flaky(request: web.Request) -> web.Response:
        calls["n"] += 1
        return web.json_response({"ok": True}) if calls["n"] == 1 else web.Response(status=503)

    app = web.Application()
    app.router.add_get("/{tail:.*}", flaky)
    api = JsonApi("openverse", RatePolicy(100, 1, 10, 10), RetryPolicy(max_retries=3, backoff_s=0.01, first_contact_s=0.0))
    with ServerThread(app, "127.0.0.1") as server:

        async def ask() -> str:
            async with guarded_session(AllowList.parse(["127.0.0.1"])) as session:
                assert await api.get(session, server.base_url + "/a", {}) == {"ok": True}
                with pytest.raises(ProviderError) as failed:
                    await api.get(session, server.base_url + "/b", {})
                return str(failed.value)

        message = asyncio.run(ask())
    assert "gave up after 4 attempts: HTTP 503" in message and calls["n"] == 5
