"""A URL list (the img2dataset use case): csv, tsv, jsonl or parquet with columns url, label[, query][, lang][, media_type].

No network: the file is the search result. It is read and validated when the provider
is built, so a bad row stops the run before any work, with the file and row named.
Each distinct (label, query, lang) in the file is one query (`queries()`), whose
results are its rows; a row without a query is found by its label's name, in the
undetermined language "und". `media_type` is "image" (the default), "video" (a media
file whose frames are sampled) or "video_page" (a page yt-dlp resolves, e.g. a YouTube
watch URL). Any other column is kept in the candidate's extras.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pyarrow as pa
import pyarrow.parquet as pq

from crawler.candidate import MEDIA_TYPES, Candidate
from crawler.providers.base import RatePolicy, SearchPage
from crawler.queries import Query
from shards.classes import CANONICAL

UNDETERMINED_LANG = "und"
_COLUMNS = ("url", "label", "query", "lang", "media_type")
_DELIMITERS = {".csv": ",", ".tsv": "\t"}


class UrlListProvider:
    name = "urllist"
    default_rate = RatePolicy(requests_per_second=1e9, concurrency=1, max_results=10**12, page_size=10_000)

    def __init__(self, *, input: str | Path, rate: RatePolicy | None = None) -> None:
        self.path = Path(input)
        self.rate = rate or self.default_rate
        self._rows: dict[Query, list[Candidate]] = {}
        try:
            for n, row in enumerate(_read_rows(self.path), start=1):
                candidate = self._candidate(n, row)
                query = Query(label=candidate.label, text=candidate.query, lang=candidate.lang)
                self._rows.setdefault(query, []).append(candidate)
        except (UnicodeDecodeError, csv.Error, pa.ArrowException) as exc:  # messages that do not name the file
            raise ValueError(f"{self.path}: not a readable URL list ({exc})") from exc
        if not self._rows:
            raise ValueError(f"{self.path}: the URL list has no rows")

    def queries(self) -> list[Query]:
        """The file's own queries, in order of first appearance."""
        return list(self._rows)

    async def search(
        self, session: aiohttp.ClientSession, query: Query, limit: int, cursor: str | None
    ) -> SearchPage:
        rows = self._rows.get(query, [])
        start = int(cursor or 0)
        end = start + min(limit, self.rate.page_size)
        return SearchPage(rows[start:end], str(end) if end < len(rows) else None)

    def _candidate(self, n: int, row: dict[str, Any]) -> Candidate:
        url, label = row.get("url"), row.get("label")
        if not isinstance(url, str) or not url.strip():
            raise ValueError(f"{self.path}: row {n}: missing url")
        if label not in CANONICAL:
            raise ValueError(f"{self.path}: row {n}: unknown label {label!r}; known: {list(CANONICAL)}")
        media_type = row.get("media_type") or "image"
        if media_type not in MEDIA_TYPES:
            raise ValueError(f"{self.path}: row {n}: media_type {media_type!r} is not one of {MEDIA_TYPES}")
        return Candidate(
            url=url.strip(),
            provider=self.name,
            label=label,
            query=row.get("query") or label,
            lang=row.get("lang") or UNDETERMINED_LANG,
            media_type=media_type,
            extras={k: v for k, v in row.items() if k not in _COLUMNS and v not in (None, "")},
        )


def _read_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a URL list as dicts, by file suffix."""
    suffix = path.suffix.lower()
    if suffix in _DELIMITERS:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=_DELIMITERS[suffix])
            if not reader.fieldnames or "url" not in reader.fieldnames or "label" not in reader.fieldnames:
                raise ValueError(f"{path}: header must name the columns url and label, got {reader.fieldnames}")
            yield from reader
    elif suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise ValueError(f"{path}: line {n}: not JSON ({exc})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}: line {n}: expected a JSON object")
                yield row
    elif suffix == ".parquet":
        table = pq.read_table(path)
        if "url" not in table.column_names or "label" not in table.column_names:
            raise ValueError(f"{path}: needs the columns url and label, has {table.column_names}")
        yield from table.to_pylist()
    else:
        raise ValueError(f"{path}: unknown URL list format {suffix!r}; use .csv, .tsv, .jsonl or .parquet")
