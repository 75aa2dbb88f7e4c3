"""The address guard holds where connections are made, whatever spelling or redirect led there.

Two servers run in this process: 127.0.0.1 is allow-listed and plays the open web; the
one on 127.0.0.2 plays an internal host and counts every request it gets, which must be
none. Each spelling below is something an HTTP client turns into 127.0.0.2; the guard
sees the address the socket is about to connect to, so each must be refused, asked
directly, behind a redirect, and through yt-dlp (whose requests go through the crawler's
guarding proxy).
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections import Counter
from urllib.parse import quote

import pytest
from aiohttp import web

from crawler.fetch import Fetcher, FetchConfig
from crawler.guardproxy import GuardProxy
from crawler.localweb import ServerThread
from crawler.netguard import AllowList

SPELLINGS = {
    "ideographic full stops": "127\u30020\u30020\u30022",
    "fullwidth digits": "\uff11\uff12\uff17.\uff10.\uff10.\uff12",
    "IPv4-mapped IPv6": "[::ffff:127.0.0.2]",
    "hexadecimal octet": "0x7f.0.0.2",  # left to the resolver, which reads it as inet_aton does
    # aiohttp calls these malformed (bad_url); they must not get through either way:
    "decimal": "2130706434",
    "short form": "127.2",
    "trailing dot": "127.0.0.2.",
}
VIDEO = b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64


@pytest.fixture
def webs():
    """(allowed base URL, internal port, internal hit counter)."""
    internal_hits: Counter = Counter()

    async def internal(request: web.Request) -> web.Response:
        internal_hits[request.path] += 1
        return web.Response(body=VIDEO, content_type="video/mp4")

    async def media(request: web.Request) -> web.Response:
        return web.Response(body=VIDEO, content_type="video/mp4")

    async def redirect(request: web.Request) -> web.Response:
        # aiohttp writes header values as UTF-8: a non-ASCII target goes out as raw UTF-8 bytes.
        return web.Response(status=302, headers={"Location": request.query["to"]})

    inside = web.Application()
    inside.router.add_get("/{tail:.*}", internal)
    app = web.Application()
    app.router.add_get("/media/{name}", media)
    app.router.add_get("/redirect", redirect)
    with ServerThread(inside, "127.0.0.2") as internal_server, ServerThread(app, "127.0.0.1") as server:
        yield server.base_url, internal_server.port, internal_hits


def targets(port: int) -> dict[str, str]:
    return {name: f"http://{host}:{port}/secret" for name, host in SPELLINGS.items()}


def fetch(urls: list[str]) -> list[str]:
    return [r.status for r in Fetcher(FetchConfig(allow_hosts=("127.0.0.1",), retries=0)).fetch_all(urls)]


def test_no_spelling_reaches_a_host_off_the_allow_list(webs) -> None:
    base, port, internal_hits = webs
    direct = targets(port)
    redirected = {name: f"{base}/redirect?to={quote(url, safe='')}" for name, url in direct.items()}
    for urls in (direct, redirected):
        statuses = dict(zip(urls, fetch(list(urls.values()))))
        assert {name: statuses[name] for name in list(SPELLINGS)[:4]} == dict.fromkeys(list(SPELLINGS)[:4],
                                                                                        "forbidden_address")
        assert set(statuses.values()) <= {"forbidden_address", "bad_url"}
    assert internal_hits == Counter()


def test_the_guard_judges_the_address_not_the_spelling(webs) -> None:
    base, _, _ = webs
    port = base.rsplit(":", 1)[1]
    assert fetch([f"http://127\u30020\u30020\u30021:{port}/media/a.mp4"]) == ["ok"]  # 127.0.0.1 is allowed


def test_the_proxy_forwards_what_is_allowed_and_refuses_the_rest(webs) -> None:
    base, port, internal_hits = webs
    with GuardProxy(AllowList.parse(["127.0.0.1"]), timeout_s=5) as proxy:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy.url}))
        with opener.open(f"{base}/media/a.mp4", timeout=5) as resp:
            assert resp.read() == VIDEO
        for url in (f"http://127.0.0.2:{port}/secret", f"{base}/redirect?to={quote(f'http://127.0.0.2:{port}/x')}"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                opener.open(url, timeout=5)
            assert refused.value.code == 403
    assert len(proxy.refused) == 2 and "127.0.0.2" in proxy.refused[0]
    assert internal_hits == Counter()


def test_yt_dlp_loads_only_the_extractors_the_project_uses() -> None:
    yt_dlp = pytest.importorskip("yt_dlp")
    from crawler.resolve import Resolver

    with yt_dlp.YoutubeDL(Resolver(AllowList()).options) as ydl:
        assert sorted(ydl._ies) == ["Generic", "Youtube"]


def test_yt_dlp_redirects_never_reach_a_host_off_the_allow_list(webs) -> None:
    pytest.importorskip("yt_dlp")
    from crawler.resolve import Resolver

    base, port, internal_hits = webs
    resolve = Resolver(AllowList.parse(["127.0.0.1"]), timeout_s=5)
    assert resolve(f"{base}/media/a.mp4").status == "ok"  # the generic extractor's direct link, through the proxy
    forbidden = [f"http://127.0.0.2:{port}/watch", *targets(port).values()]
    pages = forbidden + [f"{base}/redirect?to={quote(url, safe='')}" for url in forbidden]
    statuses = {page: resolve(page).status for page in pages}
    assert internal_hits == Counter()
    # yt-dlp's HTTP client gives up on some spellings itself (it cannot send a non-Latin-1 host): resolve_failed.
    assert set(statuses.values()) <= {"forbidden_address", "resolve_failed"}
    assert statuses[pages[0]] == statuses[pages[len(forbidden)]] == "forbidden_address"


def test_an_allowed_port_opens_only_that_port_of_the_host(webs) -> None:
    """`--allow-host 127.0.0.1:PORT` reaches that server, not another one on the same address (a local
    Ray dashboard, say), asked directly, behind a redirect or through the proxy."""
    base, _, _ = webs
    neighbour_hits: Counter = Counter()

    async def neighbour(request: web.Request) -> web.Response:
        neighbour_hits[request.path] += 1
        return web.Response(text="dashboard")

    app = web.Application()
    app.router.add_get("/{tail:.*}", neighbour)
    port = base.rsplit(":", 1)[1]
    with ServerThread(app, "127.0.0.1") as other:
        direct = f"{other.base_url}/api/jobs/"
        config = FetchConfig(allow_hosts=(f"127.0.0.1:{port}",), retries=0)
        results = Fetcher(config).fetch_all([f"{base}/media/a.mp4", direct,
                                             f"{base}/redirect?to={quote(direct, safe='')}"])
        assert [r.status for r in results] == ["ok", "forbidden_address", "forbidden_address"]
        assert f"port {other.port}" in results[1].error
        with GuardProxy(AllowList.parse([f"127.0.0.1:{port}"]), timeout_s=5) as proxy:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy.url}))
            with opener.open(f"{base}/media/a.mp4", timeout=5) as resp:
                assert resp.read() == VIDEO
            with pytest.raises(urllib.error.HTTPError) as refused:
                opener.open(direct, timeout=5)
            assert refused.value.code == 403
    assert neighbour_hits == Counter()
