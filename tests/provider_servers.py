"""Loopback stand-ins for the search APIs, answering in each provider's real response format.

Each fake holds a catalog (query text -> items), enforces the limits the real service
enforces (Openverse: 20 a page anonymously, 240 deep; Wikimedia: `continue` paging;
Flickr: 4,000 results a query, `stat: fail` errors; YouTube: 20 a page, continuation
tokens, https only), logs every request, and can be
told to answer the next requests with an error (`fail_next`) to exercise retries.
"""

from __future__ import annotations

import math
import ssl
import subprocess
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pytest
from aiohttp import web

from crawler.localweb import ServerThread


@dataclass
class Logged:
    at: float
    path: str
    query: dict[str, str]
    headers: dict[str, str]


@dataclass
class Fake:
    """What all fakes share: the request log and scripted failures (status, headers, JSON body)."""

    catalog: dict[str, list[dict[str, Any]]]
    requests: list[Logged] = field(default_factory=list)
    fail_next: list[tuple[int, dict[str, str], Any]] = field(default_factory=list)
    #: Search texts (Openverse's `q`) always answered with a 500.
    broken_queries: set[str] = field(default_factory=set)

    def log(self, request: web.Request) -> web.Response | None:
        self.requests.append(Logged(time.monotonic(), request.path, dict(request.query), dict(request.headers)))
        if request.query.get("q") in self.broken_queries:
            return web.json_response({"detail": "Internal Server Error"}, status=500)
        if self.fail_next:
            status, headers, body = self.fail_next.pop(0)
            return web.json_response(body, status=status, headers=headers)
        return None


def _stable(text: str) -> int:
    """A process-independent number for a query text (str hashes change between runs)."""
    return zlib.crc32(text.encode())


def openverse_item(query: str, k: int, base: str = "https://example.org") -> dict[str, Any]:
    item_id = f"{_stable(query) % 10**8:08d}-0000-4000-8000-{k:012d}"
    return {
        "id": item_id,
        "title": f"{query} #{k}",
        "foreign_landing_url": f"{base}/photos/{k}",
        "url": f"{base}/img/{item_id}.jpg",
        "creator": f"creator {k % 7}",
        "creator_url": f"{base}/people/{k % 7}",
        "license": ["by", "by-sa", "cc0"][k % 3],
        "license_version": ["2.0", "4.0", "1.0"][k % 3],
        "license_url": f"https://creativecommons.org/licenses/by/{k % 3}.0/",
        "provider": "flickr",
        "source": "flickr",
        "category": "photograph",
        "filesize": 1000 + k,
        "filetype": "jpg",
        "tags": [{"name": "face", "accuracy": None}],
        "attribution": f'"{query} #{k}" by creator {k % 7} is licensed under CC BY 2.0.',
        "mature": False,
        "height": 480 + k,
        "width": 640 + k,
        "thumbnail": f"{base}/thumb/{item_id}",
    }


