"""YouTube search through yt-dlp (`ytsearchN:query`): videos whose frames may hold faces.

The paper's WebEmotion came from YouTube search results, but YouTube's terms restrict
downloading, so this provider exists only behind an explicit opt-in, and yt-dlp is an
optional extra imported only then. Discovery records the video id; the frames are
sampled later by the fetch side.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from crawler.candidate import Candidate
from crawler.http import RateLimiter
from crawler.providers.base import RatePolicy, SearchPage
from crawler.queries import Query

INSTALL_HINT = "pip install 'scn-scale[video]'"


class YouTubeProvider:
    name = "youtube"
    # ytsearch has no pages: one call returns the first N results.
    default_rate = RatePolicy(requests_per_second=0.5, concurrency=1, max_results=100, page_size=100)

    def __init__(
        self, *, allow_youtube: bool = False, api_base: str = "https://www.youtube.com", rate: RatePolicy | None = None
    ) -> None:
        """`api_base`: the site the watch URLs point at."""
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
        self.rate = rate or self.default_rate
        self._limiter = RateLimiter(self.rate.requests_per_second)

    async def search(
        self, session: aiohttp.ClientSession, query: Query, limit: int, cursor: str | None
    ) -> SearchPage:
        n = min(limit, self.rate.max_results)
        await self._limiter.wait()
        entries = await asyncio.to_thread(self._search, f"ytsearch{n}:{query.text}")
        candidates = [self._candidate(e, query) for e in entries if e.get("id")]
        return SearchPage(candidates[:limit], None)

    def _search(self, spec: str) -> list[dict[str, Any]]:
        options = {"quiet": True, "no_warnings": True, "skip_download": True, "extract_flat": "in_playlist"}
        with self._yt_dlp.YoutubeDL(options) as ydl:
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
            media_type="video",
            license=entry.get("license"),
            creator=entry.get("channel") or entry.get("uploader"),
            title=entry.get("title"),
            extras={
                "video_id": entry["id"],
                "duration": entry.get("duration"),
                "channel_id": entry.get("channel_id"),
            },
        )
