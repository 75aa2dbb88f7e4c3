"""The fetch stage and the address guard, against small servers on loopback addresses."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import Counter

import pytest
from aiohttp import web

from crawler.fetch import FetchConfig, Fetcher, agent_token, robots_opt_out
from crawler.http import USER_AGENT
from crawler.localweb import ServerThread
from crawler.netguard import AllowList, check_scheme, is_public


# -- pure functions -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "values, expected",
    [
        (["noai"], "noai"),
        (["NoImageIndex"], "noimageindex"),
        (["nofollow, noindex"], "noindex"),
        (["noarchive", "noimageai"], "noimageai"),
        (["scn-scale: noai"], "noai"),
        (["*: noimageai"], "noimageai"),
        (["googlebot: noindex"], None),
        (["otherbot: noai", "nofollow"], None),
        (["unavailable_after: 25 Jun 2010 15:00:00 PST"], None),
        (["max-image-preview: none, noai"], "noai"),
        ([], None),
        (["all"], None),
    ],
)
def test_robots_opt_out(values, expected) -> None:
    assert robots_opt_out(values, agent_token(USER_AGENT)) == expected


def test_agent_token_names_the_project() -> None:
    assert agent_token(USER_AGENT) == "scn-scale"


@pytest.mark.parametrize(
    "address, public",
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("127.0.0.2", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("::1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("224.0.0.1", False),
        # IPv6 that reaches an IPv4 address counts as that address:
        ("2002:a9fe:a9fe::", False),  # 6to4 embedding 169.254.169.254
        ("2002:7f00:2::1", False),  # 6to4 embedding 127.0.0.2
        ("2002:808:808::", True),  # 6to4 embedding 8.8.8.8
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 embedding 169.254.169.254
        ("64:ff9b::7f00:1", False),  # NAT64 embedding 127.0.0.1
        ("64:ff9b::808:808", True),  # NAT64 embedding 8.8.8.8
        ("2001:0:4136:e378:8000:63bf:80ff:fffd", False),  # Teredo, client 127.0.0.2 (stored XOR 0xffffffff)
        ("2001:0:4136:e378:8000:63bf:5601:5655", False),  # Teredo, client 169.254.169.170
        ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", True),  # Teredo, client 8.8.8.8
        # IANA special-purpose blocks some Python versions' `is_global` calls public (3.11 does all four):
        ("fec0::1", False),  # deprecated site-local
        ("3fff::1", False),  # documentation, RFC 9637
        ("192.0.0.8", False),  # IPv4 dummy address
        ("192.88.99.1", False),  # deprecated 6to4 relay anycast
        ("192.0.0.9", False),  # PCP anycast: globally reachable per IANA, still no image host
        ("192.31.196.1", False),  # AS112-v4
        ("192.175.48.1", False),  # direct delegation AS112
        ("198.18.0.1", False),  # benchmarking
        ("203.0.113.9", False),  # documentation
        ("240.0.0.1", False),  # reserved
        ("255.255.255.255", False),  # limited broadcast
        ("2001:db8::1", False),  # documentation
        ("2001:2::1", False),  # benchmarking
        ("2001:20::1", False),  # ORCHIDv2
        ("2620:4f:8000::1", False),  # AS112
        ("100::1", False),  # discard-only
        ("64:ff9b:1::808:808", False),  # NAT64 local use
        ("5f00::1", False),  # SRv6 SIDs
        ("ff02::1", False),  # multicast
        ("::", False),
        ("::127.0.0.1", False),  # IPv4-compatible (deprecated)
        ("4000::1", False),  # outside global unicast 2000::/3
        ("2a00:1450:4001::1", True),
        ("1.1.1.1", True),
    ],
)
def test_is_public(address, public) -> None:
    assert is_public(ipaddress.ip_address(address)) is public


def test_allow_list_and_schemes() -> None:
    allow = AllowList.parse(["127.0.0.1", "10.0.0.0/8", "Images.Internal"])
    assert allow.allows_ip(ipaddress.ip_address("127.0.0.1"))
    assert not allow.allows_ip(ipaddress.ip_address("127.0.0.2"))
    assert allow.allows_ip(ipaddress.ip_address("10.9.8.7"))
    assert allow.allows_ip(ipaddress.ip_address("::ffff:127.0.0.1"))  # an allowed IPv4, however it is embedded
    assert not allow.allows_ip(ipaddress.ip_address("2002:7f00:2::"))  # 6to4 of 127.0.0.2
    assert allow.allows_name("images.internal.")
    for bad in ("http://x/", "127.0.0.1:0", "127.0.0.1:99999", "127.0.0.1:http", "[::1", "[::1]8080", ":8080"):
        with pytest.raises(ValueError):
            AllowList.parse([bad])
    assert check_scheme("https://example.org/a.jpg") is None
    for bad in ("ftp://example.org/a.jpg", "file:///etc/passwd", "javascript:alert(1)", "data:image/png;base64,AA",
                "http:///nohost"):
        assert check_scheme(bad) == "bad_scheme"


def test_allow_list_entries_with_a_port_allow_that_port_only() -> None:
    allow = AllowList.parse(["127.0.0.1:8470", "[::1]:9000", "10.0.0.0/8:8080", "[fd00::/8]:81", "web.local:443",
                             "192.168.0.0/16"])
    ip = ipaddress.ip_address
    assert allow.allows_ip(ip("127.0.0.1"), 8470) and not allow.allows_ip(ip("127.0.0.1"), 8265)
    assert not allow.allows_ip(ip("127.0.0.1"))  # a port-bound entry never allows "any port"
    assert allow.allows_ip(ip("::ffff:127.0.0.1"), 8470)
    assert allow.allows_ip(ip("::1"), 9000) and not allow.allows_ip(ip("::1"), 9001)
    assert allow.allows_ip(ip("10.1.2.3"), 8080) and not allow.allows_ip(ip("10.1.2.3"), 22)
    assert allow.allows_ip(ip("fd00::5"), 81) and not allow.allows_ip(ip("fd00::5"), 80)
    assert allow.allows_ip(ip("192.168.1.1"), 22)  # no port named: every port
    assert allow.allows_name("WEB.local.", 443) and not allow.allows_name("web.local", 80)


def test_config_is_validated() -> None:
    for bad in ({"timeout_s": 0}, {"total_timeout_s": 0}, {"max_bytes": -1}, {"retries": -1}, {"allow_hosts": ("a/b/c",)}):
        with pytest.raises(ValueError):
            FetchConfig(**bad).validate()


# -- against a server -----------------------------------------------------------------------------

class Recorder:
    def __init__(self) -> None:
        self.hits: Counter = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.times: list[float] = []


@pytest.fixture
def server():
    rec = Recorder()

    @web.middleware
    async def track(request, handler):
        rec.hits[request.path] += 1
        rec.times.append(time.monotonic())
        rec.in_flight += 1
        rec.max_in_flight = max(rec.max_in_flight, rec.in_flight)
        try:
            return await handler(request)
        finally:
            rec.in_flight -= 1

    async def image(request):
        await asyncio.sleep(float(request.query.get("delay", "0")))
        return web.Response(body=b"\xff\xd8" + request.path.encode() * 10, content_type="image/jpeg")

    async def status(request):
        code = int(request.match_info["code"])
        return web.Response(status=code, headers={"Retry-After": request.query.get("after", "0")})

    async def redirect(request):
        return web.Response(status=302, headers={"Location": request.query["to"]})

    async def chain(request):
        n = int(request.match_info["n"])
        return web.Response(status=301, headers={"Location": f"../chain/{n + 1}" if n < 50 else "/img/end"})

    async def slow_chain(request):
        # Each hop answers within the per-request deadline, but the chain as a whole does not.
        await asyncio.sleep(0.25)
        n = int(request.match_info["n"])
        return web.Response(status=302, headers={"Location": f"/slow-chain/{n + 1}"})

    async def slow_503(request):
        await asyncio.sleep(0.25)
        return web.Response(status=503, headers={"Retry-After": "0.1"})

    async def loop(request):
        return web.Response(status=307, headers={"Location": "b" if request.match_info["x"] == "a" else "a"})

    async def echo(request):
        return web.Response(body=request.headers.get("User-Agent", "").encode(), content_type="image/jpeg")

    async def body(request):
        return web.Response(body=b"\xff" * int(request.match_info["size"]), content_type="image/jpeg")

    app = web.Application(middlewares=[track])
    app.router.add_get("/img/{name}", image)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/chain/{n}", chain)
    app.router.add_get("/ua", echo)
    app.router.add_get("/body/{size}", body)
    app.router.add_get("/loop/{x}", loop)
    app.router.add_get("/slow-chain/{n}", slow_chain)
    app.router.add_get("/slow-503", slow_503)
    with ServerThread(app, "127.0.0.1") as srv:
        yield srv.base_url, rec


def fetch(urls, allow=("127.0.0.1",), **settings):
    cfg = FetchConfig(allow_hosts=allow, backoff_s=0.01, backoff_max_s=0.02, **settings)
    return Fetcher(cfg).fetch_all(urls)


def test_fetches_in_input_order_with_our_user_agent(server) -> None:
    base, rec = server
    urls = [f"{base}/img/{i}" for i in range(20)] + [f"{base}/ua"]
    results = fetch(urls, per_host_rate=0)
    assert [r.status for r in results] == ["ok"] * 21
    assert results[3].data == b"\xff\xd8" + b"/img/3" * 10
    assert results[-1].data.decode() == USER_AGENT
    assert all(r.final_url == u for r, u in zip(results, urls))


def test_retries_only_what_may_succeed_later(server) -> None:
    base, rec = server
    results = fetch([f"{base}/status/404", f"{base}/status/503", f"{base}/status/403"], retries=3)
    assert [r.status for r in results] == ["http_404", "http_503", "http_403"]
    assert rec.hits["/status/404"] == 1 and rec.hits["/status/403"] == 1
    assert rec.hits["/status/503"] == 4
    assert results[1].attempts == 4


def test_retry_after_is_honoured_and_capped(server) -> None:
    base, rec = server
    start = time.monotonic()
    (waited,) = fetch([f"{base}/status/429?after=0.5"], retries=1)
    assert waited.status == "http_429" and rec.hits["/status/429"] == 2
    assert time.monotonic() - start >= 0.5
    (refused,) = fetch([f"{base}/status/503?after=99"], retries=3, retry_after_max_s=1)
    assert refused.status == "http_503" and rec.hits["/status/503"] == 1
    assert "Retry-After" in refused.error


def test_one_total_deadline_covers_redirects_and_retries(server) -> None:
    base, rec = server
    start = time.monotonic()
    chained, retried = fetch([f"{base}/slow-chain/0", f"{base}/slow-503"], timeout_s=0.5, total_timeout_s=1.0,
                             max_redirects=20, retries=20, per_host_rate=0)
    assert time.monotonic() - start < 3  # per hop alone: 20 hops x 0.25 s, or 21 tries x 0.35 s
    assert chained.status == "timeout" and "total_timeout_s" in chained.error
    assert sum(n for path, n in rec.hits.items() if path.startswith("/slow-chain/")) <= 5
    assert retried.status in ("http_503", "timeout") and retried.attempts <= 4
    assert chained.elapsed_s < 2 and retried.elapsed_s < 2  # the total, and a loaded machine's slack


def test_deadline_covers_the_whole_request(server) -> None:
    base, _ = server
    (slow,) = fetch([f"{base}/img/x?delay=1"], timeout_s=0.3, retries=0)
    assert slow.status == "timeout"
    assert slow.elapsed_s < 1.5


def test_redirects_are_followed_by_hand_and_checked(server) -> None:
    base, rec = server
    forbidden_host = "127.0.0.2"
    results = fetch(
        [
            f"{base}/redirect?to=/img/target",
            f"{base}/redirect?to=http://{forbidden_host}:9/img/x",
            f"{base}/redirect?to=gopher://{forbidden_host}/x",
            f"{base}/chain/0",
            f"{base}/loop/a",
            f"http://{forbidden_host}:9/img/direct",
            "http://2130706433:9/img/legacy-number-form",
        ],
        max_redirects=3,
    )
    assert [r.status for r in results] == [
        "ok", "forbidden_address", "bad_scheme", "too_many_redirects", "redirect_loop", "forbidden_address",
        "bad_url",
    ]
    assert results[0].final_url == f"{base}/img/target"
    assert rec.hits["/chain/0"] == 1 and rec.hits["/chain/3"] == 1 and rec.hits["/chain/4"] == 0


def test_names_are_checked_after_resolution(server) -> None:
    base, rec = server
    port = base.rsplit(":", 1)[1]
    # localhost resolves to a loopback address: refused unless that address (or the name) is allowed.
    assert [r.status for r in fetch([f"http://localhost:{port}/img/a"], allow=())] == ["forbidden_address"]
    assert [r.status for r in fetch([f"http://localhost:{port}/img/a"], allow=("localhost",))] == ["ok"]
    assert [r.status for r in fetch([f"http://localhost:{port}/img/a"], allow=("127.0.0.0/8",))] == ["ok"]
    assert rec.hits["/img/a"] == 2


def test_per_host_limits(server) -> None:
    base, rec = server
    urls = [f"{base}/img/{i}?delay=0.05" for i in range(12)]
    results = fetch(urls, per_host_concurrency=2, concurrency=16, per_host_rate=0)
    assert all(r.ok for r in results)
    assert rec.max_in_flight <= 2
    rec.times.clear()
    start = time.monotonic()
    results = fetch([f"{base}/img/r{i}" for i in range(9)], per_host_rate=20, per_host_burst=1)
    assert all(r.ok for r in results)
    assert time.monotonic() - start >= 8 / 20 * 0.9  # 9 requests, one token every 50 ms


def test_a_per_host_budget_is_shared_by_the_fetchers_running_at_once() -> None:
    cfg = FetchConfig(per_host_concurrency=8, per_host_rate=10.0, per_host_burst=10)
    assert cfg.shared_by(1) is cfg
    shared = cfg.shared_by(3)
    assert (shared.per_host_concurrency, shared.per_host_rate, shared.per_host_burst) == (2, 10.0 / 3, 3)
    many = cfg.shared_by(20)
    assert (many.per_host_concurrency, many.per_host_burst) == (1, 1) and many.per_host_rate == 0.5


def test_worker_processes_keep_together_to_the_per_host_limit(server, tmp_path) -> None:
    """Two crawl worker processes, each fetching its own work shards, never hold more connections
    to one host than the crawl's per-host limit."""
    from crawler import build

    base, rec = server
    urls = tmp_path / "urls.csv"
    urls.write_text("url,label\n" + "".join(f"{base}/img/{i}?delay=0.2,happiness\n" for i in range(24)))
    assert build.main([
        "--provider", "urllist", "--input", str(urls), "--out", str(tmp_path / "out"), "--faces", "none",
        "--allow-host", "127.0.0.1", "--workers", "2", "--work-shard-size", "6", "--no-progress",
        "--set", "fetch.per_host_concurrency=2", "--set", "fetch.per_host_rate=0"]) == 0
    assert sum(rec.hits.values()) == 24 and rec.max_in_flight <= 2


