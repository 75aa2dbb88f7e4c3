"""Reading a shard set for training: deterministic, epoch-aware, equal batches on every rank.

Splitting lives here rather than in the trainer because it decides correctness, not
speed: DeepSpeed hangs without an error when one rank runs out of batches before the
others, and a rank with no shard yields nothing at all. So every epoch is planned from
the set's sizes up front: the shard list is shuffled with a seed made of (seed, epoch),
dealt to ranks and then to loader workers, and every worker produces the same number of
batches, cycling through its shards when it runs out (the way OpenCLIP and
`with_epoch` do). Workers with few samples therefore revisit some; consumers that
count per sample must de-duplicate by key.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import fsspec
import webdataset as wds
from PIL import Image
from webdataset.filters import default_collation_fn
from webdataset.pytorch import DataLoader, IterableDataset

from shards.fs import join, open_fs, to_url
from shards.sample import IMAGE_EXTENSIONS
from shards.tario import TarFormatError, iter_members
from shards.writer import SIZES_NAME, STATS_NAME

log = logging.getLogger(__name__)

Transform = Callable[[Any], Any]
Decoder = Callable[[bytes], Any]


def decode_pil(data: bytes) -> Image.Image:
    """The default decoder: Pillow, RGB. Trainers may pass a faster one (e.g. libjpeg-turbo to tensors)."""
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


class ShardSetError(ValueError):
    """A shard set cannot be read as asked; the message names the set."""


@dataclass(frozen=True)
class ShardSet:
    """A finished shard set: its shard URLs, their sample counts and its class list."""

    url: str
    shards: tuple[str, ...]
    sizes: tuple[int, ...]
    classes: tuple[str, ...]
    class_counts: tuple[int, ...]  # samples per class, in class-list order

    @property
    def num_samples(self) -> int:
        return sum(self.sizes)


def open_shard_set(url: str) -> ShardSet:
    """Open a set written by `shards.writer` from a directory or an fsspec URL (s3://, gs://)."""
    fs, root = open_fs(url)
    if not fs.isdir(root):
        raise ShardSetError(f"shard set {url}: no such directory")
    for name in (SIZES_NAME, STATS_NAME):
        if not fs.exists(join(root, name)):
            raise ShardSetError(f"shard set {url}: {name} is missing (not a finished shard set)")
    with fs.open(join(root, SIZES_NAME), "r") as f:
        sizes: dict[str, int] = json.load(f)
    with fs.open(join(root, STATS_NAME), "r") as f:
        stats = json.load(f)
    classes = stats["classes"]
    if not sizes:
        raise ShardSetError(f"shard set {url}: it holds no shard")
    names = sorted(sizes)
    return ShardSet(
        url=str(url),
        shards=tuple(to_url(fs, join(root, n)) for n in names),
        sizes=tuple(int(sizes[n]) for n in names),
        classes=tuple(classes),
        class_counts=tuple(int(stats["per_class"].get(c, 0)) for c in classes),
    )


@dataclass(frozen=True)
class EpochPlan:
    """Which shards each (rank, loader worker) reads in one epoch, and for how many batches."""

    assignments: tuple[tuple[tuple[int, ...], ...], ...]  # [rank][worker] -> shard indices
    batches_per_worker: int

    @property
    def batches_per_rank(self) -> int:
        return self.batches_per_worker * len(self.assignments[0])


def plan_epoch(
    shard_set: ShardSet, world_size: int, loader_workers: int, batch_size: int, seed: int, epoch: int
) -> EpochPlan:
    """Deal the shards of one epoch: shuffle by (seed, epoch), split by rank, then by worker.

    The epoch is long enough for the fullest worker to read all its samples once, so
    every sample is seen at least once per epoch.
    """
    workers = max(1, loader_workers)
    readers = world_size * workers
    if len(shard_set.shards) < readers:
        raise ShardSetError(
            f"shard set {shard_set.url} has {len(shard_set.shards)} shards, fewer than the {readers} readers "
            f"({world_size} ranks x {workers} loader workers) that each need one: write smaller shards or "
            "use fewer workers"
        )
    order = list(range(len(shard_set.shards)))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    assignments = tuple(
        tuple(tuple(order[rank::world_size][w::workers]) for w in range(workers)) for rank in range(world_size)
    )
    fullest = max(sum(shard_set.sizes[i] for i in part) for rank in assignments for part in rank)
    return EpochPlan(assignments=assignments, batches_per_worker=max(1, math.ceil(fullest / batch_size)))


def _tar_files(urls: list[str], on_error: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """Members of each shard as webdataset's file dicts, an empty dict closing each shard."""
    for url in urls:
        try:
            with fsspec.open(url, "rb") as f:
                for name, data in iter_members(f, url):
                    yield {"fname": name, "data": data, "__url__": url}
        except (TarFormatError, OSError) as exc:
            if not on_error(exc):
                raise
        yield {}


def _image_of(sample: Mapping[str, Any]) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    raise KeyError(f"no image member ({'/'.join(IMAGE_EXTENSIONS)})")


class _Skips:
    """What one loader worker dropped as unreadable in one epoch, each thing counted once.

    A worker cycles through its shards until it has its planned batches, so it may meet a
    corrupt sample several times; counting every meeting would overstate the damage.
    """

    def __init__(self) -> None:
        self.seen: set[str] = set()  # sample keys, or error texts for damage above the sample level
        self.new = 0  # not yet reported with a batch

    def add(self, what: str, message: str) -> None:
        if what not in self.seen:
            self.seen.add(what)
            self.new += 1
            log.warning(message)

    def take(self) -> int:
        n, self.new = self.new, 0
        return n


class ShardStream(IterableDataset):
    """Batches of decoded samples for one rank; give it to `make_loader`, not to a DataLoader directly.

    Each image is decoded by `decode` (bytes in) and then passed through `transform`.
    Each batch is a dict: `image` (the transform's outputs, collated), `label` (class
    indices, after static label overrides), `key` (list of sample keys) and `skipped`
    (samples this worker dropped as unreadable since its previous batch).
    """

    def __init__(
        self,
        shard_set: ShardSet,
        *,
        rank: int,
        world_size: int,
        loader_workers: int,
        batch_size: int,
        transform: Transform,
        decode: Decoder = decode_pil,
        seed: int = 0,
        overrides: Mapping[str, int] | None = None,
        shuffle_buffer: int = 0,
        balanced: bool = False,
    ) -> None:
        self.shard_set = shard_set
        self.rank, self.world_size = rank, world_size
        self.loader_workers = loader_workers  # 0: read in the training process itself
        self.readers = max(1, loader_workers)
        self.batch_size = batch_size
        self.transform = transform
        self.decode = decode
        self.seed = seed
        self.overrides = dict(overrides or {})
        self.shuffle_buffer = shuffle_buffer
        # Class-balanced sampling for a stream: keep a sample of class c with probability
        # min_count / count[c], so every class arrives equally often (the AffectNet recipe).
        counts = [c for c in shard_set.class_counts if c > 0]
        self.keep_prob = (
            [min(counts) / c if c else 0.0 for c in shard_set.class_counts] if balanced and counts else None
        )
        self.epoch = 1
        self.plan()  # validate shard count against readers before any worker starts

    def set_epoch(self, epoch: int) -> None:
        """Workers are re-created each epoch and read this; webdataset's own counters would not advance."""
        self.epoch = epoch

    def plan(self) -> EpochPlan:
        return plan_epoch(
            self.shard_set, self.world_size, self.readers, self.batch_size, self.seed, self.epoch
        )

    def __len__(self) -> int:
        return self.plan().batches_per_rank

    def _worker(self) -> int:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        return 0 if info is None else info.id

    def _raw_samples(self, shard_urls: list[str], skips: _Skips, rng: random.Random) -> Iterator[dict[str, Any]]:
        """Samples of the given shards, cycling; unreadable tar members are counted, not fatal.

        The shuffle buffer is drained at the end of every pass, so each pass yields every
        sample once before the next begins (a buffer across passes would hold some back).
        Samples that failed to decode in an earlier pass are left out of later ones, so a
        set with nothing decodable ends in an error instead of cycling for ever.
        """

        def skip(exn: Exception) -> bool:
            skips.add(str(exn), f"skipping unreadable data: {exn}")
            return True

        while True:
            yielded = 0
            samples = wds.tariterators.group_by_keys(_tar_files(shard_urls, skip), handler=skip)
            if self.shuffle_buffer > 1:
                samples = wds.filters.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(samples)
            for sample in samples:
                if sample["__key__"] in skips.seen:
                    continue
                yielded += 1
                yield sample
            if not yielded:
                raise ShardSetError(f"shards {shard_urls} yielded no readable sample at all")

    def _keep(self, raw: Mapping[str, Any], rng: random.Random) -> bool:
        """The balanced-sampling draw, made before decoding so rejected samples cost no decode."""
        if self.keep_prob is None:
            return True
        try:
            return rng.random() < self.keep_prob[int(raw["cls"])]
        except (KeyError, ValueError, IndexError):
            return True  # malformed: decoding will count it as skipped

    def _decode(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        key = raw["__key__"]
        label = self.overrides.get(key, int(raw["cls"]))
        return {"image": self.transform(self.decode(_image_of(raw))), "label": label, "key": key}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        plan = self.plan()
        worker = self._worker()
        mine = [self.shard_set.shards[i] for i in plan.assignments[self.rank][worker]]
        rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{worker}")
        skips = _Skips()
        samples = self._raw_samples(mine, skips, rng)
        batch: list[dict[str, Any]] = []
        produced = 0
        for raw in samples:
            if not self._keep(raw, rng):
                continue
            try:
                batch.append(self._decode(raw))
            except Exception as exc:  # a corrupt sample costs itself, not the run
                skips.add(raw["__key__"], f"skipping sample {raw['__key__']} from {raw.get('__url__')}: {exc}")
                continue
            if len(batch) == self.batch_size:
                out = default_collation_fn(batch, combine_scalars=True)
                out["skipped"] = skips.take()
                yield out
                batch = []
                produced += 1
                if produced == plan.batches_per_worker:
                    return


def make_loader(stream: ShardStream, pin_memory: bool = False) -> DataLoader:
    """The DataLoader that matches the stream's plan: one process per planned loader worker.

    Batches are collated inside the workers (`batch_size=None` here), and the loader
    turns their numpy label arrays into tensors.
    """
    return DataLoader(stream, batch_size=None, num_workers=stream.loader_workers, pin_memory=pin_memory)
