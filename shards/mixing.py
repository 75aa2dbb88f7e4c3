"""How well a shard set's order mixes the classes: per-shard distance from the set's class
shares, and the batches the training reader would draw from it, simulated on labels alone.

A set written class by class is not wrong, but every reader that deals whole shards
(plain webdataset, Ray Data, most training scripts) turns it into batches of one or two
classes, and SCN's rank loss and relabel margin then act on near-single-class batches.
`shards.verify` reports both figures so a producer's order is seen before anyone trains.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from webdataset.filters import shuffle

from shards.reader import (
    DEFAULT_INTERLEAVE,
    DEFAULT_SHUFFLE_BUFFER,
    ShardSet,
    interleave_sources,
    plan_epoch,
)

#: The batch and readers the simulation assumes: the shipped CPU configs' batch of 32 on one
#: rank with two loader workers.
BATCH = 32
LOADER_WORKERS = 2


@dataclass(frozen=True)
class Mixing:
    """A set's mixing figures; distances are total variation distances of class shares, in [0, 1]."""

    shard_distance: dict[str, float]  # shard -> distance of its class shares from the set's
    mean_distance: float  # over samples
    random_distance: float  # what a random write order gives for shards of these sizes (expected)
    classes_per_batch: float  # the default training reader, simulated
    top_share: float  # share of the most common class in a batch, simulated
    random_classes_per_batch: float  # batches drawn uniformly from the set

    @property
    def class_sorted(self) -> bool:
        """Shards far from the set's shares, well beyond what chance gives shards of their size."""
        return self.mean_distance > max(0.25, 3 * self.random_distance)


def _distance(counts: Counter, n: int, shares: dict[int, float]) -> float:
    return 0.5 * sum(abs(counts.get(c, 0) / n - p) for c, p in shares.items())


def _random_distance(n: int, shares: dict[int, float]) -> float:
    """Expected distance of a random sample of n from the shares: the mean absolute deviation of
    a binomial share, sqrt(2 p (1 - p) / (pi n)) per class (normal approximation)."""
    return 0.5 * sum(math.sqrt(2 * p * (1 - p) / (math.pi * n)) for p in shares.values())


def _batch_figures(batches: list[list[int]]) -> tuple[float, float]:
    counts = [Counter(b) for b in batches if len(b) == BATCH]
    if not counts:
        return 0.0, 0.0
    return (sum(len(c) for c in counts) / len(counts), sum(max(c.values()) for c in counts) / len(counts) / BATCH)


def simulate_reader(shard_set: ShardSet, labels: dict[str, list[int]], seed: int = 0) -> list[list[int]]:
    """Batches of labels the default training reader (one rank, two loader workers, default
    interleave and buffer) draws in epoch 1, reading `labels` (shard URL -> labels in tar order)."""
    plan = plan_epoch(shard_set, 1, LOADER_WORKERS, BATCH, seed, 1, DEFAULT_INTERLEAVE)
    batches = []
    for worker, pieces in enumerate(plan.assignments[0]):
        rng = random.Random(f"{seed}:{worker}")
        runs = (iter(labels[shard_set.shards[p.shard]][p.start : p.start + p.count]) for p in pieces)
        stream = list(shuffle(DEFAULT_SHUFFLE_BUFFER, DEFAULT_SHUFFLE_BUFFER, rng=rng)(interleave_sources(runs, DEFAULT_INTERLEAVE)))
        batches += [stream[i : i + BATCH] for i in range(0, len(stream), BATCH)]
    return batches


def measure(shard_set: ShardSet, labels: dict[str, list[int]]) -> Mixing:
    """The mixing figures of a set whose labels, shard by shard in tar order, are `labels`."""
    total = Counter(label for shard in labels.values() for label in shard)
    n = sum(total.values())
    shares = {c: k / n for c, k in total.items()}
    distance = {url.rsplit("/", 1)[-1]: _distance(Counter(ls), len(ls), shares) for url, ls in labels.items() if ls}
    weights = {url.rsplit("/", 1)[-1]: len(ls) for url, ls in labels.items() if ls}
    mean = sum(distance[s] * weights[s] for s in distance) / n
    random_mean = sum(_random_distance(weights[s], shares) * weights[s] for s in distance) / n
    classes, top = _batch_figures(simulate_reader(shard_set, labels)) if n >= LOADER_WORKERS else (0.0, 0.0)
    uniform = sum(1 - (1 - p) ** BATCH for p in shares.values())
    return Mixing(distance, mean, random_mean, classes, top, uniform)


def describe(mixing: Mixing, where: str) -> list[str]:
    """The lines `shards.verify` prints: the figures, then a warning when the set is class-sorted."""
    lines = [
        f"mixing: shards' class shares differ from the set's by {mixing.mean_distance:.2f} on average "
        f"(a random write order: about {mixing.random_distance:.2f}); the training reader's batches of {BATCH} "
        f"hold {mixing.classes_per_batch:.1f} classes (random batches: {mixing.random_classes_per_batch:.1f}), "
        f"the top class {mixing.top_share:.0%} of a batch"
    ]
    if mixing.class_sorted:
        worst = sorted(mixing.shard_distance.items(), key=lambda kv: -kv[1])[:3]
        lines.append(
            f"WARNING: {where} is class-sorted (most distant shards: "
            + ", ".join(f"{s} {d:.2f}" for s, d in worst)
            + "): readers that deal whole shards (plain webdataset, Ray Data) give batches of one or two classes, "
            "and this project's reader mixes it only by reading pieces of many shards at once; rewrite it in a "
            "random order (the importers' and crawler.build's --shuffle-seed)"
        )
    return lines
