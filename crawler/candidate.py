"""Candidates: what discovery found, one parquet row per unique image, before anything is fetched.

A provider returns one `Candidate` per search hit. The same image is often found by
several queries, sometimes for different classes; `merge_candidates` keeps it once with
every (label, query, language) that found it and flags it as conflicting when the
labels disagree, so the pipeline can decide what a contested image is worth.
`candidate_id` is derived from the provider's own id (else the normalized URL), so it
stays the same across re-discoveries and can seed stable sample keys.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa

from crawler.queries import Query
from shards.atomic import write_parquet
from shards.classes import CANONICAL
from shards.fs import read_parquet
from shards.sample import key_from_source

#: "video" is a media file; "video_page" is a page (a YouTube watch page) that `crawler.resolve` turns into one.
MEDIA_TYPES = ("image", "video", "video_page")

_DEFAULT_PORTS = {"http": 80, "https": 443}
_CC_URL = re.compile(r"creativecommons\.org/(?:licenses|publicdomain)/([a-z-]+)/(\d+(?:\.\d+)*)", re.I)
_PUBLIC_DOMAIN = {"zero": "cc0", "mark": "pdm"}


@dataclass(kw_only=True)
class Source:
    """Where an image lives and under which terms: the fields a hit and a merged row share."""

    url: str
    provider: str
    page_url: str | None = None
    provider_id: str | None = None
    media_type: str = "image"
    license: str | None = None
    license_version: str | None = None
    license_url: str | None = None
    creator: str | None = None
    attribution: str | None = None
    width: int | None = None
    height: int | None = None
    filesize: int | None = None
    title: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.url:
            raise ValueError(f"{self.provider} candidate {self.provider_id!r} has no url")
        if self.media_type not in MEDIA_TYPES:
            raise ValueError(f"{self.url}: media_type {self.media_type!r} is not one of {MEDIA_TYPES}")


@dataclass(kw_only=True)
class Candidate(Source):
    """One search hit: an image and the query (class, text, language) that found it."""

    label: str
    query: str
    lang: str

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.label not in CANONICAL:
            raise ValueError(f"{self.url}: label {self.label!r} is not a canonical class {list(CANONICAL)}")

    @classmethod
    def found_by(cls, query: Query, **source: Any) -> Candidate:
        """The hit of `query` on the image `source` describes."""
        return cls(label=query.label, query=query.text, lang=query.lang, **source)

    def dedupe_key(self) -> tuple[str, str]:
        """The provider's own id when it has one (URLs of one image vary), else the normalized URL."""
        if self.provider_id:
            return (self.provider, self.provider_id)
        return ("url", normalize_url(self.url))


@dataclass(kw_only=True)
class MergedCandidate(Source):
    """One unique image with every hit that found it: labels[i] came from queries[i] in langs[i]."""

    candidate_id: str
    labels: list[str]
    queries: list[str]
    langs: list[str]
    conflict: bool

    @property
    def label(self) -> str:
        """The label of the first query that found the image (the only one unless `conflict`)."""
        return self.labels[0]

    @property
    def query(self) -> str:
        return self.queries[0]

    @property
    def lang(self) -> str:
        return self.langs[0]


