"""The fetch stage: URLs in, image bytes (or a recorded reason why not) out.

asyncio + aiohttp on a background thread, so the process that consumes the results
(decoding, face detection) never stalls the network and the network never waits on a
slow consumer mid-read. What img2dataset's downloader lacks, and this adds:

- one deadline per HTTP request (connect, headers and body together), not per socket read,
  and one total deadline per URL (`total_timeout_s`) across its redirects, retries and waits;
- a streaming byte cap: a body over `max_bytes` is abandoned as soon as it is known to be
  (from Content-Length, or while reading), never buffered whole;
- a byte budget for bodies (`inflight_bytes`): room for a body (its Content-Length, else the
  cap) is reserved before its first byte is read and given back only once the consumer has
  let go of it, so memory is bounded by the budget whatever the concurrency (64 reads of
  25 MB bodies would otherwise hold 1.6 GB);
- retries only for timeouts, 429 and 5xx, with exponential backoff and `Retry-After`
  (which also pauses the whole host); never for a 404;
- a global and a per-host concurrency limit and a per-host token bucket;
- the project's honest User-Agent (`crawler.http.USER_AGENT`);
- `X-Robots-Tag` opt-outs read from the headers before the body;
- only http/https; private, loopback and link-local peers refused by the socket factory of
  every connection, whatever spelling or DNS answer led there, unless allow-listed
  (`crawler.netguard`); redirects followed by hand, bounded and loop-checked.

A deadline covers one HTTP request; a redirect hop is a new request with its own, and all
of a URL's requests and retry waits draw on its total deadline, so redirects and retries
cannot stretch one URL to many times `timeout_s`. Time spent waiting for room in the byte
budget, a per-host slot or a rate token is ours, not the server's, and counts for neither.
Results are bounded in memory: at most `buffer` results exist between the network and
the consumer (fetched-but-unconsumed plus in flight), holding at most `inflight_bytes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import re
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol, Sequence
from urllib.parse import urljoin, urlsplit

from crawler.http import USER_AGENT, backoff_seconds, guarded_session, read_body, retry_after_seconds
from crawler.netguard import AllowList, check_scheme, connecting_to

log = logging.getLogger(__name__)

REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
OK_CODES = frozenset({200, 203})
#: Directives that mean "do not use this for training or indexing".
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
#: X-Robots-Tag directives that themselves contain a colon (so are not an agent prefix).
_COLON_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})


@dataclass(frozen=True)
class FetchConfig:
    """Settings of the fetch stage (picklable; the same object configures a process or a Ray task)."""

    timeout_s: float = 20.0
    #: One URL's whole time: every redirect hop, retry and retry wait (our own queueing excluded).
    total_timeout_s: float = 60.0
    max_bytes: int = 25 * 1024 * 1024
    retries: int = 2
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    #: A server asking for a longer wait than this is given up on (status http_429/http_503).
    retry_after_max_s: float = 120.0
    max_redirects: int = 5
    concurrency: int = 64
    per_host_concurrency: int = 8
    #: Requests per second per host (token bucket); 0 means no rate limit.
    per_host_rate: float = 10.0
    per_host_burst: int = 10
    allow_hosts: tuple[str, ...] = ()
    honour_x_robots: bool = True
    user_agent: str = USER_AGENT
    #: Results held between the network and the consumer (memory bound).
    buffer: int = 64
    #: Bytes of bodies one fetch stream holds at once (being read, waiting for the consumer, and the
    #: one the consumer holds); at least twice `max_bytes`. A worker process runs one stream at a time.
    inflight_bytes: int = 512 * 1024 * 1024

    def validate(self) -> "FetchConfig":
        positive = {
            "timeout_s": self.timeout_s,
            "total_timeout_s": self.total_timeout_s,
            "max_bytes": self.max_bytes,
            "concurrency": self.concurrency,
            "per_host_concurrency": self.per_host_concurrency,
            "per_host_burst": self.per_host_burst,
            "buffer": self.buffer,
            "inflight_bytes": self.inflight_bytes,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"fetch setting {name} must be positive, got {value}")
        for name in ("retries", "backoff_s", "backoff_max_s", "retry_after_max_s", "max_redirects", "per_host_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"fetch setting {name} must be >= 0, got {getattr(self, name)}")
        if self.inflight_bytes < 2 * self.max_bytes:
            # The consumer holds one body while the next is read: two capped bodies must fit.
            raise ValueError(f"fetch setting inflight_bytes ({self.inflight_bytes}) must be at least twice "
                             f"max_bytes ({self.max_bytes})")
        if not self.user_agent.strip():
            raise ValueError("fetch setting user_agent must not be empty")
        AllowList.parse(self.allow_hosts)  # raises on a malformed entry
        return self

    def shared_by(self, fetchers: int) -> "FetchConfig":
        """This config with its per-host budget split among `fetchers` fetch stages running at once
        (worker processes, Ray tasks), so the crawl as a whole keeps to it: each gets 1/n of the
        rate and burst and of the connections (at least one connection each)."""
        if fetchers <= 1:
            return self
        return dataclasses.replace(
            self,
            per_host_concurrency=max(1, self.per_host_concurrency // fetchers),
            per_host_rate=self.per_host_rate / fetchers,
            per_host_burst=max(1, self.per_host_burst // fetchers),
        )


@dataclass
class FetchResult:
    url: str
    status: str  # "ok" or a reason: http_404, timeout, too_large, opted_out, forbidden_address, ...
    data: bytes | None = None
    http_status: int | None = None
    error: str | None = None
    final_url: str | None = None
    content_type: str | None = None
    attempts: int = 1
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class FetchStage(Protocol):
    def stream(self, urls: Sequence[str]) -> Iterator[tuple[int, FetchResult]]: ...


class FetchError(RuntimeError):
    """The fetcher itself failed (not one URL): an infrastructure fault."""


def agent_token(user_agent: str) -> str:
    """The product token robots directives address us by: 'scn-scale' in 'scn-scale/0.1 (...)'."""
    return user_agent.split("/", 1)[0].split()[0].strip().lower()


def robots_opt_out(values: Iterable[str], token: str) -> str | None:
    """The first opt-out directive in `X-Robots-Tag` header values that applies to us, or None.

    A value is a comma-separated directive list, optionally prefixed by `agent:`; a
    prefixed value applies only when the agent is us or `*`.
    """
    for value in values:
        value = value.strip()
        match = re.match(r"^([A-Za-z0-9_.*-]+)\s*:\s*(.*)$", value)
        if match and match.group(1).lower() not in _COLON_DIRECTIVES:
            if match.group(1).lower() not in (token, "*"):
                continue
            value = match.group(2)
        for directive in value.split(","):
            name = directive.strip().lower()
            if name in OPT_OUT_DIRECTIVES:
                return name
    return None


class _Bucket:
    """A token bucket (rate per second, depth `burst`) with a pause, for one host."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()
        self.not_before = 0.0

    async def take(self) -> None:
        while True:
            now = time.monotonic()
            if now < self.not_before:
                await asyncio.sleep(self.not_before - now)
                continue
            if self.rate <= 0:
                return
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            await asyncio.sleep((1 - self.tokens) / self.rate)


