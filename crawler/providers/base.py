"""The provider interface, and the HTTP etiquette every search API is spoken to with.

A provider turns one `Query` into pages of `Candidate`s. Its `RatePolicy` says how
hard it may be asked (requests per second, requests in flight, results per query,
page size), and `JsonApi` enforces it: requests spaced by the rate, an honest
User-Agent, retries only for 429, 5xx and network failures, waits that follow
`Retry-After`, and errors that name the URL (with API keys blanked) and the status.
Until an API has answered once, its failures to answer (no such host, connection refused,
timeouts, 5xx) are counted together across every query: once they have lasted
`RetryPolicy.first_contact_s`, `ProviderUnreachable` stops discovery with one message,
where retrying each query in turn would take minutes to say the same.

A search API is a host on the open web like any other, and its answers are as hostile.
`JsonApi` speaks only through a `crawler.http.guarded_session` (the fetcher's address
guard at every socket, and its allow-list), follows redirects by hand with the same
checks on every hop (at most `MAX_REDIRECTS`, within one deadline), never sends a request
that carries a credential (an API key, a client secret, a bearer token: any of its
`secrets` in the query, the form or a header) to an origin other than the one it was
addressed to, reads an answer up to `max_bytes` counted after decompression, and
requires it to be a JSON object. Messages and logs show at most `EXCERPT_CHARS`
characters of an answer, with every secret blanked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable
from urllib.parse import urlencode, urljoin

import aiohttp
from yarl import URL

from crawler.candidate import Candidate
from crawler.http import (
    CONTACT_URL,
    RateLimiter,
    backoff_seconds,
    is_guarded,
    read_body,
    retry_after_seconds,
    user_agent,
)
from crawler.netguard import check_scheme, connecting_to, origin
from crawler.queries import Query

logger = logging.getLogger(__name__)

#: Largest API answer read, in bytes after decompression (`discover.max_bytes`).
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
#: Redirects followed for one API request.
MAX_REDIRECTS = 5
#: Characters of an answer a message or log line may show.
EXCERPT_CHARS = 80
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class ProviderError(RuntimeError):
    """A search request that failed for good: names the provider, the URL and the HTTP status."""

    def __init__(self, provider: str, url: str, status: int | None, detail: str) -> None:
        self.provider = provider
        self.url = url
        self.status = status
        where = f"{url} answered HTTP {status}" if status is not None else url
        super().__init__(f"{provider}: {where}: {detail}")


class ProviderUnreachable(ProviderError):
    """The API has not answered once (no such host, connection refused, 5xx, timeouts) for
    `first_contact_s`: the crawl cannot run, whichever query is asked next."""


@dataclass(frozen=True)
class RatePolicy:
    """How hard a provider may be asked; the defaults of each provider follow its published limits."""

    requests_per_second: float
    concurrency: int
    max_results: int
    page_size: int

    def __post_init__(self) -> None:
        if self.requests_per_second <= 0 or self.concurrency < 1 or self.max_results < 1 or self.page_size < 1:
            raise ValueError(f"invalid rate policy {self}: every field must be positive")


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of 429, 5xx and network failures: `max_retries` after the first try, exponential backoff.

    `sleep_scale` multiplies every wait; tests shrink it so a `Retry-After` costs milliseconds.
    A server asking for more than `max_backoff_s` is not waited for: the request fails.
    Until the API has answered once, its failures to answer end discovery when they have
    lasted `first_contact_s` over all queries together, or would outlast it by the next
    wait (`ProviderUnreachable`).
    """

    max_retries: int = 4
    backoff_s: float = 1.0
    max_backoff_s: float = 120.0
    sleep_scale: float = 1.0
    first_contact_s: float = 10.0


@dataclass
class SearchPage:
    """One page of results and the opaque cursor of the next page (None: the query is exhausted)."""

    candidates: list[Candidate]
    next_cursor: str | None


@runtime_checkable
class Provider(Protocol):
    name: str
    rate: RatePolicy

    async def search(
        self, session: aiohttp.ClientSession, query: Query, limit: int, cursor: str | None
    ) -> SearchPage:
        """Up to `limit` results of `query` from the page `cursor` points at (None: the first page)."""
        ...


@runtime_checkable
class OwnsQueries(Protocol):
    """A provider whose input defines its own queries (a URL list): discovery runs those by default."""

    def queries(self) -> list[Query]: ...


