"""Search queries: the labels of a web crawl are the classes whose keywords found each image.

A queries file maps each class to keywords per language, `{class: {lang: [keyword, ...]}}`.
The query text and its language travel with every candidate into the manifest, so
label noise can later be traced to the keyword that caused it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from shards.cli import read_yaml
from shards.classes import CANONICAL

#: The built-in taxonomy: all canonical classes, ten languages.
DEFAULT_QUERIES = Path(__file__).with_name("default_queries.yaml")


@dataclass(frozen=True)
class Query:
    """One search: the class it labels, the text sent to the provider, the text's language."""

    label: str
    text: str
    lang: str


def normalize_text(text: str) -> str:
    """Case- and space-insensitive form of a query text, for matching keywords."""
    return re.sub(r"\s+", " ", text).strip().casefold()


def load_queries(path: str | Path | None = None) -> list[Query]:
    """Read a queries file (None: the built-in default), validated, in file order.

    A keyword listed under two classes would label every image it finds twice, so it
    is an error, as are class names outside the canonical list.
    """
    path = Path(path) if path is not None else DEFAULT_QUERIES
    data = read_yaml(path)
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a mapping {{class: {{lang: [keyword, ...]}}}}")
    queries: dict[Query, None] = {}
    owner: dict[str, str] = {}
    for label, by_lang in data.items():
        if label not in CANONICAL:
            raise ValueError(f"{path}: unknown class name {label!r}; known: {list(CANONICAL)}")
        if not isinstance(by_lang, dict) or not by_lang:
            raise ValueError(f"{path}: class {label!r} must map languages to keyword lists")
        for lang, keywords in by_lang.items():
            if not isinstance(lang, str) or not lang.strip():
                raise ValueError(f"{path}: class {label!r} has an empty or non-text language code {lang!r}")
            if not isinstance(keywords, list) or not keywords:
                raise ValueError(f"{path}: {label}.{lang} must be a non-empty list of keywords")
            for text in keywords:
                if not isinstance(text, str) or not text.strip():
                    raise ValueError(f"{path}: {label}.{lang} has an empty or non-text keyword {text!r}")
                key = normalize_text(text)
                if owner.setdefault(key, label) != label:
                    raise ValueError(f"{path}: keyword {text!r} is listed under both {owner[key]!r} and {label!r}")
                queries[Query(label=label, text=text.strip(), lang=lang)] = None
    return list(queries)


def keyword_classes(queries: list[Query]) -> dict[str, str]:
    """Normalized query text -> class, the inverse of a taxonomy (what a search engine 'understands')."""
    return {normalize_text(q.text): q.label for q in queries}
