"""The one canonical list of expression classes, and mapping between class lists by name.

Datasets disagree on label order (RAF-DB counts from 1 starting at surprise, FERPlus
and AffectNet have their own orders), so labels cross dataset boundaries only as
names. A shard set's `cls` field indexes that set's own class list, which is always a
subsequence of CANONICAL in canonical order.
"""

from __future__ import annotations

from typing import Sequence

CANONICAL: tuple[str, ...] = (
    "neutral",
    "happiness",
    "sadness",
    "surprise",
    "fear",
    "disgust",
    "anger",
    "contempt",
)

#: The 7 basic expressions (RAF-DB, AffectNet 7-class protocol): no contempt.
BASIC7: tuple[str, ...] = CANONICAL[:7]


def validate_classes(classes: Sequence[str]) -> list[str]:
    """Check that `classes` are canonical names, unique, in canonical order."""
    classes = list(classes)
    unknown = [c for c in classes if c not in CANONICAL]
    if unknown:
        raise ValueError(f"unknown class names {unknown}; known: {list(CANONICAL)}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"duplicate class names in {classes}")
    if classes != sorted(classes, key=CANONICAL.index):
        raise ValueError(f"class list {classes} is not in canonical order {list(CANONICAL)}")
    return classes


def class_index(classes: Sequence[str], name: str) -> int:
    """Index of `name` in a class list, with an error that lists the valid names."""
    try:
        return list(classes).index(name)
    except ValueError:
        raise ValueError(f"class {name!r} is not in this class list {list(classes)}") from None


def index_map(source: Sequence[str], target: Sequence[str]) -> dict[int, int]:
    """Map indices of `source` to indices of `target` for the names both share."""
    target_index = {name: i for i, name in enumerate(target)}
    return {i: target_index[name] for i, name in enumerate(source) if name in target_index}
