"""Discovery: queries through a provider into one merged candidates file, with conflicts and resume."""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from provider_servers import FakeOpenverse, openverse_item, serve  # noqa: F401  (serve is a fixture)

from crawler.candidate import CANDIDATE_SCHEMA, Candidate, merge_candidates, read_candidates
from crawler.discover import DiscoverConfig, DiscoveryError, discover
from crawler.queries import Query
from shards.classes import CANONICAL

QUERIES = [
    Query("happiness", "happy face", "en"),
    Query("happiness", "cara feliz", "es"),
    Query("sadness", "sad face", "en"),
]
# Overlapping result ranges: the two happiness queries share images (no conflict), and
# "cara feliz" shares images with "sad face" (conflicts).
RANGES = {"happy face": range(0, 30), "cara feliz": range(20, 40), "sad face": range(35, 50)}


@pytest.fixture
def fake() -> FakeOpenverse:
    return FakeOpenverse({text: [openverse_item("pool", k) for k in ks] for text, ks in RANGES.items()})


def config(base: str, **kw) -> DiscoverConfig:
    settings = {"requests_per_second": 1000.0, "backoff_s": 0.001, **kw.pop("settings", {})}
    return DiscoverConfig(provider="openverse", api_base=base, progress=False, settings=settings, **kw)


def test_duplicates_merged_with_every_label_and_conflicts_flagged(serve, fake, tmp_path):
    out = tmp_path / "candidates.parquet"
    summary = discover(QUERIES, config(serve(fake)), out)
    rows = read_candidates(out)

    found: dict[str, list[Query]] = {}
    for q in QUERIES:
        for item in fake.catalog[q.text]:
            found.setdefault(item["id"], []).append(q)
    assert [r.provider_id for r in rows] == list(found)
    for row in rows:
        hits = found[row.provider_id]
        assert list(zip(row.labels, row.queries, row.langs)) == [(q.label, q.text, q.lang) for q in hits]
        assert row.conflict == (len({q.label for q in hits}) > 1)
        assert re.fullmatch(r"[A-Za-z0-9_-]+", row.candidate_id)
    conflicting = [r for r in rows if r.conflict]
    assert conflicting and summary.conflicts == len(conflicting)
    assert summary.candidates == len(found) and summary.hits == sum(len(v) for v in found.values())
    assert summary.per_class == {
        c: sum(any(q.label == c for q in hits) for hits in found.values()) for c in CANONICAL if c in ("happiness", "sadness")
    }
    assert summary.per_provider == {"openverse": len(found)}
    assert pq.read_schema(out).names == CANDIDATE_SCHEMA.names


def test_per_query_cap_and_order_independent_of_concurrency(serve, fake, tmp_path):
    base = serve(fake)
    one = discover(QUERIES, config(base, per_query=25, concurrency=1), tmp_path / "one.parquet")
    many = discover(QUERIES, config(base, per_query=25, concurrency=3), tmp_path / "many.parquet")
    assert one.hits == sum(min(25, len(ks)) for ks in RANGES.values())
    assert read_candidates(tmp_path / "one.parquet") == read_candidates(tmp_path / "many.parquet")
    assert many.candidates == one.candidates


def test_resume_reuses_the_file_and_force_redoes_it(serve, fake, tmp_path):
    out = tmp_path / "candidates.parquet"
    cfg = config(serve(fake))
    first = discover(QUERIES, cfg, out)
    asked = len(fake.requests)
    again = discover(QUERIES, cfg, out)
    assert len(fake.requests) == asked and again.resumed
    assert (again.candidates, again.per_class, again.conflicts) == (first.candidates, first.per_class, first.conflicts)
    discover(QUERIES, cfg, out, force=True)
    assert len(fake.requests) == 2 * asked


def test_a_failing_query_is_recorded_and_the_others_go_on(serve, fake, tmp_path):
    fake.broken_queries = {"sad face"}
    summary = discover(QUERIES, config(serve(fake), settings={"max_retries": 1}), tmp_path / "c.parquet")
    assert len(summary.errors) == 1 and "'sad face'" in summary.errors[0] and "HTTP 500" in summary.errors[0]
    assert {label for r in read_candidates(tmp_path / "c.parquet") for label in r.labels} == {"happiness"}


def test_every_query_failing_raises_and_writes_nothing(serve, fake, tmp_path):
    fake.broken_queries = set(RANGES)
    out = tmp_path / "c.parquet"
    with pytest.raises(DiscoveryError, match="every one of 3 queries failed"):
        discover(QUERIES, config(serve(fake), settings={"max_retries": 0}), out)
    assert not out.exists()


def test_url_list_runs_its_own_queries_and_merges_spellings_of_a_url(tmp_path):
    path = tmp_path / "urls.csv"
    path.write_text(
        "url,label,query\n"
        "https://img.example/a.jpg,happiness,smile\n"
        "HTTPS://IMG.example:443/a.jpg#top,sadness,tears\n"
        "https://img.example/b.jpg,sadness,tears\n"
    )
    cfg = DiscoverConfig(provider="urllist", settings={"input": str(path)}, progress=False)
    summary = discover(None, cfg, tmp_path / "c.parquet")
    rows = read_candidates(tmp_path / "c.parquet")
    assert [(r.url, r.labels, r.queries, r.conflict) for r in rows] == [
        ("https://img.example/a.jpg", ["happiness", "sadness"], ["smile", "tears"], True),
        ("https://img.example/b.jpg", ["sadness"], ["tears"], False),
    ]
    assert summary.queries == 2 and summary.per_class == {"happiness": 1, "sadness": 2}


def test_candidate_ids_are_stable_and_follow_the_dedupe_key():
    def hit(**kw) -> Candidate:
        return Candidate(**{"url": "https://x.example/1.jpg", "provider": "p", "label": "fear", "query": "q", "lang": "en", **kw})

    a = merge_candidates([hit(provider_id="7"), hit(provider_id="7", url="https://mirror.example/1.jpg")])
    b = merge_candidates([hit(provider_id="7")])
    c = merge_candidates([hit(provider_id="8")])
    assert len(a) == 1 and a[0].candidate_id == b[0].candidate_id != c[0].candidate_id
    assert "." not in a[0].candidate_id


def test_reading_a_file_that_is_not_a_candidates_file_names_it(tmp_path):
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"url": ["u"]}), path)
    with pytest.raises(ValueError, match="other.parquet: not a candidates file"):
        read_candidates(path)
