"""What every HTTP client of the crawler shares: its User-Agent, its retry delays, its rate limiter.

Search APIs (the providers) and image hosts (the fetcher) are asked the same way:
an honest User-Agent naming the project and a contact (Wikimedia requires one;
browser impersonation is what gets crawlers blocked), waits that follow the
server's `Retry-After` before any backoff of our own, and requests spaced so a
host never sees more than its allowed rate.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from datetime import datetime, timezone

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