CANDIDATE_SCHEMA = pa.schema(
    [
        ("candidate_id", pa.string()),
        ("url", pa.string()),
        ("page_url", pa.string()),
        ("provider", pa.string()),
        ("provider_id", pa.string()),
        ("media_type", pa.string()),
        ("license", pa.string()),
        ("license_version", pa.string()),
        ("license_url", pa.string()),
        ("creator", pa.string()),
        ("attribution", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("filesize", pa.int64()),
        ("title", pa.string()),
        ("labels", pa.list_(pa.string())),
        ("queries", pa.list_(pa.string())),
        ("langs", pa.list_(pa.string())),
        ("conflict", pa.bool_()),
        # Provider-specific and free-form, so stored as a JSON object rather than a fixed struct.
        ("extras", pa.string()),
    ]
)


def normalize_url(url: str) -> str:
    """Lower-case scheme and host, no default port, no fragment: spellings of one URL compare equal."""
    url = url.strip()
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return url
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        host = f"{host}:{port}"
    return urlunsplit((scheme, host, parts.path or "/", parts.query, ""))


def candidate_id(key: tuple[str, str]) -> str:
    """Stable id of a dedupe key: `<provider>-<sha256 prefix>`, no dots, a valid sample key."""
    return key_from_source(*key)


def merge_candidates(candidates: Iterable[Candidate]) -> list[MergedCandidate]:
    """One row per unique image, in order of first appearance; repeated hits (same label, query, language) once."""
    merged: dict[tuple[str, str], MergedCandidate] = {}
    for hit in candidates:
        key = hit.dedupe_key()
        row = merged.get(key)
        if row is None:
            shared = {f.name: getattr(hit, f.name) for f in fields(Source)}
            shared["extras"] = dict(hit.extras)
            row = merged[key] = MergedCandidate(
                **shared, candidate_id=candidate_id(key), labels=[], queries=[], langs=[], conflict=False
            )
        if (hit.label, hit.query, hit.lang) not in zip(row.labels, row.queries, row.langs):
            row.labels.append(hit.label)
            row.queries.append(hit.query)
            row.langs.append(hit.lang)
            row.conflict = len(set(row.labels)) > 1
    return list(merged.values())


def write_candidates(path: str | Path, rows: Iterable[Candidate]) -> list[MergedCandidate]:
    """Merge the hits and write them atomically as the candidates parquet; returns the merged rows."""
    merged = merge_candidates(rows)
    records = []
    for row in merged:
        record = {f.name: getattr(row, f.name) for f in fields(row)}
        record["extras"] = json.dumps(row.extras, sort_keys=True, ensure_ascii=False, default=str)
        records.append(record)
    write_parquet(path, pa.Table.from_pylist(records, schema=CANDIDATE_SCHEMA))
    return merged


def read_candidates(path: str | Path) -> list[MergedCandidate]:
    """Read a candidates parquet written by `write_candidates`."""
    table = read_parquet(str(path))
    missing = [name for name in CANDIDATE_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValueError(f"{path}: not a candidates file, missing columns {missing}")
    rows = []
    for record in table.select(CANDIDATE_SCHEMA.names).to_pylist():
        record["extras"] = json.loads(record["extras"] or "{}")
        rows.append(MergedCandidate(**record))
    return rows


def license_from_url(url: str | None) -> tuple[str | None, str | None]:
    """(short code, version) of a Creative Commons licence or public-domain tool URL, e.g. ('by-sa', '2.0').

    Codes follow Openverse's vocabulary (by, by-sa, by-nc, by-nd, by-nc-sa, by-nc-nd,
    cc0, pdm) so that every provider's licences can be filtered the same way.
    """
    match = _CC_URL.search(url or "")
    if not match:
        return None, None
    code, version = match.group(1).lower(), match.group(2)
    return _PUBLIC_DOMAIN.get(code, code), version


def attribution_text(
    title: str | None, creator: str | None, license: str | None, version: str | None, license_url: str | None
) -> str | None:
    """A credit line in Openverse's wording, for providers that do not supply one."""
    if not license:
        return None
    if license == "cc0":
        name = "CC0"
    elif license == "pdm":
        name = "Public Domain Mark"
    elif license.startswith("by"):
        name = f"CC {license.upper()}"
    else:
        name = license
    name = f"{name} {version}" if version else name
    work = f'"{title}"' if title else "This work"
    text = f"{work} by {creator}" if creator else work
    verb = "is marked with" if license == "pdm" else "is licensed under"
    text = f"{text} {verb} {name}."
    if license_url:
        text += f" To view the terms, visit {license_url}."
    return text
