"""Flickr: `flickr.photos.search` over the REST API, key from the FLICKR_API_KEY environment variable.

Flickr serves at most 4,000 distinct results a query, reports failures as HTTP 200
with `stat: fail` (code 105, service unavailable, is retried), and gives each photo a
numeric licence id whose names and URLs come from `flickr.photos.licenses.getInfo`,
asked once per provider, so new licences need no code change. The key goes in the
query string, so every message about a request has it blanked.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import aiohttp

from crawler.candidate import Candidate, attribution_text, license_from_url
from crawler.providers.base import HttpProvider, RatePolicy, SearchPage
from crawler.queries import Query

logger = logging.getLogger(__name__)

API_KEY_ENV = "FLICKR_API_KEY"
PHOTO_PAGE = "https://www.flickr.com/photos/{owner}/{id}"
_SERVICE_UNAVAILABLE = 105


class FlickrProvider(HttpProvider):
    name = "flickr"
    default_base = "https://api.flickr.com"
    # Flickr's API terms allow 3,600 requests an hour per key.
    default_rate = RatePolicy(requests_per_second=1.0, concurrency=2, max_results=4_000, page_size=250)

    def __init__(self, *, licenses: str | None = None, **common: Any) -> None:
        """`licenses`: Flickr licence ids to search, comma-separated, e.g. "4,5,9,10" (None: any)."""
        super().__init__(**common)
        key = os.environ.get(API_KEY_ENV)
        if not key:
            raise ValueError(f"the flickr provider needs an API key in the environment variable {API_KEY_ENV}")
        self._key = key
        self.api.secrets.append(key)
        self.licenses = licenses
        self._license_table: dict[str, tuple[str, str]] | None = None

    async def search(
        self, session: aiohttp.ClientSession, query: Query, limit: int, cursor: str | None
    ) -> SearchPage:
        table = await self._licenses(session)
        page = int(cursor or 1)
        params = {
            "text": query.text,
            "extras": "url_l,license,owner_name",
            "per_page": str(self.rate.page_size),
            "page": str(page),
            "sort": "relevance",
            "content_types": "0",
            "media": "photos",
        }
        if self.licenses:
            params["license"] = self.licenses
        photos = (await self._call(session, "flickr.photos.search", params)).get("photos") or {}
        candidates = [c for c in (self._candidate(p, query, table) for p in photos.get("photo") or []) if c]
        more = page < int(photos.get("pages") or 0) and page * self.rate.page_size < self.rate.max_results
        return SearchPage(candidates[:limit], str(page + 1) if more else None)

    async def _call(self, session: aiohttp.ClientSession, method: str, params: dict[str, str]) -> dict[str, Any]:
        params = {"method": method, "api_key": self._key, **params, "format": "json", "nojsoncallback": "1"}
        return await self.api.get(
            session, f"{self.api_base}/services/rest/", params, retry_if=_unavailable, error_of=_failure
        )

    async def _licenses(self, session: aiohttp.ClientSession) -> dict[str, tuple[str, str]]:
        """Licence id -> (name, URL), from Flickr itself."""
        if self._license_table is None:
            answer = await self._call(session, "flickr.photos.licenses.getInfo", {})
            self._license_table = {
                str(item["id"]): (item.get("name") or "", item.get("url") or "")
                for item in (answer.get("licenses") or {}).get("license") or []
            }
        return self._license_table

    def _candidate(self, photo: dict[str, Any], query: Query, table: dict[str, tuple[str, str]]) -> Candidate | None:
        url = photo.get("url_l")
        if not url or not photo.get("id"):
            # Photos whose original is smaller than 1024 px have no url_l; another size would make the hints lie.
            logger.debug("%s: photo %s has no url_l, skipped", self.name, photo.get("id"))
            return None
        license_id = str(photo.get("license", ""))
        license_name, license_url = table.get(license_id, ("", ""))
        license, version = license_from_url(license_url)
        if license is None and license_name:
            license = re.sub(r"[^a-z0-9]+", "-", license_name.lower()).strip("-")
        creator = photo.get("ownername") or None
        title = photo.get("title") or None
        return Candidate.found_by(
            query,
            url=url,
            page_url=PHOTO_PAGE.format(owner=photo.get("owner"), id=photo["id"]),
            provider=self.name,
            provider_id=str(photo["id"]),
            license=license,
            license_version=version,
            license_url=license_url or None,
            creator=creator,
            attribution=attribution_text(title, creator, license, version, license_url or None),
            width=_int(photo.get("width_l")),
            height=_int(photo.get("height_l")),
            title=title,
            extras={"flickr_license_id": license_id, "license_name": license_name, "owner": photo.get("owner")},
        )


def _unavailable(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("stat") == "fail" and payload.get("code") == _SERVICE_UNAVAILABLE


def _failure(payload: Any) -> str | None:
    if isinstance(payload, dict) and payload.get("stat") == "ok":
        return None
    if isinstance(payload, dict):
        return f"Flickr error {payload.get('code')}: {payload.get('message')}"
    return "answer is not a Flickr response object"


def _int(value: Any) -> int | None:
    """Flickr sends sizes as numbers or as strings."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
