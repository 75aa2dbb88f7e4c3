"""The query taxonomy: the built-in default and the validation of user files."""

from __future__ import annotations

import pytest
import yaml

from crawler.queries import DEFAULT_QUERIES, Query, keyword_classes, load_queries, normalize_text
from shards.classes import CANONICAL


def test_default_covers_every_class_in_at_least_six_languages():
    queries = load_queries(None)
    raw = yaml.safe_load(DEFAULT_QUERIES.read_text(encoding="utf-8"))
    assert {q.label for q in queries} == set(CANONICAL)
    for label in CANONICAL:
        assert len({q.lang for q in queries if q.label == label}) >= 6
    expected = [(label, text, lang) for label, by_lang in raw.items() for lang, texts in by_lang.items() for text in texts]
    assert [(q.label, q.text, q.lang) for q in queries] == expected


def test_keyword_classes_inverts_the_taxonomy():
    queries = load_queries(None)
    index = keyword_classes(queries)
    assert all(index[normalize_text(q.text)] == q.label for q in queries)
    assert index[normalize_text("  HAPPY   Face ")] == "happiness"


def write(tmp_path, data) -> str:
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return str(path)


def test_user_file_in_file_order(tmp_path):
    path = write(tmp_path, {"sadness": {"en": ["sad face"], "fr": ["visage triste"]}, "anger": {"de": ["Wut"]}})
    assert load_queries(path) == [
        Query("sadness", "sad face", "en"),
        Query("sadness", "visage triste", "fr"),
        Query("anger", "Wut", "de"),
    ]


def test_unknown_class_names_file_and_class(tmp_path):
    path = write(tmp_path, {"happiness": {"en": ["smile"]}, "joy": {"en": ["joyful"]}})
    with pytest.raises(ValueError, match=r"queries\.yaml: unknown class name 'joy'"):
        load_queries(path)


def test_keyword_under_two_classes_is_an_error(tmp_path):
    path = write(tmp_path, {"surprise": {"en": ["Shocked face"]}, "fear": {"en": ["shocked  face"]}})
    with pytest.raises(ValueError, match="listed under both 'surprise' and 'fear'"):
        load_queries(path)


@pytest.mark.parametrize(
    "data, message",
    [
        (["happiness"], "expected a mapping"),
        ({"happiness": ["smile"]}, "must map languages"),
        ({"happiness": {"en": []}}, r"happiness\.en must be a non-empty list"),
        ({"happiness": {"en": ["smile", ""]}}, "empty or non-text keyword"),
    ],
)
def test_malformed_files_are_named(tmp_path, data, message):
    path = write(tmp_path, data)
    with pytest.raises(ValueError, match=message) as info:
        load_queries(path)
    assert path in str(info.value)
