"""Wikimedia Commons: the MediaWiki action API, a full-text search over file pages.

One request searches (`generator=search` in the File namespace) and returns each
file's URLs, size and licence metadata (`prop=imageinfo` with `extmetadata`). Paging
follows the API's `continue` object; Wikimedia asks for requests in series, a
descriptive User-Agent and `maxlag`, whose lag answers come back as HTTP 200 with an
error code and a `Retry-After`, so they are retried like a 503. Images under
`personality` restrictions (identifiable people) are recorded in extras and kept
unless `skip_personality` is set.
"""

from __future__ import annotations

import html
import json
import logging
import re
from typing import Any

import aiohttp

from crawler.candidate import Candidate, attribution_text, license_from_url
from crawler.providers.base import HttpProvider, RatePolicy, SearchPage
from crawler.queries import Query

logger = logging.getLogger(__name__)

_METADATA = ("LicenseShortName", "LicenseUrl", "License", "Artist", "Restrictions", "AttributionRequired")
_TAG = re.compile(r"<[^>]+>")


class WikimediaProvider(HttpProvider):
    name = "wikimedia"
    default_base = "https://commons.wikimedia.org"
    # Requests in series; CirrusSearch stops paging at offset 10,000; 50 pages a request for anonymous users.
    default_rate = RatePolicy(requests_per_second=1.0, concurrency=1, max_results=10_000, page_size=50)

    def __init__(self, *, thumb_width: int = 1024, skip_personality: bool = False, maxlag: int = 5, **common: Any):
        """`thumb_width`: fetch a server-side thumbnail this wide instead of the (often huge) original."""
        super().__init__(**common)
        self.thumb_width = thumb_width
        self.skip_personality = skip_personality
        self.maxlag = maxlag

    async def search(
        self, session: aiohttp.ClientSession, query: Query, limit: int, cursor: str | None
    ) -> SearchPage:
        params = {
            "action": "query",
            "format": "json",
            "formatversion": "2",
            "generator": "search",
            "gsrsearch": f"{query.text} filetype:bitmap",
            "gsrnamespace": "6",
            "gsrlimit": str(self.rate.page_size),
            "prop": "imageinfo",
            "iiprop": "url|size|mime|extmetadata",
            "iiurlwidth": str(self.thumb_width),
            "iiextmetadatafilter": "|".join(_METADATA),
            "maxlag": str(self.maxlag),
            **(json.loads(cursor) if cursor else {}),
        }
        payload = await self.api.get(
            session, f"{self.api_base}/w/api.php", params, retry_if=_lagged, error_of=_api_error
        )
        pages = sorted((payload.get("query") or {}).get("pages") or [], key=lambda p: p.get("index", 0))
        # With `continue`, a page's imageinfo may arrive in a later answer: each page is taken from the
        # answer that carries its imageinfo, so none is lost or doubled.
        candidates = [c for c in (self._candidate(page, query) for page in pages if page.get("imageinfo")) if c]
        cont = payload.get("continue")
        if cont and int(cont.get("gsroffset", 0)) >= self.rate.max_results:
            cont = None
        return SearchPage(candidates[:limit], json.dumps(cont, sort_keys=True) if cont else None)

    def _candidate(self, page: dict[str, Any], query: Query) -> Candidate | None:
        info = page["imageinfo"][0]
        meta = {k: _text(v.get("value")) for k, v in (info.get("extmetadata") or {}).items() if isinstance(v, dict)}
        restrictions = [r for r in (meta.get("Restrictions") or "").split("|") if r]
        if self.skip_personality and "personality" in restrictions:
            logger.debug("%s: %s skipped: personality restrictions", self.name, page.get("title"))
            return None
        license_url = meta.get("LicenseUrl") or None
        license, version = license_from_url(license_url)
        if license is None and (meta.get("License") or meta.get("LicenseShortName")):
            license = (meta.get("License") or meta["LicenseShortName"]).lower()
        creator = meta.get("Artist") or None
        title = page.get("title")
        thumb = info.get("thumburl")
        return Candidate.found_by(
            query,
            url=thumb or info["url"],
            page_url=info.get("descriptionurl"),
            provider=self.name,
            provider_id=str(page["pageid"]),
            license=license,
            license_version=version,
            license_url=license_url,
            creator=creator,
            attribution=attribution_text(title, creator, license, version, license_url),
            width=info.get("thumbwidth") if thumb else info.get("width"),
            height=info.get("thumbheight") if thumb else info.get("height"),
            filesize=None if thumb else info.get("size"),
            title=title,
            extras={
                "original_url": info.get("url"),
                "original_width": info.get("width"),
                "original_height": info.get("height"),
                "original_size": info.get("size"),
                "mime": info.get("mime"),
                "license_short_name": meta.get("LicenseShortName"),
                "attribution_required": meta.get("AttributionRequired"),
                "restrictions": restrictions,
            },
        )


def _lagged(payload: Any) -> bool:
    return isinstance(payload, dict) and (payload.get("error") or {}).get("code") == "maxlag"


def _api_error(payload: Any) -> str | None:
    error = payload.get("error") if isinstance(payload, dict) else None
    return f"API error {error.get('code')}: {error.get('info')}" if error else None


def _text(value: Any) -> str:
    """extmetadata values are HTML fragments (Artist is usually a link): plain text of one."""
    return re.sub(r"\s+", " ", html.unescape(_TAG.sub("", str(value or "")))).strip()
