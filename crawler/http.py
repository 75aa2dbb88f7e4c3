"""What every HTTP client of the crawler shares: its User-Agent, its retry delays, its rate limiter,
its guarded session and its capped body reads.

Search APIs (the providers) and image hosts (the fetcher) are asked the same way:
an honest User-Agent naming the project and a contact (Wikimedia requires one;
browser impersonation is what gets crawlers blocked), waits that follow the
server's `Retry-After` before any backoff of our own, and requests spaced so a
host never sees more than its allowed rate. They also connect the same way: through
`guarded_session`, whose every socket is checked by the address guard
(`crawler.netguard`), with no cookies kept between hosts and no proxy taken from the
environment, and they read bodies with `read_body`, which stops at a cap counted in
decompressed bytes.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import random
import time
import weakref
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from crawler.netguard import AllowList, guarded_socket_factory

if TYPE_CHECKING:
    import aiohttp

_CHUNK = 64 * 1024
#: Sessions made by `guarded_session`, so a client can refuse one that is not.
_GUARDED: "weakref.WeakSet[aiohttp.ClientSession]" = weakref.WeakSet()

#: Where a site operator finds who runs the crawler; overridable per run (`contact` setting).
CONTACT_URL = "https://github.com/scn-scale/scn-scale"


def user_agent(contact: str = CONTACT_URL) -> str:
    """The User-Agent of every request: project, version, contact, and the word crawler."""
    return f"scn-scale/0.1 (+{contact}; crawler)"


USER_AGENT = user_agent()


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or HTTP-date); None if absent or unreadable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = now or datetime.now(timezone.utc)
    return max(0.0, (when - now).total_seconds())


def backoff_seconds(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with jitter for retry `attempt` (0-based): base * 2**attempt, halved at random, capped.

    The jitter keeps many clients that failed together from retrying together.
    """
    delay = min(cap, base * 2**attempt)
    return delay * (0.5 + random.random() / 2)


class RateLimiter:
    """Spaces calls at least 1/rate seconds apart (a token bucket of depth one).

    It holds no asyncio primitive, so one limiter serves any event loop; the slot is
    claimed before the first await, so concurrent callers on one loop never share it.
    """

    def __init__(self, per_second: float) -> None:
        if per_second <= 0:
            raise ValueError(f"requests per second must be positive, got {per_second}")
        self._interval = 1.0 / per_second
        self._next = 0.0

    async def wait(self) -> None:
        now = time.monotonic()
        slot = max(now, self._next)
        self._next = slot + self._interval
        if slot > now:
            await asyncio.sleep(slot - now)


def guarded_session(allow: AllowList, *, user_agent: str = USER_AGENT, concurrency: int = 100) -> "aiohttp.ClientSession":
    """An aiohttp session whose every connection is made by the address guard's socket factory.

    Redirects are the caller's to follow (by hand, `allow_redirects=False`, each hop under
    `netguard.connecting_to`); no cookie jar (a cookie set by one host is never sent to
    another); `trust_env=False`, so `HTTP_PROXY` and `.netrc` cannot route or credential a request.
    """
    import aiohttp

    connector = aiohttp.TCPConnector(
        limit=concurrency,
        limit_per_host=0,  # per-host limits are the callers' (the fetcher's HostLimits, a provider's rate)
        socket_factory=guarded_socket_factory(allow),
        ttl_dns_cache=300,
    )
    session = aiohttp.ClientSession(
        connector=connector,
        headers={"User-Agent": user_agent},
        timeout=aiohttp.ClientTimeout(total=None),  # deadlines are the callers', per request
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    )
    _GUARDED.add(session)
    return session


def is_guarded(session: Any) -> bool:
    """Whether `session` was made by `guarded_session`."""
    return session in _GUARDED


async def read_body(resp: "aiohttp.ClientResponse", limit: int) -> bytes | None:
    """The body, or None once it passes `limit` bytes; one growing buffer, never the chunks and their join at once.

    aiohttp inflates a compressed body as it is read, a bounded piece at a time, so what is
    counted is the decompressed size: a small gzip answer that inflates without end is cut at the cap.
    """
    buffer = io.BytesIO()
    async for chunk in resp.content.iter_chunked(_CHUNK):
        if buffer.tell() + len(chunk) > limit:
            return None
        buffer.write(chunk)
    return buffer.getvalue()