@dataclass
class FakeOpenverse(Fake):
    client_id: str = "client-id-1"
    client_secret: str = "client-secret-1"
    token: str = "token-xyz"
    anonymous_page_size: int = 20
    depth: int = 240
    #: Where the token endpoint sends its client with a 307 (None: it answers itself).
    token_redirect: str | None = None
    #: What the token endpoint answers a valid client with (None: a real token answer).
    token_answer: Any = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/images/", self.search)
        app.router.add_post("/v1/auth_tokens/token/", self.token_endpoint)
        return app

    async def token_endpoint(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.requests.append(Logged(time.monotonic(), request.path, {}, dict(request.headers)))
        if self.token_redirect:
            return web.Response(status=307, headers={"Location": self.token_redirect})
        if form.get("client_id") != self.client_id or form.get("client_secret") != self.client_secret:
            return web.json_response({"error": "invalid_client"}, status=401)
        if self.token_answer is not None:
            return web.json_response(self.token_answer)
        return web.json_response({"access_token": self.token, "scope": "read", "expires_in": 43200, "token_type": "Bearer"})

    async def search(self, request: web.Request) -> web.Response:
        failure = self.log(request)
        if failure:
            return failure
        page, page_size = int(request.query.get("page", 1)), int(request.query.get("page_size", 20))
        authenticated = request.headers.get("Authorization") == f"Bearer {self.token}"
        if page_size > self.anonymous_page_size and not authenticated:
            detail = f"Page size must be between 0 & {self.anonymous_page_size} for unauthenticated requests."
            return web.json_response({"detail": detail}, status=401)
        visible = self.catalog.get(request.query.get("q", ""), [])[: self.depth]
        page_count = math.ceil(len(visible) / page_size)
        if page > max(page_count, 1):
            return web.json_response({"detail": "Invalid page."}, status=400)
        return web.json_response(
            {
                "result_count": len(visible),
                "page_count": page_count,
                "page_size": page_size,
                "page": page,
                "results": visible[(page - 1) * page_size : page * page_size],
            }
        )


def wikimedia_page(query: str, k: int, restrictions: str = "") -> dict[str, Any]:
    name = f"{query.replace(' ', '_')}_{k}.jpg"
    return {
        "pageid": 10_000 + _stable(query) % 10_000 * 1000 + k,
        "ns": 6,
        "title": f"File:{name}",
        "imageinfo": [
            {
                "size": 2_000_000 + k,
                "width": 4000,
                "height": 3000,
                "thumburl": f"https://upload.example.org/thumb/{name}/1024px-{name}",
                "thumbwidth": 1024,
                "thumbheight": 768,
                "url": f"https://upload.example.org/{name}",
                "descriptionurl": f"https://commons.example.org/wiki/File:{name}",
                "descriptionshorturl": f"https://commons.example.org/w/index.php?curid={k}",
                "mime": "image/jpeg",
                "extmetadata": {
                    "LicenseShortName": {"value": "CC BY-SA 4.0", "source": "commons-desc-page", "hidden": ""},
                    "LicenseUrl": {"value": "https://creativecommons.org/licenses/by-sa/4.0", "source": "commons-desc-page", "hidden": ""},
                    "License": {"value": "cc-by-sa-4.0", "source": "commons-templates", "hidden": ""},
                    "Artist": {
                        "value": f'<a href="//commons.example.org/wiki/User:Ann{k}" title="User:Ann{k}">Ann &amp; {k}</a>',
                        "source": "commons-desc-page",
                    },
                    "Restrictions": {"value": restrictions, "source": "commons-desc-page", "hidden": ""},
                },
            }
        ],
    }


@dataclass
class FakeWikimedia(Fake):
    max_limit: int = 50

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/w/api.php", self.api)
        return app

    async def api(self, request: web.Request) -> web.Response:
        failure = self.log(request)
        if failure:
            return failure
        q = request.query
        if q.get("action") != "query" or q.get("generator") != "search" or q.get("gsrnamespace") != "6":
            return web.json_response({"error": {"code": "badparams", "info": "unsupported request"}})
        limit = int(q.get("gsrlimit", 10))
        if limit > self.max_limit:
            return web.json_response({"error": {"code": "toomanyvalues", "info": f"gsrlimit may not exceed {self.max_limit}"}})
        text = q.get("gsrsearch", "").removesuffix(" filetype:bitmap")
        offset = int(q.get("gsroffset", 0))
        found = self.catalog.get(text, [])
        pages = [dict(page, index=offset + i + 1) for i, page in enumerate(found[offset : offset + limit])]
        body: dict[str, Any] = {"batchcomplete": True}
        if offset + limit < len(found):
            body["continue"] = {"gsroffset": offset + limit, "continue": "gsroffset||"}
        if pages:
            body["query"] = {"pages": pages}
        return web.json_response(body)


MAXLAG_ERROR = {
    "error": {"code": "maxlag", "info": "Waiting for db1: 7 seconds lagged.", "host": "db1", "lag": 7, "type": "db"}
}

FLICKR_LICENSES = [
    {"id": 0, "name": "All Rights Reserved", "url": ""},
    {"id": 4, "name": "Attribution License", "url": "https://creativecommons.org/licenses/by/2.0/"},
    {"id": 5, "name": "Attribution-ShareAlike License", "url": "https://creativecommons.org/licenses/by-sa/2.0/"},
    {"id": 9, "name": "Public Domain Dedication (CC0)", "url": "https://creativecommons.org/publicdomain/zero/1.0/"},
    {"id": 10, "name": "Public Domain Mark", "url": "https://creativecommons.org/publicdomain/mark/1.0/"},
]


def flickr_photo(query: str, k: int, with_url: bool = True) -> dict[str, Any]:
    photo_id = str(50_000_000_000 + _stable(query) % 10**6 * 10**4 + k)
    photo = {
        "id": photo_id,
        "owner": f"{k % 13}@N0{k % 9}",
        "secret": "abc123",
        "server": "65535",
        "farm": 66,
        "title": f"{query} {k}",
        "ispublic": 1,
        "isfriend": 0,
        "isfamily": 0,
        "license": str(FLICKR_LICENSES[k % len(FLICKR_LICENSES)]["id"]),
        "ownername": f"owner {k % 13}",
    }
    if with_url:
        photo.update(url_l=f"https://live.example.org/65535/{photo_id}_abc123_b.jpg", height_l="768", width_l=1024)
    return photo


@dataclass
class FakeFlickr(Fake):
    api_key: str = "flickr-secret-key-123"
    cap: int = 4000
    max_per_page: int = 500

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/services/rest/", self.rest)
        return app

    async def rest(self, request: web.Request) -> web.Response:
        failure = self.log(request)
        if failure:
            return failure
        q = request.query
        if q.get("format") != "json" or q.get("nojsoncallback") != "1":
            return web.Response(text="jsonFlickrApi({})", content_type="text/javascript")
        if q.get("api_key") != self.api_key:
            return web.json_response({"stat": "fail", "code": 100, "message": "Invalid API Key (Key has invalid format)"})
        if q.get("method") == "flickr.photos.licenses.getInfo":
            return web.json_response({"licenses": {"license": FLICKR_LICENSES}, "stat": "ok"})
        if q.get("method") != "flickr.photos.search":
            return web.json_response({"stat": "fail", "code": 112, "message": f"Method \"{q.get('method')}\" not found"})
        per_page, page = min(int(q.get("per_page", 100)), self.max_per_page), int(q.get("page", 1))
        found = self.catalog.get(q.get("text", ""), [])
        pages = math.ceil(len(found) / per_page)
        start = (page - 1) * per_page
        if start >= self.cap:
            start = 0  # Flickr repeats earlier results past its 4,000th instead of failing
        photos = found[start : min(start + per_page, self.cap)]
        return web.json_response(
            {
                "photos": {"page": page, "pages": pages, "perpage": per_page, "total": len(found), "photo": photos},
                "stat": "ok",
            }
        )


def youtube_video(query: str, k: int) -> dict[str, Any]:
    """One search result as innertube's web client sends it (the fields yt-dlp reads, and some it skips)."""
    video_id = f"v{_stable(query) % 10**5:05d}{k:05d}"
    channel_id = f"UC{_stable(query + str(k % 3)) % 10**8:08d}abcdefghijklmn"
    byline = {"runs": [{"text": f"Channel {k % 3}", "navigationEndpoint": {
        "commandMetadata": {"webCommandMetadata": {"url": f"/@channel{k % 3}", "webPageType": "WEB_PAGE_TYPE_CHANNEL"}},
        "browseEndpoint": {"browseId": channel_id, "canonicalBaseUrl": f"/@channel{k % 3}"}}}]}
    minutes, seconds = divmod(60 + 7 * k, 60)
    return {"videoRenderer": {
        "videoId": video_id,
        "thumbnail": {"thumbnails": [{"url": f"https://i.ytimg.com/vi/{video_id}/hq720.jpg", "width": 720, "height": 404}]},
        "title": {"runs": [{"text": f"{query} #{k}"}],
                  "accessibility": {"accessibilityData": {"label": f"{query} #{k} by Channel {k % 3}"}}},
        "ownerText": byline,
        "shortBylineText": byline,
        "longBylineText": byline,
        "lengthText": {"accessibility": {"accessibilityData": {"label": f"{minutes} minutes, {seconds} seconds"}},
                       "simpleText": f"{minutes}:{seconds:02d}"},
        "viewCountText": {"simpleText": f"{1000 + k:,} views"},
        "publishedTimeText": {"simpleText": "2 years ago"},
        "navigationEndpoint": {
            "commandMetadata": {"webCommandMetadata": {"url": f"/watch?v={video_id}", "webPageType": "WEB_PAGE_TYPE_WATCH"}},
            "watchEndpoint": {"videoId": video_id}},
    }}


@dataclass
class FakeYouTube(Fake):
    """innertube's search endpoint (`POST /youtubei/v1/search`): 20 results a page, then continuation tokens."""

    page_size: int = 20
    bodies: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/youtubei/v1/search", self.search)
        return app

    async def search(self, request: web.Request) -> web.Response:
        failure = self.log(request)
        if failure:
            return failure
        body = await request.json()
        self.bodies.append(body)
        if "continuation" in body:
            text, _, start = body["continuation"].rpartition("|")
            offset = int(start)
        else:
            text, offset = body.get("query", ""), 0
        found = self.catalog.get(text, [])
        section: list[dict[str, Any]] = [{"itemSectionRenderer": {"contents": found[offset : offset + self.page_size]}}]
        if offset + self.page_size < len(found):
            section.append({"continuationItemRenderer": {
                "trigger": "CONTINUATION_TRIGGER_ON_ITEM_SHOWN",
                "continuationEndpoint": {
                    "clickTrackingParams": "CBkQui8iEwj",
                    "commandMetadata": {"webCommandMetadata": {"sendPost": True, "apiUrl": "/youtubei/v1/search"}},
                    "continuationCommand": {"token": f"{text}|{offset + self.page_size}",
                                            "request": "CONTINUATION_REQUEST_TYPE_SEARCH"}}}})
        context = {"responseContext": {"visitorData": "CgtWaXNpdG9yRGF0YQ%3D%3D"}, "estimatedResults": str(len(found))}
        if offset == 0:
            return web.json_response({**context, "contents": {"twoColumnSearchResultsRenderer": {
                "primaryContents": {"sectionListRenderer": {"contents": section}}}}})
        return web.json_response({**context, "onResponseReceivedCommands": [{
            "clickTrackingParams": "CAAQ", "appendContinuationItemsAction": {
                "continuationItems": section, "targetId": "search-feeds"}}]})


@dataclass
class Internal(Fake):
    """A host the crawl must never reach (cloud metadata, a dashboard): logs every request, whatever its
    method, path and body (kept in `bodies`), and answers each with an empty JSON object."""

    bodies: list[bytes] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.anything)
        return app

    async def anything(self, request: web.Request) -> web.Response:
        self.log(request)
        self.bodies.append(await request.read())
        return web.json_response({})


@pytest.fixture(scope="session")
def loopback_tls(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    """A server context with a self-signed certificate for 127.0.0.1, for fakes of https-only services."""
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    """Start fakes on free ports for one test: `base_url = serve(fake)` (`tls=context`: https; `host`: another
    loopback address than 127.0.0.1, e.g. 127.0.0.2 for a host off the allow-list)."""
    servers: list[ServerThread] = []

    def start(fake: Fake, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> str:
        server = ServerThread(fake.app(), host=host, ssl_context=tls)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
