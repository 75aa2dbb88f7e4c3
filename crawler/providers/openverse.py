"""Openverse: openly licensed images with licence, creator and attribution in every result.

`GET {base}/v1/images/?q=&page=&page_size=`. Anonymous clients may ask for 20 results
a page (larger pages answer 401) and reach 240 results a query; registered clients
(OAuth2 client credentials from OPENVERSE_CLIENT_ID / OPENVERSE_CLIENT_SECRET) may ask
for larger pages, not deeper ones. The embedded web (crawler.localweb) answers in the
same format, so `LocalWebProvider` is this provider pointed at it.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import aiohttp

from crawler.candidate import Candidate
from crawler.providers.base import HttpProvider, ProviderError, RatePolicy, SearchPage
from crawler.queries import Query

logger = logging.getLogger(__name__)

CLIENT_ID_ENV = "OPENVERSE_CLIENT_ID"
CLIENT_SECRET_ENV = "OPENVERSE_CLIENT_SECRET"
ANONYMOUS_MAX_PAGE_SIZE = 20


class OpenverseProvider(HttpProvider):
    name = "openverse"
    default_base = "https://api.openverse.org"
    # Openverse asks API users for low request rates; 240 results is its depth limit for everyone.
    default_rate = RatePolicy(requests_per_second=1.0, concurrency=2, max_results=240, page_size=20)
    uses_oauth = True

    def __init__(self, *, licenses: str | None = None, **common: Any) -> None:
        """`licenses`: Openverse's `license` filter, e.g. "by,by-sa,cc0,pdm" (None: every licence)."""
        super().__init__(**common)
        self.licenses = licenses
        client_id = os.environ.get(CLIENT_ID_ENV) if self.uses_oauth else None
        client_secret = os.environ.get(CLIENT_SECRET_ENV) if self.uses_oauth else None
        self._credentials = (client_id, client_secret) if client_id and client_secret else None
        if self._credentials:
            self.api.secrets += list(self._credentials)
        elif self.uses_oauth and self.rate.page_size > ANONYMOUS_MAX_PAGE_SIZE:
            raise ValueError(
                f"openverse: page_size {self.rate.page_size} needs credentials "
                f"(set {CLIENT_ID_ENV} and {CLIENT_SECRET_ENV}); anonymous pages hold at most {ANONYMOUS_MAX_PAGE_SIZE}"
            )
        self._token: str | None = None
        self._token_expires = 0.0

    async def search(
        self, session: aiohttp.ClientSession, query: Query, limit: int, cursor: str | None
    ) -> SearchPage:
        page = int(cursor or 1)
        page_size = self.rate.page_size
        params = {"q": query.text, "page": str(page), "page_size": str(page_size)}
        if self.licenses:
            params["license"] = self.licenses
        payload = await self.api.get(session, f"{self.api_base}/v1/images/", params, headers=await self._auth(session))
        candidates = [c for c in (self._candidate(item, query) for item in payload.get("results", [])) if c]
        more = page < int(payload.get("page_count") or 0) and page * page_size < self.rate.max_results
        return SearchPage(candidates[:limit], str(page + 1) if more else None)

    async def _auth(self, session: aiohttp.ClientSession) -> dict[str, str]:
        """The Authorization header of a registered client (token fetched once, renewed before it expires)."""
        if not self._credentials:
            return {}
        if self._token is None or time.monotonic() >= self._token_expires:
            client_id, client_secret = self._credentials
            url = f"{self.api_base}/v1/auth_tokens/token/"
            answer = await self.api.post(
                session, url, {"grant_type": "client_credentials", "client_id": client_id, "client_secret": client_secret}
            )
            token, lifetime = answer.get("access_token"), answer.get("expires_in", 3600)
            if not isinstance(token, str) or not token:
                # Only the field names are shown: a token answer's values are credentials.
                raise ProviderError(self.name, url, 200, f"token answer without access_token (fields: {sorted(answer)[:10]})")
            if not isinstance(lifetime, (int, float)) or lifetime <= 0:
                raise ProviderError(self.name, url, 200, f"token answer with expires_in {str(lifetime)[:20]!r}, "
                                                         "not a positive number of seconds")
            self._token = token
            self.api.secrets.append(token)
            self._token_expires = time.monotonic() + 0.9 * float(lifetime)
        return {"Authorization": f"Bearer {self._token}"}

    def _candidate(self, item: dict[str, Any], query: Query) -> Candidate | None:
        if not item.get("url") or not item.get("id"):
            logger.debug("%s: result without id or url skipped: %s", self.name, item)
            return None
        return Candidate.found_by(
            query,
            url=item["url"],
            page_url=item.get("foreign_landing_url"),
            provider=self.name,
            provider_id=str(item["id"]),
            license=item.get("license"),
            license_version=item.get("license_version"),
            license_url=item.get("license_url"),
            creator=item.get("creator"),
            attribution=item.get("attribution"),
            width=item.get("width"),
            height=item.get("height"),
            filesize=item.get("filesize"),
            title=item.get("title"),
            extras={
                "source": item.get("source"),
                "source_provider": item.get("provider"),
                "creator_url": item.get("creator_url"),
                "filetype": item.get("filetype"),
                "mature": item.get("mature"),
                "thumbnail": item.get("thumbnail"),
                "tags": [t.get("name") for t in item.get("tags") or [] if isinstance(t, dict)],
            },
        )


class LocalWebProvider(OpenverseProvider):
    """Openverse's format served by crawler.localweb on 127.0.0.1: no credentials, no public limits."""

    name = "localweb"
    default_base = None
    default_rate = RatePolicy(requests_per_second=500.0, concurrency=8, max_results=10_000, page_size=100)
    uses_oauth = False