class _Gate:
    """Bounds what is taken on the event loop and given back from the consumer thread:
    results handed over but not yet consumed, or bytes of bodies.

    A release wakes the event loop only when fetches wait for room, and then once half
    the room is free: a wake-up per result (`call_soon_threadsafe`) costs a GIL hand-over
    each, a fifth of the crawl's time when measured. One acquire never asks for more than
    `limit` (the config's checks see to it), so a waiter is served once the rest is back.
    """

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        self.limit, self.loop = limit, loop
        self.held = 0
        self.lock = threading.Lock()
        self.waiters: list[asyncio.Future] = []

    async def acquire(self, amount: int = 1) -> None:
        while True:
            with self.lock:
                if self.held + amount <= self.limit:
                    self.held += amount
                    return
                waiter = self.loop.create_future()
                self.waiters.append(waiter)
            await waiter

    def release(self, amount: int = 1) -> None:
        """Called from either thread; wakes the waiting fetches once half the room is free."""
        if not amount:
            return
        with self.lock:
            self.held -= amount
            if not self.waiters or self.held > self.limit // 2:
                return
            waiters, self.waiters = self.waiters, []
        self.loop.call_soon_threadsafe(_wake, waiters)


def _wake(waiters: list[asyncio.Future]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)


class HostLimits:
    """Per-host concurrency slots (for one event loop) and token buckets (given, so that they
    outlive the loop: a process's next work shard inherits its rate state and pauses)."""

    def __init__(self, config: FetchConfig, buckets: dict[str, "_Bucket"]) -> None:
        self.config = config
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._buckets = buckets

    def _bucket(self, host: str) -> _Bucket:
        if host not in self._buckets:
            self._buckets[host] = _Bucket(self.config.per_host_rate, self.config.per_host_burst)
        return self._buckets[host]

    @contextlib.asynccontextmanager
    async def slot(self, host: str):
        sem = self._slots.setdefault(host, asyncio.Semaphore(self.config.per_host_concurrency))
        async with sem:
            await self._bucket(host).take()
            yield

    def pause(self, host: str, seconds: float) -> None:
        bucket = self._bucket(host)
        bucket.not_before = max(bucket.not_before, time.monotonic() + seconds)


