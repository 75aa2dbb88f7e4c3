"""Duplicate removal: exact copies, near copies (re-encoded, resized, mirrored), the band index."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFilter, ImageOps

from crawler.dedupe import BandIndex, DedupeConfig, Deduper, distance
from shards.phash import hashes, phash


def face_like(seed: int, size: int = 112) -> Image.Image:
    """A smooth random picture (low frequencies dominate, as in a face crop)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)


def reencode(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_phash_is_stable_under_copies_and_apart_for_others() -> None:
    base = face_like(1)
    h = phash(base)
    assert 0 <= h < 2**64
    copies = [
        reencode(base, 40),
        base.resize((56, 56), Image.Resampling.BILINEAR).resize((112, 112), Image.Resampling.BILINEAR),
        base.filter(ImageFilter.GaussianBlur(1)),
        ImageOps.grayscale(base).convert("RGB"),
    ]
    for copy in copies:
        assert distance(h, phash(copy)) <= 4
    others = [distance(h, phash(face_like(s))) for s in range(2, 30)]
    assert min(others) > 8


def test_mirror_copies_are_caught_through_the_mirror_hash() -> None:
    base = face_like(3)
    mirrored = ImageOps.mirror(base)
    dedupe = Deduper(DedupeConfig())
    assert dedupe.offer("a", "img-a", "sha-a", *hashes(base)).keep
    decision = dedupe.offer("b", "img-b", "sha-b", *hashes(mirrored))
    assert not decision.keep and decision.reason == "near" and decision.mirrored and decision.duplicate_of == "a"
    no_mirror = Deduper(DedupeConfig(mirror=False))
    no_mirror.offer("a", "img-a", "sha-a", *hashes(base))
    assert no_mirror.offer("b", "img-b", "sha-b", *hashes(mirrored)).keep


def test_exact_copies_by_sha_but_not_the_faces_of_one_image() -> None:
    dedupe = Deduper(DedupeConfig())
    a, b = hashes(face_like(4)), hashes(face_like(5))
    assert dedupe.offer("k1-f0", "img-1", "sha-1", *a).keep
    assert dedupe.offer("k1-f1", "img-1", "sha-1", *b).keep  # second face of the same photo
    decision = dedupe.offer("k2", "img-2", "sha-1", *b)  # the same bytes under another URL
    assert (decision.keep, decision.reason, decision.duplicate_of, decision.distance) == (False, "exact", "k1-f0", 0)


def test_near_copy_is_named_with_its_distance() -> None:
    dedupe = Deduper(DedupeConfig(max_distance=8))
    base = face_like(6)
    assert dedupe.offer("orig", "i1", "s1", *hashes(base)).keep
    decision = dedupe.offer("copy", "i2", "s2", *hashes(reencode(base, 30)))
    assert not decision.keep and decision.reason == "near" and decision.duplicate_of == "orig"
    assert decision.distance <= 8
    assert dedupe.offer("other", "i3", "s3", *hashes(face_like(7))).keep
    strict = Deduper(DedupeConfig(max_distance=0, bands=1, exact=False))
    strict.offer("orig", "i1", "s1", phash(base), None)
    assert strict.offer("same", "i2", "s1", phash(base), None).reason == "near"  # exact off: found as near


def test_decisions_depend_on_order_only() -> None:
    images = [face_like(s) for s in range(10)] + [reencode(face_like(s), 50) for s in range(5)]
    items = [(f"k{i}", f"i{i}", f"s{i}", *hashes(im)) for i, im in enumerate(images)]

    def run(order):
        dedupe = Deduper(DedupeConfig())
        return {item[0]: dedupe.offer(*item).keep for item in order}

    first = run(items)
    assert first == run(list(items))
    assert sum(first.values()) == 10  # the five re-encodings go


def brute_nearest(values: list[int], query: int, max_distance: int):
    best = None
    for n, v in enumerate(values):
        d = distance(v, query)
        if d <= max_distance and (best is None or (d, n) < best):
            best = (d, n)
    return best


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), max_distance=st.integers(0, 12), bands=st.sampled_from([4, 5, 8, 13]))
def test_band_index_is_exact(seed: int, max_distance: int, bands: int) -> None:
    if max_distance // bands > 3:
        return
    rng = random.Random(seed)
    values = [rng.getrandbits(64) for _ in range(60)]
    # Plant near neighbours at every distance up to the limit and a little beyond.
    for _ in range(60):
        v = rng.choice(values)
        for bit in rng.sample(range(64), rng.randint(0, max_distance + 2)):
            v ^= 1 << bit
        values.append(v)
    index = BandIndex(bands=bands, max_distance=max_distance)
    for n, v in enumerate(values[:80]):
        index.add(v, str(n))
    for query in values[80:]:
        expected = brute_nearest(values[:80], query, max_distance)
        got = index.nearest(query)
        if expected is None:
            assert got is None
        else:
            assert got == (str(expected[1]), expected[0])


def test_config_is_validated() -> None:
    for bad in ({"max_distance": 64}, {"bands": 0}, {"max_distance": 20, "bands": 2}):
        with pytest.raises(ValueError):
            DedupeConfig(**bad).validate()