def test_byte_cap(server) -> None:
    base, _ = server
    (big,) = fetch([f"{base}/img/{'x' * 50}"], max_bytes=100)
    assert big.status == "too_large" and big.data is None


def test_bodies_wait_for_the_consumer_and_the_wait_is_not_the_servers(server) -> None:
    base, _ = server
    # Room for two 60 KiB bodies: the one the consumer holds and one more. The consumer is slow, so the
    # last body waits about 2 s for room, twice its request's deadline: a wait of ours, not a timeout.
    cfg = FetchConfig(allow_hosts=("127.0.0.1",), max_bytes=64 * 1024, inflight_bytes=128 * 1024, per_host_rate=0,
                      timeout_s=1.0, retries=0)
    statuses = []
    for _, result in Fetcher(cfg).stream([f"{base}/body/{60 * 1024}?n={i}" for i in range(8)]):
        statuses.append(result.status)
        time.sleep(0.3)
    assert statuses == ["ok"] * 8


def test_connection_refused_is_a_status(server) -> None:
    (result,) = fetch(["http://127.0.0.1:9/img/nothing-listens"], retries=0)
    assert result.status == "connection_error"


def test_stream_stops_cleanly_when_the_consumer_leaves(server) -> None:
    base, rec = server
    fetcher = Fetcher(FetchConfig(allow_hosts=("127.0.0.1",), buffer=2, per_host_rate=0))
    stream = fetcher.stream([f"{base}/img/{i}" for i in range(50)])
    first = next(stream)
    stream.close()  # must not hang, must stop fetching
    assert first[1].ok
    assert sum(rec.hits.values()) < 50
