"""Reading a shard set for training: batches that mix the classes, equal on every rank, epoch by epoch.

Batches must look like the data set (SCN's rank loss and relabel margin act within a
batch, and so do BatchNorm's statistics) whatever order a producer wrote the set in: an
importer or crawl that writes class by class gives shards of one or two classes each.
So every epoch is planned from the set's sizes up front: shards are cut into pieces
(runs of consecutive samples; whole shards once the set has enough of them) and dealt to
(rank, loader worker) readers stratified, so that each reader's share spans the whole
write order and holds about the same number of samples, with the choices drawn from a
seed made of (seed, epoch). Each reader reads `interleave` pieces at once, round robin,
into a shuffle buffer of raw (undecoded) samples, the way OpenCLIP reads LAION: many
shards in flight, thousands of samples in the buffer. A set with fewer shards than
readers is split by sample, so small sets train on any number of ranks.

DeepSpeed hangs without an error when one rank runs out of batches before the others, so
every reader produces the same number of batches, cycling through its pieces when it runs
out (as `with_epoch` does). Readers with fewer samples therefore revisit some; consumers
that count per sample must de-duplicate by key.

Shards come from crawls of the open web and from other tools, so reading never stops or
hangs on a malformed tar or sample: each fault is logged with its shard and offset,
counted once per epoch as skipped, and reading goes on with the next piece. An image whose
header declares more pixels than `max_pixels` (`shards.pixels`) is one such fault: it is
skipped before any decoder sees it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
from collections import deque
from dataclasses import dataclass
from itertools import islice
from typing import Any, Callable, Iterator, Mapping

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import webdataset as wds
from PIL import Image
from webdataset.filters import default_collation_fn
from webdataset.pytorch import DataLoader, IterableDataset

from shards.fs import join, open_fs, to_url
from shards.manifest import read_manifest
from shards.pixels import DEFAULT_MAX_PIXELS, image_size
from shards.sample import IMAGE_EXTENSIONS
from shards.tario import iter_members, name_at
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


#: Samples a training reader holds, undecoded, to draw from at random (OpenCLIP keeps 5,000).
DEFAULT_SHUFFLE_BUFFER = 5000
#: Pieces a training reader reads at once, round robin. A piece of a class-sorted set often
#: holds one class, so this many pieces give a batch most of 8 classes.
DEFAULT_INTERLEAVE = 16


@dataclass(frozen=True)
class Piece:
    """A run of consecutive samples of one shard: the unit an epoch's plan deals to readers."""

    shard: int  # index into ShardSet.shards
    start: int  # first sample, counted from the shard's start
    count: int


@dataclass(frozen=True)
class EpochPlan:
    """Which pieces each (rank, loader worker) reads in one epoch, and for how many batches."""

    assignments: tuple[tuple[tuple[Piece, ...], ...], ...]  # [rank][worker] -> pieces
    batches_per_worker: int

    @property
    def batches_per_rank(self) -> int:
        return self.batches_per_worker * len(self.assignments[0])


