"""Discovery: every query through one provider, merged into the candidates parquet that fetching reads.

Queries run concurrently up to the smaller of the configured concurrency and the
provider's own; each query pages until its cap (`per_query`, bounded by the
provider's `max_results`) or the provider's last page. Hits are merged in query
order whatever order the requests finished in, so the same queries give the same
file. A query that fails is recorded and the others go on; if every query fails,
the run is misconfigured and raises. A provider that has not answered at all within its
first-contact time (`ProviderUnreachable`: no such host, connection refused, only 5xx)
stops every query at once and raises. The candidates file is written atomically and,
once there, is reused: discovery is not repeated unless forced.

Search APIs are asked through a `crawler.http.guarded_session`: the address guard checks
every connection, as the fetcher's, with the crawl's allow-list plus exactly the host and
port of the provider's `api_base` (chosen by whoever runs the crawl); a redirect
elsewhere is checked like any other address. An answer is read up to `max_bytes`
(decompressed). A provider answer of a shape the provider cannot read ends its query with
one error line, like any other failed query.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from crawler.candidate import Candidate, MergedCandidate, read_candidates, write_candidates
from crawler.http import guarded_session
from crawler.netguard import AllowList, origin_entry
from crawler.providers import OwnsQueries, Provider, ProviderError, ProviderUnreachable, get_provider, settings_of
from crawler.providers.base import DEFAULT_MAX_BYTES
from crawler.queries import Query, load_queries
from shards.classes import CANONICAL
from shards.fs import exists

if TYPE_CHECKING:
    import aiohttp

logger = logging.getLogger(__name__)


class DiscoveryError(RuntimeError):
    """Discovery could not run at all (every query failed)."""


@dataclass
class DiscoverConfig:
    """Which provider to ask and how much: `settings` are passed to `get_provider` (see crawler.providers).

    `allow_hosts`: the crawl's allow-list (`fetch.allow_hosts`); `max_bytes`: the largest API
    answer read, decompressed, for providers that ask an API.
    """

    provider: str
    api_base: str | None = None
    per_query: int = 200
    concurrency: int = 4
    settings: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    allow_hosts: tuple[str, ...] = ()
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        if self.per_query < 1 or self.concurrency < 1 or self.max_bytes < 1:
            raise ValueError(f"per_query, concurrency and max_bytes must be positive, got {self.per_query}, "
                             f"{self.concurrency}, {self.max_bytes}")
        AllowList.parse(self.allow_hosts)  # raises on a malformed entry

    def build_provider(self) -> Provider:
        settings = dict(self.settings)
        if "max_bytes" in settings_of(self.provider):
            settings.setdefault("max_bytes", self.max_bytes)
        return get_provider(self.provider, api_base=self.api_base, **settings)

    def allow_list(self, provider: Provider) -> AllowList:
        """The crawl's allow-list and the provider's API host and port."""
        base = getattr(provider, "api_base", None)
        return AllowList.parse([*self.allow_hosts, *([origin_entry(base)] if base else [])])


@dataclass
class DiscoverSummary:
    """What a discovery produced; `per_class` counts an image once under each of its labels."""

    path: str
    candidates: int
    per_class: dict[str, int]
    per_provider: dict[str, int]
    conflicts: int
    queries: int = 0
    hits: int = 0
    errors: list[str] = field(default_factory=list)
    resumed: bool = False


async def discover_async(
    queries: list[Query], cfg: DiscoverConfig, provider: Provider | None = None
) -> tuple[list[Candidate], list[str]]:
    """Every hit of every query, in query order, and one message per query that failed."""
    provider = provider or cfg.build_provider()
    cap = min(cfg.per_query, provider.rate.max_results)
    results: list[list[Candidate]] = [[] for _ in queries]
    errors: dict[int, str] = {}
    pending = iter(range(len(queries)))
    workers = max(1, min(cfg.concurrency, provider.rate.concurrency, len(queries)))
    with tqdm(total=len(queries), desc=f"discover {provider.name}", unit="query", disable=not cfg.progress) as bar:
        async with guarded_session(cfg.allow_list(provider), concurrency=workers) as session:

            async def work() -> None:
                for i in pending:
                    try:
                        await _run_query(session, provider, queries[i], cap, results[i])
                    except ProviderUnreachable:
                        raise  # no query can run: the task group stops the others
                    except ProviderError as exc:
                        errors[i] = f"{queries[i].text!r} ({queries[i].lang}): {exc}"
                    except (KeyError, TypeError, AttributeError, ValueError) as exc:  # a field missing or of another type
                        errors[i] = (f"{queries[i].text!r} ({queries[i].lang}): {provider.name}: an answer of a shape "
                                     f"the provider cannot read ({type(exc).__name__}: {str(exc)[:80]})")
                    if i in errors:
                        logger.warning("query failed after %d results: %s", len(results[i]), errors[i])
                    bar.update(1)

            try:
                async with asyncio.TaskGroup() as group:
                    for _ in range(workers):
                        group.create_task(work())
            except* Exception as failed:  # the first failure, as asyncio.gather would raise it
                raise failed.exceptions[0] from None
    return [hit for hits in results for hit in hits], [errors[i] for i in sorted(errors)]


async def _run_query(
    session: "aiohttp.ClientSession", provider: Provider, query: Query, cap: int, found: list[Candidate]
) -> None:
    """Page through one query into `found` (filled in place, so a failure keeps the pages already read)."""
    cursor: str | None = None
    while len(found) < cap:
        page = await provider.search(session, query, cap - len(found), cursor)
        found.extend(page.candidates[: cap - len(found)])
        if page.next_cursor is None or page.next_cursor == cursor:
            return
        cursor = page.next_cursor


def discover(
    queries: list[Query] | None, cfg: DiscoverConfig, out_path: str | Path, force: bool = False
) -> DiscoverSummary:
    """Run discovery into `out_path`, or reuse the file already there unless `force`.

    `queries=None` runs the provider's own queries (a URL list's) or else the built-in taxonomy.
    """
    out = str(out_path)
    if exists(out) and not force:
        logger.info("reusing candidates %s (discovery not repeated)", out)
        return summarize(read_candidates(out), out, resumed=True)
    provider = cfg.build_provider()
    if queries is None:
        queries = provider.queries() if isinstance(provider, OwnsQueries) else load_queries(None)
    if not queries:
        raise ValueError("discovery needs at least one query")
    hits, errors = asyncio.run(discover_async(queries, cfg, provider))
    if len(errors) == len(queries):
        raise DiscoveryError(f"every one of {len(queries)} queries failed; first: {errors[0]}")
    merged = write_candidates(out, hits)
    summary = summarize(merged, out, queries=len(queries), hits=len(hits), errors=errors)
    logger.info(
        "discovered %d candidates (%d hits, %d conflicting, %d failed queries) into %s",
        summary.candidates, summary.hits, summary.conflicts, len(errors), out,
    )
    return summary


def summarize(rows: list[MergedCandidate], path: str | Path, **run: Any) -> DiscoverSummary:
    """Counts of a candidates list; `run` adds what only the run knows (queries, hits, errors, resumed)."""
    per_class: Counter[str] = Counter()
    for row in rows:
        per_class.update(set(row.labels))
    return DiscoverSummary(
        path=str(path),
        candidates=len(rows),
        per_class={c: per_class[c] for c in CANONICAL if c in per_class},
        per_provider=dict(Counter(row.provider for row in rows)),
        conflicts=sum(row.conflict for row in rows),
        **run,
    )
