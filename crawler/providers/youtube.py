"""YouTube search through yt-dlp (`ytsearchN:query`): videos whose frames may hold faces.

The paper's WebEmotion came from YouTube search results, but YouTube's terms restrict
downloading, so this provider exists only behind an explicit opt-in, and yt-dlp is an
optional extra imported only then. yt-dlp speaks YouTube's own search API (innertube,
`POST /youtubei/v1/search`, about 20 results a page, continuation tokens), so it keeps
working when YouTube changes; this provider adds what the other providers have: a rate
policy, a cap on results per query, and retries of 429 and 5xx with `Retry-After`
(yt-dlp gives up on a 429 at once). Discovery records the watch page; in the work
shards `crawler.resolve` turns it into a media URL, the fetcher fetches the video and
`crawler.frames` samples its frames.

`api_base` points the API calls at another host (a test server): yt-dlp's `innertube_host`,
with the search page's configuration taken from yt-dlp's defaults instead of fetched.
Such a server speaks https only, as YouTube does; `verify_tls=False` accepts its
self-signed certificate, and is refused for any host that is not a loopback address.
Only yt-dlp's search extractor is loaded, and its requests go through a `GuardProxy`
that lets them reach the `api_base` host and port (chosen by whoever runs the crawl, as
every provider's API is) and public addresses, nothing else; one search may read at most
`max_bytes` through it, within `total_timeout_s`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from crawler.candidate import Candidate
from crawler.guardproxy import GuardProxy
from crawler.http import RateLimiter, backoff_seconds, retry_after_seconds
from crawler.netguard import AllowList, origin_entry
from crawler.providers.base import DEFAULT_MAX_BYTES, ProviderError, RatePolicy, RetryPolicy, SearchPage
from crawler.queries import Query
from crawler.resolve import YtDlpLog

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'scn-scale[video]'"
YOUTUBE = "https://www.youtube.com"


class YouTubeProvider:
    name = "youtube"
    # One search call returns the first N results, paging inside yt-dlp: no cursor.
    default_rate = RatePolicy(requests_per_second=0.5, concurrency=1, max_results=100, page_size=100)

    def __init__(
        self,
        *,
        allow_youtube: bool = False,
        api_base: str = YOUTUBE,
        verify_tls: bool = True,
        timeout_s: float = 30.0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        total_timeout_s: float = 120.0,
        rate: RatePolicy | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        """`timeout_s` per socket read; `max_bytes` and `total_timeout_s` for all of one search's requests."""
        if not allow_youtube:
            raise ValueError(
                "the youtube provider is opt-in because YouTube's terms restrict downloading: "
                "set allow_youtube=True (crawler.build --allow-youtube) to use it"
            )
        try:
            import yt_dlp
        except ImportError:
            raise RuntimeError(f"the youtube provider needs yt-dlp: {INSTALL_HINT}") from None
        self._yt_dlp = yt_dlp
        self.api_base = api_base.rstrip("/")
        parts = urlsplit(self.api_base)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"youtube api_base must be an https URL, got {api_base!r}")
        if not verify_tls and not _is_loopback(parts.hostname):
            raise ValueError(f"verify_tls=False is only for a test server on a loopback address, not {parts.hostname}")
        self.rate = rate or self.default_rate
        self.retry = retry or RetryPolicy()
        self._limiter = RateLimiter(self.rate.requests_per_second)
        self._allow = AllowList.parse([origin_entry(self.api_base)])
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.total_timeout_s = total_timeout_s
        self.options: dict[str, Any] = {
            "quiet": True, "no_warnings": True, "skip_download": True, "extract_flat": "in_playlist",
            "logger": YtDlpLog(), "nocheckcertificate": not verify_tls, "allowed_extractors": ["youtube:search"],
            "socket_timeout": timeout_s,
            "extractor_retries": 0,  # retries are this provider's (yt-dlp would retry a 400 but not a 429)
        }
        if self.api_base != YOUTUBE:
            self.options["extractor_args"] = {"youtube": {"innertube_host": [parts.netloc]},
                                              "youtubetab": {"skip": ["webpage"]}}

    async def search(
        self, session: aiohttp.ClientSession, query: Query, limit: int, cursor: str | None
    ) -> SearchPage:
        n = min(limit, self.rate.max_results)
        spec = f"ytsearch{n}:{query.text}"
        attempt = 0
        while True:
            await self._limiter.wait()
            try:
                entries = await asyncio.to_thread(self._search, spec)
                break
            except self._yt_dlp.utils.DownloadError as exc:
                status, retry_after = _http_failure(exc)
                detail = str(exc).removeprefix("ERROR: ")[:300]
                if not (status == 429 or (status or 0) >= 500) or attempt == self.retry.max_retries:
                    tries = f"gave up after {attempt + 1} attempts: " if attempt else ""
                    raise ProviderError(self.name, f"{self.api_base} search {query.text!r}", status, tries + detail) from exc
                if retry_after is not None and retry_after > self.retry.max_backoff_s:
                    raise ProviderError(self.name, f"{self.api_base} search {query.text!r}", status,
                                        f"asked to wait {retry_after:.0f} s, more than max_backoff_s") from exc
                delay = retry_after if retry_after is not None else backoff_seconds(
                    attempt, self.retry.backoff_s, self.retry.max_backoff_s)
                logger.warning("youtube: search %r answered HTTP %s; retry %d in %.1f s", query.text, status,
                               attempt + 1, delay)
                await asyncio.sleep(delay * self.retry.sleep_scale)
                attempt += 1
        candidates = [self._candidate(e, query) for e in entries if e.get("id")]
        return SearchPage(candidates[:limit], None)

    def _search(self, spec: str) -> list[dict[str, Any]]:
        with GuardProxy(self._allow, self.timeout_s, self.max_bytes, self.total_timeout_s) as proxy, \
                self._yt_dlp.YoutubeDL({**self.options, "proxy": proxy.url}) as ydl:
            info = ydl.extract_info(spec, download=False) or {}
        return [e for e in info.get("entries") or [] if isinstance(e, dict)]

    def _candidate(self, entry: dict[str, Any], query: Query) -> Candidate:
        url = f"{self.api_base}/watch?v={entry['id']}"
        return Candidate.found_by(
            query,
            url=url,
            page_url=url,
            provider=self.name,
            provider_id=entry["id"],
            media_type="video_page",
            license=entry.get("license"),
            creator=entry.get("channel") or entry.get("uploader"),
            title=entry.get("title"),
            extras={
                "video_id": entry["id"],
                "duration": entry.get("duration"),
                "channel_id": entry.get("channel_id"),
            },
        )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _http_failure(exc: BaseException) -> tuple[int | None, float | None]:
    """The HTTP status and Retry-After behind a yt-dlp error (it wraps the HTTP error twice), if any."""
    seen = exc
    for _ in range(4):
        response = getattr(seen, "response", None)
        status = getattr(seen, "status", None)
        if isinstance(status, int) and response is not None:
            return status, retry_after_seconds(response.headers.get("Retry-After"))
        seen = getattr(seen, "cause", None) or (getattr(seen, "exc_info", None) or (None, None))[1]
        if seen is None:
            break
    return None, None
