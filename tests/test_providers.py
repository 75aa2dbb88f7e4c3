"""Providers against loopback servers that answer in each service's real format."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from provider_servers import (
    FLICKR_LICENSES,
    MAXLAG_ERROR,
    FakeFlickr,
    FakeOpenverse,
    FakeWikimedia,
    FakeYouTube,
    flickr_photo,
    loopback_tls,  # noqa: F401  (fixture)
    openverse_item,
    serve,  # noqa: F401  (fixture)
    wikimedia_page,
    youtube_video,
)

from crawler.candidate import license_from_url
from crawler.http import RateLimiter, backoff_seconds, guarded_session, retry_after_seconds
from crawler.netguard import AllowList
from crawler.providers import ProviderError, get_provider
from crawler.providers.base import SearchPage
from crawler.queries import Query

QUERY = Query(label="happiness", text="happy face", lang="en")
FAST = {"requests_per_second": 1000.0}


def search_all(provider, query: Query = QUERY, limit: int = 10**6) -> list[SearchPage]:
    """Every page of `query`, following cursors as discovery does."""

    async def run() -> list[SearchPage]:
        pages: list[SearchPage] = []
        cursor = None
        async with guarded_session(AllowList.parse(["127.0.0.1"])) as session:  # the fakes' address
            while True:
                got = sum(len(p.candidates) for p in pages)
                pages.append(await provider.search(session, query, limit - got, cursor))
                cursor = pages[-1].next_cursor
                if cursor is None or got + len(pages[-1].candidates) >= limit:
                    return pages

    return asyncio.run(run())


def flat(pages: list[SearchPage]):
    return [c for p in pages for c in p.candidates]


def make_fake(kind: str, n: int):
    if kind == "openverse":
        return FakeOpenverse({QUERY.text: [openverse_item(QUERY.text, k) for k in range(n)]})
    if kind == "wikimedia":
        return FakeWikimedia({QUERY.text: [wikimedia_page(QUERY.text, k) for k in range(n)]})
    return FakeFlickr({QUERY.text: [flickr_photo(QUERY.text, k) for k in range(n)]})


@pytest.fixture(autouse=True)
def no_credentials(monkeypatch):
    for name in ("OPENVERSE_CLIENT_ID", "OPENVERSE_CLIENT_SECRET", "FLICKR_API_KEY"):
        monkeypatch.delenv(name, raising=False)


# --- Openverse -------------------------------------------------------------------------------


def test_openverse_pages_in_order_with_licence_fields_and_user_agent(serve):
    fake = make_fake("openverse", 55)
    provider = get_provider("openverse", api_base=serve(fake), **FAST)
    pages = search_all(provider)
    items = fake.catalog[QUERY.text]
    assert [c.provider_id for c in flat(pages)] == [item["id"] for item in items]
    assert [p.next_cursor for p in pages] == ["2", "3", None]
    assert [r.query["page_size"] for r in fake.requests] == ["20"] * 3
    assert all("scn-scale" in r.headers["User-Agent"] and "+http" in r.headers["User-Agent"] for r in fake.requests)
    first, item = flat(pages)[0], items[0]
    assert (first.url, first.page_url, first.license, first.license_version) == (
        item["url"], item["foreign_landing_url"], item["license"], item["license_version"])
    assert (first.width, first.height, first.filesize, first.creator) == (
        item["width"], item["height"], item["filesize"], item["creator"])
    assert (first.label, first.query, first.lang, first.provider) == ("happiness", "happy face", "en", "openverse")
    assert first.extras["tags"] == [t["name"] for t in item["tags"]]


def test_openverse_stops_at_its_240_result_depth(serve):
    fake = make_fake("openverse", 300)
    pages = search_all(get_provider("openverse", api_base=serve(fake), **FAST))
    assert len(flat(pages)) == fake.depth
    assert len(fake.requests) == fake.depth // 20  # never asks for the page that would answer 400


def test_openverse_refuses_anonymous_pages_over_20_before_any_request():
    with pytest.raises(ValueError, match="OPENVERSE_CLIENT_ID"):
        get_provider("openverse", page_size=50)


def test_openverse_oauth_token_buys_larger_pages(serve, monkeypatch):
    fake = make_fake("openverse", 120)
    monkeypatch.setenv("OPENVERSE_CLIENT_ID", fake.client_id)
    monkeypatch.setenv("OPENVERSE_CLIENT_SECRET", fake.client_secret)
    provider = get_provider("openverse", api_base=serve(fake), page_size=50, **FAST)
    pages = search_all(provider, limit=100)
    assert [c.provider_id for c in flat(pages)] == [i["id"] for i in fake.catalog[QUERY.text][:100]]
    assert [r.path for r in fake.requests] == ["/v1/auth_tokens/token/"] + ["/v1/images/"] * 2
    assert all(r.headers["Authorization"] == f"Bearer {fake.token}" for r in fake.requests[1:])


# --- Retries, shared by every HTTP provider ------------------------------------------------------


@pytest.fixture(params=["openverse", "wikimedia", "flickr"])
def http_kind(request, monkeypatch):
    monkeypatch.setenv("FLICKR_API_KEY", FakeFlickr({}).api_key)
    return request.param


def test_429_waits_for_retry_after(serve, http_kind):
    fake = make_fake(http_kind, 5)
    fake.fail_next = [(429, {"Retry-After": "2"}, {"detail": "Request was throttled."})]
    scale = 0.05
    provider = get_provider(http_kind, api_base=serve(fake), sleep_scale=scale, backoff_s=0.0, **FAST)
    assert len(flat(search_all(provider))) == 5
    answered = 3 if http_kind == "flickr" else 2  # Flickr first asks for its licence table
    assert len(fake.requests) == answered
    assert fake.requests[1].at - fake.requests[0].at >= 2 * scale


def test_5xx_is_retried_then_fails_naming_url_and_status(serve, http_kind):
    fake = make_fake(http_kind, 5)
    fake.fail_next = [(503, {}, {"detail": "unavailable"})] * 3
    provider = get_provider(http_kind, api_base=serve(fake), max_retries=2, backoff_s=0.001, **FAST)
    with pytest.raises(ProviderError) as info:
        search_all(provider)
    assert info.value.status == 503
    assert info.value.url.startswith(provider.api_base) and "gave up after 3 attempts" in str(info.value)
    assert len(fake.requests) == 3


def test_other_4xx_is_not_retried(serve, http_kind):
    fake = make_fake(http_kind, 5)
    fake.fail_next = [(403, {}, {"detail": "Forbidden"})]
    provider = get_provider(http_kind, api_base=serve(fake), backoff_s=0.001, **FAST)
    with pytest.raises(ProviderError, match="HTTP 403") as info:
        search_all(provider)
    assert info.value.url.startswith(provider.api_base)
    assert len(fake.requests) == 1


def test_a_retry_after_beyond_max_backoff_fails_at_once(serve):
    fake = make_fake("openverse", 5)
    fake.fail_next = [(429, {"Retry-After": "3600"}, {"detail": "Request was throttled."})]
    provider = get_provider("openverse", api_base=serve(fake), max_backoff_s=60, **FAST)
    with pytest.raises(ProviderError, match="asked to wait 3600 s"):
        search_all(provider)
    assert len(fake.requests) == 1


# --- Wikimedia Commons ---------------------------------------------------------------------------


def test_wikimedia_follows_continue_and_reads_extmetadata(serve):
    fake = make_fake("wikimedia", 120)
    pages = search_all(get_provider("wikimedia", api_base=serve(fake), **FAST))
    found, source = flat(pages), fake.catalog[QUERY.text]
    assert [c.provider_id for c in found] == [str(p["pageid"]) for p in source]
    assert [r.query.get("gsroffset") for r in fake.requests] == [None, "50", "100"]
    first = fake.requests[0].query
    assert (first["maxlag"], first["gsrnamespace"], first["gsrsearch"]) == ("5", "6", "happy face filetype:bitmap")
    assert "extmetadata" in first["iiprop"].split("|")
    c, info = found[0], source[0]["imageinfo"][0]
    assert (c.url, c.page_url, c.width, c.filesize) == (info["thumburl"], info["descriptionurl"], info["thumbwidth"], None)
    assert (c.license, c.license_version) == license_from_url(info["extmetadata"]["LicenseUrl"]["value"])
    assert c.creator == "Ann & 0"  # HTML link unwrapped, entity decoded
    assert c.extras["original_url"] == info["url"] and c.extras["restrictions"] == []


def test_wikimedia_maxlag_answer_is_retried_after_retry_after(serve):
    fake = make_fake("wikimedia", 3)
    fake.fail_next = [(200, {"Retry-After": "1"}, MAXLAG_ERROR)]
    scale = 0.05
    provider = get_provider("wikimedia", api_base=serve(fake), sleep_scale=scale, backoff_s=0.0, **FAST)
    assert len(flat(search_all(provider))) == 3
    assert len(fake.requests) == 2 and fake.requests[1].at - fake.requests[0].at >= scale


def test_wikimedia_personality_restrictions_recorded_or_skipped(serve):
    source = [wikimedia_page(QUERY.text, k, restrictions="personality" if k % 2 else "") for k in range(6)]
    base = serve(FakeWikimedia({QUERY.text: source}))
    kept = flat(search_all(get_provider("wikimedia", api_base=base, **FAST)))
    assert [c.extras["restrictions"] for c in kept] == [["personality"] if k % 2 else [] for k in range(6)]
    strict = flat(search_all(get_provider("wikimedia", api_base=base, skip_personality=True, **FAST)))
    assert [c.provider_id for c in strict] == [str(p["pageid"]) for k, p in enumerate(source) if not k % 2]


def test_wikimedia_result_cap(serve):
    fake = make_fake("wikimedia", 200)
    pages = search_all(get_provider("wikimedia", api_base=serve(fake), max_results=100, **FAST))
    assert len(flat(pages)) == 100 and pages[-1].next_cursor is None and len(fake.requests) == 2


def test_wikimedia_api_error_names_code(serve):
    fake = make_fake("wikimedia", 3)
    fake.fail_next = [(200, {}, {"error": {"code": "badvalue", "info": "Unrecognized value"}})]
    with pytest.raises(ProviderError, match="badvalue"):
        search_all(get_provider("wikimedia", api_base=serve(fake), **FAST))


# --- Flickr --------------------------------------------------------------------------------------


def test_flickr_pages_maps_licences_and_stops_at_4000(serve, monkeypatch):
    fake = make_fake("flickr", 4500)
    monkeypatch.setenv("FLICKR_API_KEY", fake.api_key)
    pages = search_all(get_provider("flickr", api_base=serve(fake), page_size=500, **FAST))
    found = flat(pages)
    assert [c.provider_id for c in found] == [p["id"] for p in fake.catalog[QUERY.text][: fake.cap]]
    methods = [r.query["method"] for r in fake.requests]
    assert methods == ["flickr.photos.licenses.getInfo"] + ["flickr.photos.search"] * (fake.cap // 500)
    table = {str(item["id"]): item for item in FLICKR_LICENSES}
    for c in found[: len(FLICKR_LICENSES)]:
        item = table[c.extras["flickr_license_id"]]
        code, version = license_from_url(item["url"])
        assert (c.license, c.license_version, c.extras["license_name"]) == (
            code or item["name"].lower().replace(" ", "-"), version, item["name"])
    assert found[0].page_url == f"https://www.flickr.com/photos/{fake.catalog[QUERY.text][0]['owner']}/{found[0].provider_id}"


def test_flickr_skips_photos_without_url_l(serve, monkeypatch):
    source = [flickr_photo(QUERY.text, k, with_url=k % 3 != 0) for k in range(9)]
    fake = FakeFlickr({QUERY.text: source})
    monkeypatch.setenv("FLICKR_API_KEY", fake.api_key)
    found = flat(search_all(get_provider("flickr", api_base=serve(fake), **FAST)))
    assert [c.provider_id for c in found] == [p["id"] for p in source if "url_l" in p]


def test_flickr_service_unavailable_is_retried(serve, monkeypatch):
    fake = make_fake("flickr", 4)
    monkeypatch.setenv("FLICKR_API_KEY", fake.api_key)
    fake.fail_next = [(200, {}, {"stat": "fail", "code": 105, "message": "Service currently unavailable"})]
    found = flat(search_all(get_provider("flickr", api_base=serve(fake), backoff_s=0.001, **FAST)))
    assert len(found) == 4


def test_flickr_missing_key_names_the_variable():
    with pytest.raises(ValueError, match="FLICKR_API_KEY"):
        get_provider("flickr")


def test_flickr_key_never_appears_in_errors_or_logs(serve, monkeypatch, caplog):
    fake = make_fake("flickr", 4)
    wrong_key = "wrong-but-secret-key-987"
    monkeypatch.setenv("FLICKR_API_KEY", wrong_key)
    fake.fail_next = [(429, {"Retry-After": "0"}, {"stat": "fail", "code": 429, "message": "slow down"})]
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ProviderError, match="Invalid API Key") as info:
        search_all(get_provider("flickr", api_base=serve(fake), **FAST))
    assert "api_key=***&" in info.value.url
    assert wrong_key not in str(info.value) and wrong_key not in caplog.text
    assert "retry 1" in caplog.text  # the 429 was logged, with the key blanked


# --- URL lists -----------------------------------------------------------------------------------

ROWS = [
    {"url": "https://a.example/1.jpg", "label": "happiness", "query": "smile", "source": "x"},
    {"url": "https://a.example/2.jpg", "label": "sadness", "query": "tears", "source": "y"},
    {"url": "https://a.example/3.jpg", "label": "happiness", "query": "smile", "source": "z"},
    {"url": "https://a.example/4.jpg", "label": "anger", "query": "", "source": ""},
]


def write_list(path, rows):
    if path.suffix in (".csv", ".tsv"):
        sep = "," if path.suffix == ".csv" else "\t"
        lines = [sep.join(rows[0])] + [sep.join(str(v) for v in r.values()) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_urllist_formats_give_their_rows_grouped_by_query(tmp_path, suffix):
    path = tmp_path / f"urls{suffix}"
    write_list(path, ROWS)
    provider = get_provider("urllist", input=str(path), page_size=1)
    expected = {}
    for r in ROWS:
        expected.setdefault((r["label"], r["query"] or r["label"]), []).append(r["url"])
    assert [(q.label, q.text) for q in provider.queries()] == list(expected)
    for q in provider.queries():
        found = flat(search_all(provider, q))
        assert [c.url for c in found] == expected[(q.label, q.text)]
        assert all(c.label == q.label and c.query == q.text and c.lang == "und" for c in found)
    first = flat(search_all(provider, provider.queries()[0]))[0]
    assert first.extras == {"source": ROWS[0]["source"]} and first.provider_id is None


def test_urllist_bad_label_names_file_and_row(tmp_path):
    path = tmp_path / "urls.csv"
    write_list(path, ROWS[:2] + [{"url": "https://a.example/9.jpg", "label": "joy", "query": "q", "source": ""}])
    with pytest.raises(ValueError, match=r"urls\.csv: row 3: unknown label 'joy'"):
        get_provider("urllist", input=str(path))


def test_urllist_missing_columns_and_unknown_format(tmp_path):
    path = tmp_path / "urls.csv"
    path.write_text("link,label\nhttps://a.example/1.jpg,happiness\n")
    with pytest.raises(ValueError, match="urls.csv.*url and label"):
        get_provider("urllist", input=str(path))
    with pytest.raises(ValueError, match="unknown URL list format"):
        get_provider("urllist", input=str(tmp_path / "urls.xlsx"))


# --- YouTube -------------------------------------------------------------------------------------


def test_youtube_refuses_without_opt_in():
    with pytest.raises(ValueError, match="allow_youtube"):
        get_provider("youtube")


def test_youtube_without_yt_dlp_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "yt_dlp", None)  # import fails even where yt-dlp is installed
    with pytest.raises(RuntimeError, match=r"pip install 'scn-scale\[video\]'"):
        get_provider("youtube", allow_youtube=True)


def youtube(serve, loopback_tls, n: int, **settings) -> tuple[FakeYouTube, object]:
    pytest.importorskip("yt_dlp")
    fake = FakeYouTube({QUERY.text: [youtube_video(QUERY.text, k) for k in range(n)]})
    base = serve(fake, tls=loopback_tls)
    return fake, get_provider("youtube", allow_youtube=True, api_base=base, verify_tls=False, **FAST, **settings)


def test_youtube_pages_through_continuations_to_the_limit(serve, loopback_tls):
    fake, provider = youtube(serve, loopback_tls, 55)
    (page,) = search_all(provider, limit=45)
    renderers = [item["videoRenderer"] for item in fake.catalog[QUERY.text][:45]]
    assert [c.provider_id for c in page.candidates] == [r["videoId"] for r in renderers]
    assert [r.path for r in fake.requests] == ["/youtubei/v1/search"] * 3  # 20 + 20 + 5 of the third page
    assert fake.bodies[0]["query"] == QUERY.text and "continuation" not in fake.bodies[0]
    assert [b["continuation"] for b in fake.bodies[1:]] == [f"{QUERY.text}|20", f"{QUERY.text}|40"]
    assert fake.bodies[0]["context"]["client"]["clientName"] == "WEB"  # yt-dlp's own client, not ours
    first, video = page.candidates[0], renderers[0]
    assert (first.url, first.page_url) == (f"{provider.api_base}/watch?v={video['videoId']}",) * 2
    assert (first.media_type, first.title, first.creator) == ("video_page", f"{QUERY.text} #0", "Channel 0")
    assert first.extras == {"video_id": video["videoId"], "duration": 60,
                            "channel_id": video["ownerText"]["runs"][0]["navigationEndpoint"]["browseEndpoint"]["browseId"]}
    assert (first.label, first.query, first.lang, first.provider) == ("happiness", "happy face", "en", "youtube")


def test_youtube_caps_results_per_query(serve, loopback_tls):
    fake, provider = youtube(serve, loopback_tls, 55, max_results=25)
    (page,) = search_all(provider)
    assert len(page.candidates) == 25 and len(fake.requests) == 2


def test_youtube_retries_429_after_the_wait_asked_and_gives_up_in_the_end(serve, loopback_tls):
    quota = {"error": {"code": 429, "message": "Resource has been exhausted.", "status": "RESOURCE_EXHAUSTED"}}
    fake, provider = youtube(serve, loopback_tls, 30, max_retries=2, sleep_scale=0.001)
    fake.fail_next = [(429, {"Retry-After": "30"}, quota)]
    (page,) = search_all(provider)
    assert len(page.candidates) == 30 and len(fake.requests) == 3  # the 429, then both pages

    fake.requests.clear()
    fake.fail_next = [(429, {}, quota)] * 3
    with pytest.raises(ProviderError, match=r"youtube: .* answered HTTP 429: gave up after 3 attempts") as err:
        search_all(provider)
    assert err.value.status == 429 and len(fake.requests) == 3


def test_youtube_does_not_retry_a_bad_request(serve, loopback_tls):
    fake, provider = youtube(serve, loopback_tls, 5)
    fake.fail_next = [(400, {}, {"error": {"code": 400, "message": "Request contains an invalid argument."}})]
    with pytest.raises(ProviderError, match="HTTP 400") as err:
        search_all(provider)
    assert err.value.status == 400 and len(fake.requests) == 1


def test_youtube_refuses_unverified_tls_off_loopback():
    pytest.importorskip("yt_dlp")
    with pytest.raises(ValueError, match="loopback"):
        get_provider("youtube", allow_youtube=True, api_base="https://search.example.org", verify_tls=False)
    with pytest.raises(ValueError, match="https"):
        get_provider("youtube", allow_youtube=True, api_base="http://127.0.0.1:1")


# --- Registry and HTTP helpers -------------------------------------------------------------------


def test_registry_names_unknown_providers_and_settings():
    with pytest.raises(ValueError, match="unknown provider 'bing'"):
        get_provider("bing")
    with pytest.raises(ValueError, match=r"unknown settings \['colour'\]"):
        get_provider("openverse", colour="red")
    with pytest.raises(ValueError, match="needs api_base"):
        get_provider("localweb")
    assert get_provider("openverse", api_base=None).api_base == "https://api.openverse.org"


def test_retry_after_forms_and_backoff_bounds():
    now = datetime(2025, 1, 1, tzinfo=timezone.utc)
    http_date = (now + timedelta(seconds=30)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert retry_after_seconds(http_date, now=now) == 30
    assert retry_after_seconds("7", now=now) == 7
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None
    assert all(0.5 * min(8, 2**a) <= backoff_seconds(a, 1.0, 8) <= min(8, 2**a) for a in range(6))


def test_rate_limiter_spaces_requests():
    async def run() -> float:
        limiter = RateLimiter(per_second=50)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.gather(*(limiter.wait() for _ in range(6)))
        return loop.time() - start

    assert asyncio.run(run()) >= 5 / 50 * 0.9