class JsonApi:
    """One provider's JSON API client: rate limit, retries, User-Agent, and secret-free error messages."""

    def __init__(
        self,
        provider: str,
        rate: RatePolicy,
        retry: RetryPolicy,
        contact: str = CONTACT_URL,
        timeout_s: float = 30.0,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"{provider}: max_bytes must be positive, got {max_bytes}")
        self.provider = provider
        self.retry = retry
        self.user_agent = user_agent(contact)
        #: One request's whole time, its redirects included.
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        #: Values blanked from every message (API keys, client secrets, tokens); providers add theirs.
        self.secrets: list[str] = []
        self._limiter = RateLimiter(rate.requests_per_second)
        #: Whether the API has answered once (anything but a 5xx); until then, since when it has failed to.
        self._answered = False
        self._failing_since: float | None = None

    async def get(
        self,
        session: aiohttp.ClientSession,
        url: str,
        params: dict[str, str],
        headers: dict[str, str] | None = None,
        retry_if: Callable[[Any], bool] | None = None,
        error_of: Callable[[Any], str | None] | None = None,
    ) -> Any:
        """GET a JSON document.

        Some APIs report failures inside a 200 answer: `retry_if(payload)` marks one as
        transient (Wikimedia's maxlag, Flickr's 'service unavailable'), `error_of(payload)`
        returns the message of a permanent one.
        """
        return await self._request(session, "GET", url, params, None, headers, retry_if, error_of)

    async def post(
        self, session: aiohttp.ClientSession, url: str, data: dict[str, str], headers: dict[str, str] | None = None
    ) -> Any:
        """POST a form and read a JSON answer (OAuth token requests); the form is never shown in errors."""
        return await self._request(session, "POST", url, None, data, headers, None, None)

    def scrub(self, text: str) -> str:
        """`text` with every secret replaced, for messages and logs."""
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def excerpt(self, body: bytes) -> str:
        """The start of an answer, short and with every secret blanked: all a message shows of it."""
        return _excerpt(self.scrub(body.decode("utf-8", "replace")))

    def _carries_secret(self, *parts: dict[str, str] | None) -> bool:
        """Whether any secret is in the values of these query parameters, form fields or headers."""
        values = [str(v) for part in parts if part for v in part.values()]
        return any(secret in value for value in values for secret in self.secrets if secret)

    def _display(self, url: str, params: dict[str, str] | None) -> str:
        """The URL as messages show it: secret parameters blanked before encoding, so no encoding hides one."""
        if not params:
            return url
        shown = {k: "***" if v in self.secrets else v for k, v in params.items()}
        return self.scrub(f"{url}?{urlencode(shown, safe='*|')}")

    async def _request(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: str,
        params: dict[str, str] | None,
        data: dict[str, str] | None,
        headers: dict[str, str] | None,
        retry_if: Callable[[Any], bool] | None,
        error_of: Callable[[Any], str | None] | None,
    ) -> Any:
        if not is_guarded(session):
            raise TypeError("provider API requests go through crawler.http.guarded_session, which checks the "
                            "address of every connection")
        shown = self._display(url, params)
        headers = {"User-Agent": self.user_agent, "Accept": "application/json", **(headers or {})}
        attempt = 0
        while True:
            await self._limiter.wait()
            retry_after: float | None = None
            status: int | None = None
            try:
                async with asyncio.timeout(self.timeout_s):
                    status, retry_after, body = await self._follow(session, method, url, params, data, headers, shown)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                reason = self.scrub(self._cause(exc))
            else:
                self._answered = self._answered or status < 500
                if status == 429 or status >= 500:
                    reason = f"HTTP {status}"
                elif status >= 400:
                    raise ProviderError(self.provider, shown, status, self.excerpt(body))
                else:
                    payload = self._json(body, shown, status)
                    if retry_if is None or not retry_if(payload):
                        message = error_of(payload) if error_of else None
                        if message:
                            raise ProviderError(self.provider, shown, status, _excerpt(self.scrub(message)))
                        return payload
                    reason = f"transient API error: {self.excerpt(body)}"
            delay = (
                retry_after
                if retry_after is not None
                else backoff_seconds(attempt, self.retry.backoff_s, self.retry.max_backoff_s)
            )
            self._check_reachable(shown, status, reason, delay * self.retry.sleep_scale)
            if attempt == self.retry.max_retries:
                raise ProviderError(self.provider, shown, status, f"gave up after {attempt + 1} attempts: {reason}")
            if retry_after is not None and retry_after > self.retry.max_backoff_s:
                raise ProviderError(
                    self.provider, shown, status, f"asked to wait {retry_after:.0f} s, more than max_backoff_s"
                )
            logger.warning("%s: %s (%s); retry %d in %.1f s", self.provider, shown, reason, attempt + 1, delay)
            await asyncio.sleep(delay * self.retry.sleep_scale)
            attempt += 1

    def _cause(self, exc: BaseException) -> str:
        """A failed request's exception in the words a user acts on (aiohttp's own say 'Connect call failed')."""
        if isinstance(exc, aiohttp.ClientConnectorDNSError):
            return f"no such host: {exc.host} does not resolve ({exc.os_error.strerror or exc.os_error})"
        if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, ConnectionRefusedError):
            return f"connection refused by {exc.host}:{exc.port}"
        if isinstance(exc, asyncio.TimeoutError):
            return f"no answer within {self.timeout_s:g} s"
        return f"{type(exc).__name__}: {exc}"

    def _check_reachable(self, shown: str, status: int | None, reason: str, wait_s: float) -> None:
        """Raise ProviderUnreachable when the API has never answered and its failures to (this one
        included) have lasted, or would with the next wait outlast, `first_contact_s`."""
        if self._answered:
            return
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        if now + wait_s - self._failing_since > self.retry.first_contact_s:
            tried = f"in {now - self._failing_since:.0f} s of trying, over every query asked"
            detail = (f"nothing but server errors ({reason}) {tried}" if status is not None
                      else f"cannot be reached: {reason} ({tried})")
            raise ProviderUnreachable(self.provider, shown, status,
                                      f"{detail}; check the provider's base URL and the network")

    async def _follow(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: str,
        params: dict[str, str] | None,
        data: dict[str, str] | None,
        headers: dict[str, str],
        shown: str,
    ) -> tuple[int, float | None, bytes]:
        """One request and its redirects, each hop checked by the guard: (status, Retry-After, body).

        A redirect to another origin is followed only for a request without credentials;
        one with credentials fails instead, so no key, secret or token reaches a host it was
        not meant for (301, 302 and 303 turn a POST into a GET without its form, as browsers do).
        """
        credentialed = self._carries_secret(params, data, headers)
        home, current = origin(url), url
        for _ in range(MAX_REDIRECTS + 1):
            try:
                peer = URL(current).raw_host or ""  # the host as aiohttp resolves and connects to it
            except ValueError:
                peer = None
            if check_scheme(current) or peer is None:
                raise ProviderError(self.provider, shown, None, "redirected to a URL that is not http(s) with a host")
            with connecting_to(peer) as destination:
                try:
                    async with session.request(method, current, params=params, data=data, headers=headers,
                                               allow_redirects=False) as resp:
                        if resp.status not in _REDIRECTS:
                            body = await read_body(resp, self.max_bytes)
                            if body is None:
                                raise ProviderError(self.provider, shown, resp.status,
                                                    f"answer over max_bytes ({self.max_bytes} bytes, decompressed); "
                                                    "not read further")
                            return resp.status, retry_after_seconds(resp.headers.get("Retry-After")), body
                        location = resp.headers.get("Location")
                        status = resp.status
                except (aiohttp.ClientError, OSError) as exc:
                    if destination.refused:
                        raise ProviderError(self.provider, shown, None,
                                            f"refused by the address guard: {destination.refused[0]}") from exc
                    raise
            if not location:
                raise ProviderError(self.provider, shown, status, "redirect without Location")
            target = urljoin(current, location)
            if credentialed and origin(target) != home:
                raise ProviderError(self.provider, shown, status,
                                    f"redirected to another origin ({_origin_text(target)}); a request with "
                                    "credentials is not re-sent there")
            if status == 303 or (status in (301, 302) and method == "POST"):
                method, data = "GET", None
            current, params = target, None  # the target URL carries its own query
        raise ProviderError(self.provider, shown, None, f"more than {MAX_REDIRECTS} redirects")

    def _json(self, body: bytes, shown: str, status: int) -> dict[str, Any]:
        """The answer as a JSON object (every provider's API answers one); anything else is an error."""
        try:
            payload = json.loads(body)
        except ValueError:
            raise ProviderError(self.provider, shown, status, f"answer is not JSON: {self.excerpt(body)}") from None
        if not isinstance(payload, dict):
            raise ProviderError(self.provider, shown, status,
                                f"answer is a JSON {type(payload).__name__}, not an object: {self.excerpt(body)}")
        return payload


class HttpProvider:
    """What the web-API providers share: a base URL (configurable, so tests point it at 127.0.0.1), a rate policy, a `JsonApi`."""

    name: str
    default_base: str | None
    default_rate: RatePolicy

    def __init__(
        self,
        *,
        api_base: str | None = None,
        rate: RatePolicy | None = None,
        retry: RetryPolicy | None = None,
        contact: str = CONTACT_URL,
        timeout_s: float = 30.0,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        base = api_base or self.default_base
        if not base:
            raise ValueError(f"provider {self.name!r} needs api_base (the URL of its search API)")
        self.api_base = base.rstrip("/")
        self.rate = rate or self.default_rate
        self.api = JsonApi(self.name, self.rate, retry or RetryPolicy(), contact, timeout_s, max_bytes)


def _origin_text(url: str) -> str:
    """Scheme, host and port of a URL: what a message shows of a redirect target (its path and query may hold secrets)."""
    scheme, host, port = origin(url)
    return f"{scheme}://{host}:{port}"


def _excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