def cut_pieces(sizes: tuple[int, ...], wanted: int) -> list[Piece]:
    """At least `wanted` pieces (if the set has that many samples): whole shards when there are
    enough of them, else every shard cut into near-equal runs of about total / wanted samples."""
    if sum(1 for n in sizes if n) >= wanted:
        return [Piece(i, 0, n) for i, n in enumerate(sizes) if n]
    per = max(1, sum(sizes) // wanted)
    pieces = []
    for i, n in enumerate(sizes):
        parts = -(-n // per)
        bounds = [round(j * n / parts) for j in range(parts + 1)]
        pieces += [Piece(i, a, b - a) for a, b in zip(bounds, bounds[1:])]
    return pieces


def plan_epoch(
    shard_set: ShardSet,
    world_size: int,
    loader_workers: int,
    batch_size: int,
    seed: int,
    epoch: int,
    interleave: int = 1,
) -> EpochPlan:
    """Cut the set into pieces for `interleave` per reader and deal them, stratified: every reader
    takes one piece from each run of (readers) consecutive pieces, so its share spans the set's
    whole write order (all the classes of a class-sorted set, every part of a crawl).

    Within a run, the largest piece goes to the reader holding the fewest samples so far (ties
    broken at random), so readers hold near-equal shares; who gets which piece, and the order a
    reader reads its pieces in, are drawn from (seed, epoch). The epoch is long enough for the
    fullest reader to read all its samples once, so every sample is seen at least once per epoch.
    """
    workers = max(1, loader_workers)
    readers = world_size * workers
    if shard_set.num_samples < readers:
        raise ShardSetError(
            f"shard set {shard_set.url} holds {shard_set.num_samples} samples, fewer than the {readers} readers "
            f"({world_size} ranks x {workers} loader workers) that each need one: use fewer ranks or loader workers"
        )
    rng = random.Random(f"{seed}:{epoch}")
    pieces = cut_pieces(shard_set.sizes, readers * max(1, interleave))
    load = [0] * readers
    dealt: list[list[Piece]] = [[] for _ in range(readers)]
    for first in range(0, len(pieces), readers):
        run = sorted(pieces[first : first + readers], key=lambda p: (-p.count, rng.random()))
        ties = [rng.random() for _ in range(readers)]
        for piece, reader in zip(run, sorted(range(readers), key=lambda r: (load[r], ties[r]))):
            dealt[reader].append(piece)
            load[reader] += piece.count
    for share in dealt:
        rng.shuffle(share)
    assignments = tuple(tuple(tuple(dealt[rank * workers + w]) for w in range(workers)) for rank in range(world_size))
    return EpochPlan(assignments=assignments, batches_per_worker=max(1, math.ceil(max(load) / batch_size)))


def interleave_sources(sources: Iterator[Iterator[Any]], width: int) -> Iterator[Any]:
    """Round robin over `width` sources at a time, starting the next source when one ends.

    Sources are generators that open their shard on first use, so at most `width` shards
    are open (and buffered by fsspec) at once, however many a reader holds.
    """
    active = deque(islice(sources, width))
    while active:
        source = active.popleft()
        try:
            item = next(source)
        except StopIteration:
            active.extend(islice(sources, 1))
            continue
        active.append(source)
        yield item


def _image_of(sample: Mapping[str, Any]) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    raise KeyError(f"no image member ({'/'.join(IMAGE_EXTENSIONS)})")


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from `parts` (e.g. seed, epoch, rank), the same in every process: Python's hash() is not."""
    text = ":".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") % 2**63


class _Skips:
    """What one loader worker dropped as unreadable in one epoch, each thing counted once.

    A worker cycles through its shards until it has its planned batches, so it may meet a
    corrupt sample several times; counting every meeting would overstate the damage.
    Faults that cost nothing (a stale offset, read around) are logged once, not counted.
    """

    def __init__(self) -> None:
        self.seen: set[str] = set()  # sample keys, or error texts for damage above the sample level
        self.new = 0  # not yet reported with a batch
        self.noted: set[str] = set()

    def note(self, what: str, message: str) -> None:
        if what not in self.noted:
            self.noted.add(what)
            log.warning(message)

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

    Each image is checked against `max_pixels` from its header, decoded by `decode` (bytes
    in) and then passed through `transform`.
    Each batch is a dict: `image` (the transform's outputs, collated), `label` (class
    indices, after static label overrides), `key` (list of sample keys), `row` (each
    sample's row in the set's manifest, so that per-sample state needs no lookup by key;
    -1 for a sample the manifest does not place where the tar has it) and `skipped`
    (samples this worker dropped as unreadable since its previous batch). Training
    streams mix with `interleave` pieces at once and a `shuffle_buffer` of samples;
    evaluation leaves both at 1 and 0 and reads each piece in order. `balanced` draws every
    class equally often by the label training uses: `labels` (that of each manifest row, e.g.
    after a relabel table, which changes between epochs: pass the current one each epoch), else
    the manifest's labels with `overrides`. `start_batch` resumes the epoch there: the rank's
    first `start_batch` batches are passed over, and every later one is the batch an
    uninterrupted epoch would give (`__iter__`).
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
        interleave: int = 1,
        balanced: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        labels: np.ndarray | None = None,
        start_batch: int = 0,
    ) -> None:
        self.shard_set = shard_set
        self.start_batch = start_batch
        self.max_pixels = max_pixels
        self.rank, self.world_size = rank, world_size
        self.loader_workers = loader_workers  # 0: read in the training process itself
        self.readers = max(1, loader_workers)
        self.batch_size = batch_size
        self.transform = transform
        self.decode = decode
        self.seed = seed
        self.overrides = dict(overrides or {})
        self.shuffle_buffer = shuffle_buffer
        self.interleave = max(1, interleave)
        # Class-balanced sampling for a stream: keep a sample of class c with probability
        # min_count / count[c], so every class arrives equally often (the AffectNet recipe). By the
        # label training uses, not the one the shard holds: `labels` when the caller's labels
        # change (a relabel table), else the manifest's with the overrides.
        self.labels = None
        self.keep_prob = None
        if balanced:
            self.labels = np.asarray(labels) if labels is not None else self._manifest_labels()
            counts = np.bincount(self.labels, minlength=len(shard_set.classes))
            least = counts[counts > 0].min() if counts.any() else 0
            self.keep_prob = [least / c if c else 0.0 for c in counts.tolist()]
        self.epoch = 1
        self.plan()  # validate the set against the readers before any worker starts

    def _manifest_labels(self) -> np.ndarray:
        """The label of every manifest row as trained on without a relabel table: the manifest's, overridden."""
        manifest = read_manifest(self.shard_set.url, columns=["key", "label"])
        labels = manifest.column("label").to_numpy().astype(np.int64)
        if self.overrides:
            keys = pa.array(list(self.overrides), pa.string())
            found = pc.index_in(keys, value_set=manifest.column("key").combine_chunks())
            placed = found.is_valid().to_numpy(zero_copy_only=False)
            rows = found.fill_null(0).to_numpy()
            labels[rows[placed]] = np.fromiter(self.overrides.values(), np.int64, len(self.overrides))[placed]
        return labels

    def set_epoch(self, epoch: int) -> None:
        """Workers are re-created each epoch and read this; webdataset's own counters would not advance."""
        self.epoch = epoch

    def plan(self) -> EpochPlan:
        return plan_epoch(
            self.shard_set, self.world_size, self.readers, self.batch_size, self.seed, self.epoch, self.interleave
        )

    def __len__(self) -> int:
        return self.plan().batches_per_rank

    def _worker(self) -> int:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        return 0 if info is None else info.id

    def _piece_rows(self, piece: Piece) -> tuple[list[str], int | None]:
        """The keys of the piece's samples and the byte offset of its first, from its shard's manifest part.

        The offset is None for a piece at the shard's start, and for sets written before
        offsets were recorded: those pieces pass over the samples before them, reading headers only.
        """
        url = self.shard_set.shards[piece.shard]
        with fsspec.open(url[: -len(".tar")] + ".parquet", "rb") as f:
            part = pq.ParquetFile(f)
            columns = ["key", "offset"] if "offset" in part.schema_arrow.names else ["key"]
            rows = part.read(columns=columns).slice(piece.start, piece.count).to_pydict()
        offsets = rows.get("offset") or [None]
        return rows["key"], offsets[0] if piece.start else None

    def _piece_samples(self, piece: Piece, skips: _Skips) -> Iterator[dict[str, Any]]:
        """The piece's samples as webdataset sample dicts (`__key__`, `__url__`, one entry per member),
        each with its `__row__` in the set's manifest (-1 where the tar and the manifest disagree).

        Any fault (a malformed tar, an unreadable file, a sample webdataset cannot group)
        costs the rest of this piece, logged with the shard and where it broke, never the run.
        """
        url = self.shard_set.shards[piece.shard]
        first_row = sum(self.shard_set.sizes[: piece.shard]) + piece.start

        def skip(exc: Exception) -> bool:
            skips.add(f"{url}:{piece.start}:{exc}", f"skipping the rest of samples {piece.start}+{piece.count} of {url}: {exc}")
            return True

        try:
            keys, offset = self._piece_rows(piece)
            with fsspec.open(url, "rb") as f:
                # The writer's members go in sorted order, so a sample starts with its `cls`.
                found = offset is not None and name_at(f, offset) == f"{keys[0]}.cls"
                if offset is not None and not found:
                    skips.note(url, f"{url}: samples are not at their manifest offsets (the shard changed since "
                               "it was written?); finding them by their headers instead")
                    f.seek(0)
                members = iter_members(f, url, 0 if found else piece.start)
                files = ({"fname": n, "data": d, "__url__": url} for n, d in members)
                samples = islice(wds.tariterators.group_by_keys(files, handler=skip), piece.count)
                for i, sample in enumerate(samples):
                    sample["__row__"] = first_row + i if i < len(keys) and sample["__key__"] == keys[i] else -1
                    yield sample
        except Exception as exc:  # hostile or damaged input: see the docstring
            skip(exc)

    def _raw_samples(self, pieces: tuple[Piece, ...], skips: _Skips, rng: random.Random) -> Iterator[dict[str, Any]]:
        """Samples of the given pieces, interleaved and shuffled, cycling; unreadable data is counted, not fatal.

        The shuffle buffer is drained at the end of every pass, so each pass yields every
        sample once before the next begins (a buffer across passes would hold some back).
        Samples that failed to decode in an earlier pass are left out of later ones, so a
        set with nothing decodable ends in an error instead of cycling for ever.
        """
        while True:
            yielded = 0
            samples = interleave_sources((self._piece_samples(p, skips) for p in pieces), self.interleave)
            if self.shuffle_buffer > 1:
                samples = wds.filters.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(samples)
            for sample in samples:
                if sample["__key__"] in skips.seen:
                    continue
                yielded += 1
                yield sample
            if not yielded:
                shards = sorted({self.shard_set.shards[p.shard] for p in pieces})
                raise ShardSetError(f"shards {shards} yielded no readable sample at all")

    def _keep(self, raw: Mapping[str, Any], rng: random.Random) -> bool:
        """The balanced-sampling draw, made before decoding so rejected samples cost no decode."""
        if self.keep_prob is None:
            return True
        try:
            row = raw["__row__"]
            label = int(self.labels[row]) if row >= 0 else self.overrides.get(raw["__key__"], int(raw["cls"]))
            return rng.random() < self.keep_prob[label]
        except (KeyError, ValueError, IndexError, TypeError):
            return True  # malformed: decoding will count it as skipped

    def _decoded(self, raw: Mapping[str, Any]) -> tuple[int, Any]:
        """The sample's class index (as stored) and decoded image; raises on what makes it unreadable.
        A passed-over batch calls it alone, to drop the samples training would drop."""
        label = int(raw["cls"])
        if not 0 <= label < len(self.shard_set.classes):
            raise ValueError(f"class index {label} is outside the set's {len(self.shard_set.classes)} classes")
        data = _image_of(raw)
        image_size(data, self.max_pixels)  # raises over the cap: skipped and counted, never decoded
        return label, self.decode(data)

    def _decode(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        key = raw["__key__"]
        label, image = self._decoded(raw)
        return {"image": self.transform(image), "label": self.overrides.get(key, label), "key": key, "row": raw["__row__"]}

    def _reader(self) -> int:
        """Which of the rank's planned readers this loader worker is. The loader takes its batches from
        its workers in turn, starting with worker 0, and an uninterrupted epoch's batch i comes from
        reader i % readers; so a loader resumed at `start_batch` starts with that batch's reader."""
        return (self._worker() + self.start_batch) % self.readers

    def _passed_over(self, reader: int) -> int:
        """How many of this reader's batches come before the rank's `start_batch`."""
        return len(range(reader, self.start_batch, self.readers))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """This worker's batches of the epoch, from the rank's `start_batch` on (a resume mid-epoch).

        Each batch's augmentation draws from a torch seed of its own, (seed, epoch, rank, worker,
        batch), inside `torch.random.fork_rng`, so the training process's generator (dropout) is not
        touched when the loader runs in it, and a batch is the same whether the batches before it
        were augmented or passed over. Passing over reads, shuffles, draws and decodes as training
        would (the shuffle and the balanced draw depend on what came before; a sample that fails
        to decode is left out of its batch), but neither augments nor collates.
        """
        plan = self.plan()
        worker = self._reader()
        rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{worker}")
        skips = _Skips()
        raws = self._raw_samples(plan.assignments[self.rank][worker], skips, rng)
        passed_over = self._passed_over(worker)
        for produced in range(plan.batches_per_worker):
            if produced < passed_over:
                self._fill(raws, rng, skips, self._decoded)
                if produced + 1 == passed_over:
                    skips.take()  # counted by the attempt that trained those batches
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(self.seed, self.epoch, self.rank, worker, produced))
                batch = self._fill(raws, rng, skips, self._decode)
            out = default_collation_fn(batch, combine_scalars=True)
            out["skipped"] = skips.take()
            yield out

    def _fill(self, raws: Iterator[dict[str, Any]], rng: random.Random, skips: _Skips, decode: Callable[[Mapping[str, Any]], Any]) -> list:
        """One batch: `decode` of the next `batch_size` samples the balanced draw keeps and that decode."""
        batch: list = []
        while len(batch) < self.batch_size:
            raw = next(raws)
            if not self._keep(raw, rng):
                continue
            try:
                batch.append(decode(raw))
            except Exception as exc:  # a corrupt sample costs itself, not the run
                skips.add(raw["__key__"], f"skipping sample {raw['__key__']} from {raw.get('__url__')}: {exc}")
        return batch


def make_loader(stream: ShardStream, pin_memory: bool = False) -> DataLoader:
    """The DataLoader that matches the stream's plan: one process per planned loader worker.

    Batches are collated inside the workers (`batch_size=None` here), and the loader
    turns their numpy label arrays into tensors.
    """
    return DataLoader(stream, batch_size=None, num_workers=stream.loader_workers, pin_memory=pin_memory)
