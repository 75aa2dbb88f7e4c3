"""Search APIs are hosts of the open web too: the provider client is guarded as the fetcher is.

The fakes answer in Openverse's format on 127.0.0.1 (`provider_servers`); `Internal`, on
127.0.0.2 or on another port of 127.0.0.1, plays a host the crawl must never reach (cloud
metadata, a dashboard) and records every request it gets, which must be none.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import threading
import time
import tracemalloc
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web
from provider_servers import FakeOpenverse, Internal, openverse_item, serve  # noqa: F401  (serve is a fixture)

from crawler import build
from crawler.discover import DiscoverConfig, DiscoveryError, discover
from crawler.localweb import ServerThread
from crawler.providers import get_provider
from crawler.queries import Query

QUERIES = [Query("happiness", "happy face", "en")]
ID, SECRET = "client-id-1", "client-secret-1"


@pytest.fixture(autouse=True)
def no_credentials(monkeypatch):
    for name in ("OPENVERSE_CLIENT_ID", "OPENVERSE_CLIENT_SECRET"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def credentials(monkeypatch):
    monkeypatch.setenv("OPENVERSE_CLIENT_ID", ID)
    monkeypatch.setenv("OPENVERSE_CLIENT_SECRET", SECRET)


def fake(n: int = 5, **kw) -> FakeOpenverse:
    return FakeOpenverse({QUERIES[0].text: [openverse_item("pool", k) for k in range(n)]}, client_id=ID,
                         client_secret=SECRET, **kw)


def config(base: str, **kw) -> DiscoverConfig:
    settings = {"requests_per_second": 1000.0, "backoff_s": 0.001, "max_retries": 1}
    return DiscoverConfig(provider="openverse", api_base=base, progress=False, settings=settings, **kw)


def failure(base: str, tmp_path, **kw) -> str:
    """The one error line of a discovery whose only query fails."""
    with pytest.raises(DiscoveryError) as info:
        discover(QUERIES, config(base, **kw), tmp_path / "candidates.parquet")
    assert not (tmp_path / "candidates.parquet").exists()
    return str(info.value)


def test_a_search_api_redirecting_inward_reaches_no_internal_host(serve, tmp_path):
    inside = Internal({})
    hosts = {"another address": serve(inside, host="127.0.0.2"), "another port of the API's host": serve(inside)}
    for name, internal in hosts.items():
        api = fake()
        api.fail_next = [(302, {"Location": f"{internal}/latest/meta-data/iam"}, {})]
        message = failure(serve(api), tmp_path)
        assert "refused by the address guard" in message and internal.split("//")[1].split(":")[0] in message, name
    assert inside.requests == []


def test_a_redirect_the_guard_allows_is_followed(serve, tmp_path):
    api = fake()
    base = serve(api)
    api.fail_next = [(302, {"Location": f"{base}/v1/images/?q=happy+face&page=1&page_size=20"}, {})]
    summary = discover(QUERIES, config(base), tmp_path / "candidates.parquet")
    assert summary.candidates == 5 and len(api.requests) == 2


@dataclass
class GzipBomb(FakeOpenverse):
    """Answers every search with a 160 KB gzip body that inflates to 157 MB."""

    def app(self) -> web.Application:
        bomb = gzip.compress(b'{"results": "' + b" " * (157 << 20) + b'"}', 9)
        self.sent = len(bomb)

        async def search(request: web.Request) -> web.Response:
            self.log(request)
            return web.Response(body=bomb, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})

        app = web.Application()
        app.router.add_get("/v1/images/", search)
        return app


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_a_gzip_bomb_answer_is_cut_at_max_bytes_in_bounded_memory(serve, tmp_path):
    api = GzipBomb({})
    base = serve(api)
    peak_rss, done = [rss_mb()], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak_rss.append(rss_mb())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    before = rss_mb()
    watcher.start()
    tracemalloc.start()
    try:
        message = failure(base, tmp_path, max_bytes=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        done.set()
        watcher.join()
    assert api.sent < 200_000
    assert "over max_bytes (1048576 bytes, decompressed)" in message
    assert peak < 16 << 20  # the cap and the inflater's buffer, not the 157 MB
    assert max(peak_rss) - before < 64


def test_a_307_from_the_token_endpoint_never_sends_the_secret_elsewhere(serve, tmp_path, credentials, caplog):
    inside = Internal({})
    elsewhere = serve(inside)  # on 127.0.0.1 and allow-listed: only the credential rule stops the re-POST
    api = fake(token_redirect=f"{elsewhere}/collect?from=token")
    caplog.set_level(logging.DEBUG)
    message = failure(serve(api), tmp_path, allow_hosts=("127.0.0.1",))
    assert "redirected to another origin" in message and "not re-sent" in message
    assert inside.requests == [] and inside.bodies == []
    assert SECRET not in message and SECRET not in caplog.text


@dataclass
class MovedOnce(FakeOpenverse):
    """A token endpoint that first sends its client on to itself (307): same origin, so followed."""

    moved: int = 0

    async def token_endpoint(self, request: web.Request) -> web.Response:
        if not self.moved:
            self.moved += 1
            return web.Response(status=307, headers={"Location": "/v1/auth_tokens/token/"})
        return await super().token_endpoint(request)


def test_a_same_origin_token_redirect_is_followed(serve, tmp_path, credentials):
    api = MovedOnce({QUERIES[0].text: [openverse_item("pool", k) for k in range(5)]}, client_id=ID,
                    client_secret=SECRET)
    summary = discover(QUERIES, config(serve(api)), tmp_path / "candidates.parquet")
    assert summary.candidates == 5 and api.moved == 1
    assert [r.path for r in api.requests] == ["/v1/auth_tokens/token/", "/v1/images/"]


def test_an_answer_excerpt_is_short_and_scrubbed(serve, tmp_path, credentials, caplog):
    api = fake()
    echo = f"you sent token {api.token} " + "and more " * 100
    api.fail_next = [(400, {}, {"detail": echo})]
    caplog.set_level(logging.DEBUG)
    message = failure(serve(api), tmp_path)
    assert api.token not in message and api.token not in caplog.text
    assert "***" in message
    detail = message.split("answered HTTP 400: ", 1)[1]
    assert len(detail) <= 80 + len("...") and detail.endswith("...")


@pytest.mark.parametrize("answer, expected", [
    ({"error": "invalid_grant"}, "token answer without access_token (fields: ['error'])"),
    ({"access_token": "t", "expires_in": "soon"}, "not a positive number of seconds"),
])
def test_a_token_answer_of_the_wrong_shape_is_one_error_line(serve, tmp_path, credentials, capsys, answer, expected):
    base = serve(fake(token_answer=answer))
    queries = tmp_path / "queries.yaml"
    queries.write_text("happiness:\n  en: [happy face]\n")
    code = build.main(["--provider", "openverse", "--api-base", base, "--queries", str(queries),
                       "--out", str(tmp_path / "out"), "--faces", "none", "--workers", "0", "--no-progress",
                       "--provider-setting", "max_retries=0", "--provider-setting", "requests_per_second=1000"])
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in err
    assert SECRET not in err


@pytest.mark.parametrize("answer", [[1, 2, 3], {"results": ["not", "items"], "page_count": 1},
                                    {"results": [], "page_count": "many"}])
def test_a_search_answer_of_the_wrong_shape_is_one_error_line(serve, tmp_path, answer):
    api = fake()
    api.fail_next = [(200, {}, answer)]
    message = failure(serve(api), tmp_path)
    assert "openverse" in message and "\n" not in message


def test_discover_max_bytes_is_a_crawl_setting(tmp_path):
    args = build.parser().parse_args(["--provider", "openverse", "--api-base", "https://api.example.org", "--out", str(tmp_path / "out"),
                                      "--set", "discover.max_bytes=4096", "--allow-host", "10.0.0.0/8:8080"])
    cfg = build.config_from_args(args)
    discover_cfg = cfg.discover_config()
    assert (discover_cfg.max_bytes, discover_cfg.allow_hosts) == (4096, ("10.0.0.0/8:8080",))
    assert discover_cfg.build_provider().api.max_bytes == 4096


def test_a_plain_session_is_refused_before_any_request(serve):
    api = fake()
    provider = get_provider("openverse", api_base=serve(api), requests_per_second=1000.0)

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            await provider.search(session, QUERIES[0], 10, None)

    with pytest.raises(TypeError, match="guarded_session"):
        asyncio.run(run())
    assert api.requests == []


def test_the_ground_truth_is_fetched_through_the_guard(serve, tmp_path):
    """The crawl's label-noise step asks the embedded web for /ground_truth.json through the fetcher:
    a redirect to an internal host is refused there like any other."""
    inside = Internal({})
    internal = serve(inside, host="127.0.0.2")

    async def ground_truth(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": f"{internal}/ground_truth.json"})

    app = web.Application()
    app.router.add_get("/ground_truth.json", ground_truth)
    with ServerThread(app) as web_server:
        cfg = build.CrawlConfig(out=str(tmp_path), provider="localweb", api_base=web_server.base_url)
        assert build._label_noise(cfg, tmp_path) is None
    assert inside.requests == []
