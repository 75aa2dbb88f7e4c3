"""Video pages to media URLs: yt-dlp reads a watch page and names one small rendition's file.

A YouTube result is a page, not a file; yt-dlp knows how to turn a page (YouTube's, or
any of the sites it supports, or a direct media link) into the URL of one rendition.
Only the smallest useful rendition is asked for (<= 480 lines; faces are cropped to 112
or 224 px), and only its URL: the bytes are fetched by the fetch stage like any image,
under its address guard, deadline and byte cap. yt-dlp's own requests (the page, its
redirects, whatever the extractor fetches) go through a `GuardProxy` of this process,
which applies the same guard where each connection is made, and only the extractors the
project uses are loaded (YouTube's and the generic one, for direct links and plain
pages). Each page has one byte cap and one deadline for all of yt-dlp's requests for it
(the proxy's `max_bytes` and `total_s`: the fetcher's `max_bytes` and `total_timeout_s`),
so a page that trickles or never ends costs at most those and ends as `timeout` or
`too_large`. yt-dlp is an optional extra, imported on first use, and reached only for
`video_page` candidates, which only the opt-in YouTube provider and URL lists that ask
for them produce.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from crawler.guardproxy import GuardProxy
from crawler.netguard import AllowList, check_scheme

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'scn-scale[video]'"
#: A video-only or progressive rendition of at most 480 lines, else the smallest there is.
FORMAT = "bv*[height<=480]/b[height<=480]/wv*/w"
#: yt-dlp extractors loaded (its `allowed_extractors`, names matched whole): watch pages and direct links.
EXTRACTORS = ["youtube", "generic"]


@dataclass
class Resolved:
    page_url: str
    status: str  # "ok", "bad_scheme", "forbidden_address", "timeout", "too_large", "resolve_failed"
    media_url: str | None = None
    error: str | None = None
    title: str | None = None
    duration_s: float | None = None


class YtDlpLog:
    """yt-dlp's messages at debug level in the crawler's log: a failure is a status or an exception, not a console line."""

    def debug(self, msg: str) -> None:
        log.debug("yt-dlp: %s", msg)

    info = warning = error = debug


class Resolver:
    def __init__(self, allow: AllowList, timeout_s: float = 20.0, user_agent: str | None = None,
                 max_bytes: int = 25 * 1024 * 1024, total_s: float = 60.0) -> None:
        """`timeout_s` per socket read and connect; `max_bytes` and `total_s` for all the requests of one page."""
        try:
            import yt_dlp
        except ImportError:
            raise RuntimeError(f"video pages need yt-dlp: {INSTALL_HINT}") from None
        self._yt_dlp = yt_dlp
        self.allow = allow
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.total_s = total_s
        self.options: dict[str, Any] = {
            "quiet": True, "no_warnings": True, "skip_download": True, "noplaylist": True, "format": FORMAT,
            "socket_timeout": timeout_s, "retries": 1, "extractor_retries": 1, "logger": YtDlpLog(),
            "allowed_extractors": EXTRACTORS,
        }
        if user_agent:
            self.options["http_headers"] = {"User-Agent": user_agent}

    def __call__(self, page_url: str) -> Resolved:
        """One page's media URL, or why there is none (a status, never an exception)."""
        if check_scheme(page_url):
            return Resolved(page_url, "bad_scheme", error="only http and https pages are resolved")
        with GuardProxy(self.allow, self.timeout_s, self.max_bytes, self.total_s) as proxy:
            try:
                with self._yt_dlp.YoutubeDL({**self.options, "proxy": proxy.url}) as ydl:
                    info = ydl.extract_info(page_url, download=False) or {}
            except Exception as e:  # yt-dlp's DownloadError wraps every extractor and network fault
                if proxy.refused:
                    return Resolved(page_url, "forbidden_address", error=proxy.refused[0])
                if proxy.exceeded:
                    status, _, why = proxy.exceeded.partition(": ")
                    return Resolved(page_url, status, error=f"yt-dlp's requests for the page: {why}")
                return Resolved(page_url, "resolve_failed", error=f"{type(e).__name__}: {e}"[:300])
        media = info.get("url") or next((f.get("url") for f in info.get("requested_formats") or [] if f.get("url")), None)
        if not media:
            return Resolved(page_url, "resolve_failed", error="yt-dlp found no media URL for the chosen format")
        return Resolved(page_url, "ok", media_url=media, title=info.get("title"), duration_s=info.get("duration"))