def _retryable(status: str) -> bool:
    return status in ("timeout", "http_429") or (status.startswith("http_5") and len(status) == 8)


class Fetcher:
    """The fetch stage. `stream(urls)` yields `(index, FetchResult)` as results complete."""

    def __init__(self, config: FetchConfig | None = None) -> None:
        self.config = (config or FetchConfig()).validate()
        self.allow = AllowList.parse(self.config.allow_hosts)
        self.token = agent_token(self.config.user_agent)
        self.buckets: dict[str, _Bucket] = {}  # per host, across every run of this fetcher

    # -- the synchronous face ----------------------------------------------------------

    def fetch_all(self, urls: Sequence[str]) -> list[FetchResult]:
        """Fetch every URL; results in input order (all bodies held at once: for short lists)."""
        results: list[FetchResult | None] = [None] * len(urls)
        for i, result in self.stream(urls):
            results[i] = result
        return results  # type: ignore[return-value]

    def stream(self, urls: Sequence[str]) -> Iterator[tuple[int, FetchResult]]:
        """Fetch on a background event loop; yield results in completion order.

        A result's bytes count against `inflight_bytes` until the consumer asks for the
        result after the next: a consumer that loops over the stream still holds the
        last result it was given while it waits for the next one.
        """
        urls = list(urls)
        if not urls:
            return
        out: queue.SimpleQueue = queue.SimpleQueue()
        ready = threading.Event()
        state: dict = {}
        done = object()

        async def main() -> None:
            state["loop"] = asyncio.get_running_loop()
            state["task"] = asyncio.current_task()
            state["gate"] = _Gate(self.config.buffer, state["loop"])
            state["budget"] = _Gate(self.config.inflight_bytes, state["loop"])
            ready.set()
            await self.run(urls, out.put, state["gate"], state["budget"])

        def thread_main() -> None:
            try:
                asyncio.run(main())
            except asyncio.CancelledError:
                pass
            except BaseException as exc:  # handed to the consumer, which raises it
                out.put(exc)
            finally:
                ready.set()
                out.put(done)

        thread = threading.Thread(target=thread_main, name="crawler-fetch", daemon=True)
        thread.start()
        ready.wait()
        last = before_last = 0  # bytes of the last result handed out, and of the one before it
        try:
            while True:
                with contextlib.suppress(RuntimeError):  # the loop may have just closed
                    state["budget"].release(before_last)  # asking again, the consumer let go of that one
                item = out.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise FetchError(f"the fetcher failed: {item!r}") from item
                with contextlib.suppress(RuntimeError):
                    state["gate"].release()
                before_last, last = last, len(item[1].data or b"")
                yield item
        finally:
            if thread.is_alive() and "loop" in state:
                with contextlib.suppress(RuntimeError):
                    state["loop"].call_soon_threadsafe(state["task"].cancel)
            thread.join()

    # -- the asynchronous core ------------------------------------------------------------

    def session(self):
        return guarded_session(self.allow, user_agent=self.config.user_agent, concurrency=self.config.concurrency)

    async def run(self, urls: Sequence[str], emit, slots: _Gate, budget: _Gate) -> None:
        """Fetch `urls` with `concurrency` workers, calling `emit((index, result))` for each.

        A result takes one of `slots`, and its body's bytes of `budget`; the consumer gives them back.
        """
        pending = iter(enumerate(urls))
        limits = HostLimits(self.config, self.buckets)
        async with self.session() as session:

            async def worker() -> None:
                for i, url in pending:
                    await slots.acquire()
                    emit((i, await self.fetch(session, limits, budget, url)))

            await asyncio.gather(*(worker() for _ in range(min(self.config.concurrency, len(urls)))))

    async def fetch(self, session, limits: HostLimits, budget: _Gate, url: str) -> FetchResult:
        """One URL with its retries, within `total_timeout_s`; never raises for a per-URL fault."""
        cfg = self.config
        start = time.monotonic()
        allowance = _Allowance(cfg.total_timeout_s)
        attempt = 0
        while True:
            result, wait = await self._attempt(session, limits, budget, url, allowance)
            result.attempts = attempt + 1
            if not _retryable(result.status) or attempt >= cfg.retries:
                break
            if wait is None:
                wait = backoff_seconds(attempt, cfg.backoff_s, cfg.backoff_max_s)
            elif wait > cfg.retry_after_max_s:
                result.error = f"{result.error}; Retry-After {wait:.0f}s exceeds retry_after_max_s"
                break
            if wait >= allowance.left:
                result.error = f"{result.error}; no time left for a retry within total_timeout_s {cfg.total_timeout_s}s"
                break
            host = urlsplit(result.final_url or url).hostname or ""
            if result.status == "http_429" or result.http_status == 503:
                limits.pause(host, wait)
            log.debug("retrying %s after %s in %.2fs", url, result.status, wait)
            await asyncio.sleep(wait)
            allowance.left -= wait
            attempt += 1
        result.elapsed_s = time.monotonic() - start
        return result

    async def _attempt(self, session, limits: HostLimits, budget: _Gate, url: str,
                       allowance: "_Allowance") -> tuple[FetchResult, float | None]:
        """Follow one URL through its redirects; returns the result and any Retry-After."""
        import aiohttp
        from yarl import URL

        cfg = self.config
        seen = {url}
        current = url
        for hop in range(cfg.max_redirects + 1):
            reason = check_scheme(current)
            if reason:
                return FetchResult(url, reason, error=f"only http(s) URLs are fetched: {current[:200]}",
                                   final_url=current), None
            host = urlsplit(current).hostname or ""
            try:
                peer = URL(current).raw_host or ""  # the host as aiohttp resolves and connects to it
            except ValueError as exc:
                return FetchResult(url, "bad_url", error=str(exc)[:300], final_url=current), None
            if allowance.left <= 0:
                return FetchResult(url, "timeout", error=f"total_timeout_s {cfg.total_timeout_s}s spent "
                                   "(redirects and retries included)", final_url=current), None
            with connecting_to(peer) as destination:
                try:
                    async with limits.slot(host):
                        hop_s = min(cfg.timeout_s, allowance.left)
                        began = asyncio.get_running_loop().time()
                        try:
                            async with asyncio.timeout(hop_s) as deadline:
                                outcome = await self._request(session, budget, deadline, url, current, allowance)
                        finally:
                            allowance.left -= asyncio.get_running_loop().time() - began
                except TimeoutError:
                    within = (f"{cfg.timeout_s}s" if hop_s == cfg.timeout_s else
                              f"total_timeout_s {cfg.total_timeout_s}s (redirects and retries included)")
                    return FetchResult(url, "timeout", error=f"no complete response within {within}",
                                       final_url=current), None
                except (aiohttp.InvalidURL, ValueError) as exc:
                    return FetchResult(url, "bad_url", error=str(exc)[:300], final_url=current), None
                except (aiohttp.ClientError, OSError) as exc:
                    if destination.refused:  # the guard refused every address the connection could use
                        return FetchResult(url, "forbidden_address", error=destination.refused[0],
                                           final_url=current), None
                    reason = "dns_error" if isinstance(exc, aiohttp.ClientConnectorDNSError) else "connection_error"
                    return FetchResult(url, reason, error=f"{type(exc).__name__}: {exc}"[:300],
                                       final_url=current), None
            if isinstance(outcome, str):  # a redirect target
                nxt = outcome
                if nxt in seen:
                    return FetchResult(url, "redirect_loop", error=f"redirect back to {nxt[:200]}",
                                       final_url=current), None
                seen.add(nxt)
                current = nxt
                continue
            result, wait = outcome
            return result, wait
        return FetchResult(url, "too_many_redirects", error=f"more than {cfg.max_redirects} redirects",
                           final_url=current), None

    async def _request(self, session, budget: _Gate, deadline: asyncio.Timeout, url: str, current: str,
                       allowance: "_Allowance"):
        """One HTTP request: a redirect target (str), or (FetchResult, Retry-After seconds).

        An ok result's body keeps its bytes of `budget` (the consumer gives them back);
        any other outcome gives them back here.
        """
        cfg = self.config
        async with session.get(current, allow_redirects=False) as resp:
            code = resp.status
            ctype = resp.headers.get("Content-Type")
            if code in REDIRECT_CODES:
                location = resp.headers.get("Location")
                if not location:
                    return FetchResult(url, "bad_redirect", http_status=code, error="redirect without Location",
                                       final_url=current), None
                return urljoin(current, location)
            if code not in OK_CODES:
                wait = retry_after_seconds(resp.headers.get("Retry-After")) if code in (429, 503) else None
                return FetchResult(url, f"http_{code}", http_status=code, error=resp.reason, final_url=current,
                                   content_type=ctype), wait
            if cfg.honour_x_robots:
                directive = robots_opt_out(resp.headers.getall("X-Robots-Tag", []), self.token)
                if directive:
                    return FetchResult(url, "opted_out", http_status=code, error=f"X-Robots-Tag: {directive}",
                                       final_url=current, content_type=ctype), None
            if resp.content_length is not None and resp.content_length > cfg.max_bytes:
                return FetchResult(url, "too_large", http_status=code,
                                   error=f"Content-Length {resp.content_length} > {cfg.max_bytes}",
                                   final_url=current, content_type=ctype), None
            # Room for the body, before its first byte: its length when the server states it for the
            # bytes as sent, else the cap (a compressed body is inflated while read).
            identity = resp.headers.get("Content-Encoding", "identity").lower() == "identity"
            room = resp.content_length if identity and resp.content_length is not None else cfg.max_bytes
            loop = asyncio.get_running_loop()
            left = deadline.when() - loop.time()
            deadline.reschedule(None)  # waiting for room is our own queueing, not the server's slowness
            waited = loop.time()
            await budget.acquire(room)
            allowance.left += loop.time() - waited
            deadline.reschedule(loop.time() + left)
            data = None
            try:
                data = await read_body(resp, room)
            finally:
                budget.release(room - len(data or b""))  # an ok body keeps its own bytes
            if data is None:
                return FetchResult(url, "too_large", http_status=code,
                                   error=f"body over {room} bytes (abandoned while reading)",
                                   final_url=current, content_type=ctype), None
            if not data:
                return FetchResult(url, "empty_body", http_status=code, error="empty body", final_url=current,
                                   content_type=ctype), None
            return FetchResult(url, "ok", data=data, http_status=code, final_url=current, content_type=ctype), None


@dataclass
class _Allowance:
    """What is left of one URL's `total_timeout_s`, in seconds: spent by its requests and retry waits."""

    left: float
