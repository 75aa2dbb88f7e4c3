"""Search providers by name: one module per source, built from flat settings by `get_provider`.

Settings are keyword arguments: the provider's own (api_base, input, allow_youtube,
thumb_width, licenses, ...), any `RatePolicy` field (requests_per_second, concurrency,
max_results, page_size) and any `RetryPolicy` field (max_retries, backoff_s,
max_backoff_s, sleep_scale). A setting given as None means "the provider's default";
an unknown one, or one of the wrong type, is an error naming it.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import fields, replace
from typing import Any

from crawler.providers.base import (
    OwnsQueries,
    Provider,
    ProviderError,
    ProviderUnreachable,
    RatePolicy,
    RetryPolicy,
    SearchPage,
)
from crawler.providers.flickr import FlickrProvider
from crawler.providers.openverse import LocalWebProvider, OpenverseProvider
from crawler.providers.urllist import UrlListProvider
from crawler.providers.wikimedia import WikimediaProvider
from crawler.providers.youtube import YouTubeProvider
from crawler.settings import coerce

PROVIDERS: dict[str, type] = {
    "openverse": OpenverseProvider,
    "wikimedia": WikimediaProvider,
    "flickr": FlickrProvider,
    "urllist": UrlListProvider,
    "youtube": YouTubeProvider,
    "localweb": LocalWebProvider,
}

_RATE_FIELDS = {f.name for f in fields(RatePolicy)}
_RETRY_FIELDS = {f.name for f in fields(RetryPolicy)}

__all__ = [
    "PROVIDERS",
    "OwnsQueries",
    "Provider",
    "ProviderError",
    "ProviderUnreachable",
    "RatePolicy",
    "RetryPolicy",
    "SearchPage",
    "get_provider",
    "settings_of",
]


def get_provider(name: str, **settings: Any) -> Provider:
    """Build the provider `name` from flat settings, validated before any request is made."""
    if name not in PROVIDERS:
        raise ValueError(f"unknown provider {name!r}; known: {sorted(PROVIDERS)}")
    cls = PROVIDERS[name]
    settings = {k: v for k, v in settings.items() if v is not None}
    hints = _settings(cls)
    unknown = sorted(settings.keys() - hints.keys())
    if unknown:
        raise ValueError(f"unknown settings {unknown} for provider {name!r}; known: {sorted(hints)}")
    settings = {k: coerce(v, hints[k], k) for k, v in settings.items()}
    rate = {k: settings.pop(k) for k in _RATE_FIELDS & settings.keys()}
    retry = {k: settings.pop(k) for k in _RETRY_FIELDS & settings.keys()}
    settings["rate"] = replace(cls.default_rate, **rate)
    if retry:
        settings["retry"] = RetryPolicy(**retry)
    return cls(**settings)


def settings_of(name: str) -> set[str]:
    """The names of the settings provider `name` takes."""
    return set(_settings(PROVIDERS[name]))


def _settings(cls: type) -> dict[str, Any]:
    """Every setting of a provider class, with its type: its own keywords and the rate and retry fields."""
    hints = _keyword_parameters(cls)
    hints.update(typing.get_type_hints(RatePolicy))
    if "retry" in hints:
        hints.update(typing.get_type_hints(RetryPolicy))
    for built_here in ("rate", "retry"):
        hints.pop(built_here, None)
    return hints


def _keyword_parameters(cls: type) -> dict[str, Any]:
    """Keyword parameters, with their types, of `cls.__init__` and of the initializers it forwards `**common` to."""
    hints: dict[str, Any] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        types = typing.get_type_hints(init)
        hints.update({p.name: types.get(p.name, Any) for p in params
                      if p.kind is p.KEYWORD_ONLY and p.name not in hints})
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return hints
