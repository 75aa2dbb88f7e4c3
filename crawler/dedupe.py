"""Duplicate removal: exact copies by sha256 of the fetched bytes, near copies by pHash of the crop
(`shards.phash`, which shards.split uses too).

The same photo is reposted, re-encoded, resized and mirrored all over the web. Measured
on aligned crops: re-encoding, downscaling, blur and greyscale give
pHash distance 0, a 10% crop 14, a mirror 32, two different people 24; so a face is a
near copy when its crop's 64-bit pHash, or its mirror's, is within `max_distance`
(default 8) of a face already kept.

Near copies are found with a multi-index over bands, never by comparing all pairs: the
64 bits are cut into `bands` bands; two hashes within distance d differ in at most
floor(d / bands) bits in at least one band (pigeonhole), so each band is looked up with
every value within that radius. With 4 bands of 16 bits and d = 8 that is 137 lookups
per band, and the search is exact.

Decisions depend only on the order items are offered, so offering in a fixed order
(work shard, then candidate, then face) gives the same survivors on any cluster.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

BITS = 64


@dataclass(frozen=True)
class DedupeConfig:
    exact: bool = True
    near: bool = True
    max_distance: int = 8
    bands: int = 4
    mirror: bool = True

    def validate(self) -> "DedupeConfig":
        if not 0 <= self.max_distance < BITS:
            raise ValueError(f"dedupe max_distance must be within [0, 63], got {self.max_distance}")
        if not 1 <= self.bands <= BITS:
            raise ValueError(f"dedupe bands must be within [1, 64], got {self.bands}")
        if self.max_distance // self.bands > 3:
            raise ValueError(
                f"dedupe: {self.bands} bands for distance {self.max_distance} means a lookup radius of "
                f"{self.max_distance // self.bands} bits per band; use more bands (at least {self.max_distance // 3})"
            )
        return self


def hex64(value: int) -> str:
    return f"{value:016x}"


def distance(a: int, b: int) -> int:
    return (a ^ b).bit_count()


class BandIndex:
    """Exact radius search over 64-bit hashes through per-band buckets."""

    def __init__(self, bands: int = 4, max_distance: int = 8) -> None:
        self.max_distance = max_distance
        widths = [BITS // bands + (1 if i < BITS % bands else 0) for i in range(bands)]
        self._spans = []
        start = 0
        for width in widths:
            self._spans.append((start, width))
            start += width
        self.radius = max_distance // bands
        self._buckets: list[dict[int, list[int]]] = [{} for _ in range(bands)]
        self._values: list[int] = []
        self._ids: list[str] = []
        self._flips = {w: self._masks(w, self.radius) for w in set(widths)}

    @staticmethod
    def _masks(width: int, radius: int) -> list[int]:
        masks = [0]
        for r in range(1, radius + 1):
            for bits in itertools.combinations(range(width), r):
                masks.append(sum(1 << b for b in bits))
        return masks

    def _band(self, value: int, i: int) -> int:
        start, width = self._spans[i]
        return (value >> start) & ((1 << width) - 1)

    def __len__(self) -> int:
        return len(self._values)

    def add(self, value: int, item_id: str) -> None:
        n = len(self._values)
        self._values.append(value)
        self._ids.append(item_id)
        for i, buckets in enumerate(self._buckets):
            buckets.setdefault(self._band(value, i), []).append(n)

    def nearest(self, value: int) -> tuple[str, int] | None:
        """The closest stored item within max_distance (the earliest added on a tie), or None."""
        found: set[int] = set()
        for i, (_, width) in enumerate(self._spans):
            band, buckets = self._band(value, i), self._buckets[i]
            for hit in map(buckets.get, [band ^ mask for mask in self._flips[width]]):
                if hit:
                    found.update(hit)
        best: tuple[int, int] | None = None  # (distance, position)
        for n in found:
            d = (value ^ self._values[n]).bit_count()
            if d <= self.max_distance and (best is None or (d, n) < best):
                best = (d, n)
        return None if best is None else (self._ids[best[1]], best[0])


@dataclass
class Decision:
    keep: bool
    reason: str | None = None  # None, "exact" or "near"
    duplicate_of: str | None = None
    distance: int | None = None
    mirrored: bool = False


@dataclass
class Deduper:
    """Offer faces in a fixed order; each is kept or named a duplicate of an earlier kept one."""

    config: DedupeConfig = field(default_factory=DedupeConfig)

    def __post_init__(self) -> None:
        self.config.validate()
        self._sha: dict[str, tuple[str, str]] = {}  # sha256 -> (image id, first kept key)
        self._index = BandIndex(self.config.bands, self.config.max_distance)

    def offer(self, key: str, image_id: str, sha256: str | None, phash_value: int | None,
              phash_mirror: int | None = None) -> Decision:
        """Decide on one face; `image_id` groups the faces of one fetched image (they share its bytes)."""
        cfg = self.config
        if cfg.exact and sha256 is not None:
            seen = self._sha.get(sha256)
            if seen is not None and seen[0] != image_id:
                return Decision(False, "exact", seen[1], 0)
        if cfg.near and phash_value is not None:
            hit = self._index.nearest(phash_value)
            mirrored = False
            if cfg.mirror and phash_mirror is not None:
                flipped = self._index.nearest(phash_mirror)
                if flipped is not None and (hit is None or flipped[1] < hit[1]):
                    hit, mirrored = flipped, True
            if hit is not None:
                return Decision(False, "near", hit[0], hit[1], mirrored)
        self.add(key, image_id, sha256, phash_value)
        return Decision(True)

    def add(self, key: str, image_id: str, sha256: str | None, phash_value: int | None) -> None:
        if sha256 is not None:
            self._sha.setdefault(sha256, (image_id, key))
        if phash_value is not None and self.config.near:
            self._index.add(phash_value, key)
