"""`python -m shards.split SRC --out DIR`: one shard set into train/val/test sets that share no source.

A random split by sample leaks: the faces of one photo, the frames of one video and the
reposted copies of one picture would land on both sides, and validation would measure
memory. So samples are grouped first (union-find) and whole groups are dealt to splits:
samples sharing a source (`provider` + `source_id`; for video frames that is the video
id), a page (`page_url`), an image URL or its bytes (`sha256`) are one group, and so are
near-duplicate images: pHash of the image or of its mirror within `max_distance` bits
(`shards.phash`).

Groups are dealt in a seeded random order, each to the split furthest below its target
(fraction x samples), which keeps every split within one group's size of its target.
Each split is written with `ShardWriter` in a seeded random order (recorded as
`shuffle_seed` in its stats.json), every manifest field kept. The splits are written
into a hidden staging directory inside DIR and renamed into place only when all are
complete; an output that already exists is refused. DIR may be an object-store URL
(`shards.fs`), where nothing renames: the splits are staged on local disk and uploaded
when all are complete, each split's `stats.json` last, so a reader never takes a
half-uploaded split for a set (an upload cut short leaves a split without one, which a
rerun refuses as existing: remove it first).
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import fsspec
import pyarrow as pa
from PIL import Image
from tqdm import tqdm

from shards.atomic import write_json
from shards.cli import ArgumentParser, add_log_level, bad_input, configure_logging
from shards.fs import UnknownScheme, exists, is_file, is_local, join, open_fs, upload
from shards.lock import OutputLock, OutputLocked
from shards.manifest import read_manifest
from shards.phash import BandIndex, hashes
from shards.pixels import image_size
from shards.reader import ShardSet, ShardSetError, open_shard_set
from shards.sample import IMAGE_EXTENSIONS, Sample
from shards.tario import iter_members, leading_sample, members_at
from shards.writer import ShardWriter

log = logging.getLogger(__name__)

DEFAULT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
SUMMARY_NAME = "split.json"
#: Manifest columns whose shared value puts samples in one group.
GROUP_COLUMNS = ("source_id", "page_url", "url", "sha256")
#: Shards held open at once while samples are read back in random order.
_OPEN_SHARDS = 32


class SplitError(ValueError):
    """The source set or the settings do not allow the split; the message names which."""


@dataclass(frozen=True)
class SplitConfig:
    """How to split: split name -> fraction (summing to 1), the seed, the near-duplicate distance, the shard size."""

    fractions: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_FRACTIONS))
    seed: int = 0
    max_distance: int = 8  # pHash bits; 8 separates copies from other faces (shards.phash)
    shard_size: int = 1000  # samples per output shard

    def validate(self) -> None:
        if not self.fractions:
            raise SplitError("fractions: name at least one split")
        for name, fraction in self.fractions.items():
            if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
                raise SplitError(f"fractions: split name {name!r} must be letters, digits, '_' or '-'")
            if not 0.0 < fraction <= 1.0:
                raise SplitError(f"fractions: {name}={fraction} must be in (0, 1]")
        if abs(sum(self.fractions.values()) - 1.0) > 1e-6:
            raise SplitError(f"fractions: {self.fractions} sum to {sum(self.fractions.values()):g}, not 1")
        if self.shard_size < 1:
            raise SplitError(f"shard_size must be >= 1, got {self.shard_size}")
        try:
            BandIndex(self.max_distance)
        except ValueError as exc:
            raise SplitError(f"max_distance: {exc}") from exc


def parse_fractions(text: str) -> dict[str, float]:
    """`train=0.8,val=0.1,test=0.1` -> {"train": 0.8, ...}, in the order given."""
    fractions: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            fractions[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise SplitError(f"fractions: {part!r} is not name=fraction (e.g. train=0.8,val=0.1,test=0.1)")
    return fractions


@dataclass
class SplitResult:
    """What a split wrote: per split, samples and groups per class (a group counts in every class it holds)."""

    source: str
    classes: list[str]
    config: SplitConfig
    outputs: dict[str, str] = field(default_factory=dict)  # split -> shard set directory
    samples: dict[str, Counter] = field(default_factory=dict)  # split -> class -> samples
    groups: dict[str, Counter] = field(default_factory=dict)  # split -> class -> groups holding that class
    group_totals: dict[str, int] = field(default_factory=dict)  # split -> groups
    near_duplicate_links: int = 0  # pHash matches between samples not already in one group

    def count(self, name: str, samples: Sequence[tuple[int, str]]) -> None:
        """Record split `name` from its samples' (group, class name) pairs."""
        self.samples[name] = Counter({c: 0 for c in self.classes})
        self.samples[name].update(label for _, label in samples)
        self.groups[name] = Counter({c: 0 for c in self.classes})
        self.groups[name].update(label for _, label in set(samples))
        self.group_totals[name] = len({group for group, _ in samples})

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "classes": self.classes,
            "fractions": self.config.fractions,
            "seed": self.config.seed,
            "max_distance": self.config.max_distance,
            "outputs": self.outputs,
            "samples": {s: dict(c) for s, c in self.samples.items()},
            "groups": {s: dict(c) for s, c in self.groups.items()},
            "group_totals": self.group_totals,
            "near_duplicate_links": self.near_duplicate_links,
        }

    def table(self) -> str:
        """Samples and groups per split per class, as printed at the end of a split."""
        splits = list(self.samples)
        width = max([len(c) for c in self.classes] + [5])
        head = f"{'':<{width}}" + "".join(f"{s:>16}" for s in splits)
        sub = f"{'class':<{width}}" + "".join(f"{'samples':>9}{'groups':>7}" for _ in splits)
        lines = [f"{self.source} -> " + ", ".join(f"{s}: {self.outputs[s]}" for s in splits), head, sub]
        for name in self.classes:
            cells = "".join(f"{self.samples[s][name]:>9}{self.groups[s][name]:>7}" for s in splits)
            lines.append(f"{name:<{width}}{cells}")
        lines.append(
            f"{'total':<{width}}"
            + "".join(f"{sum(self.samples[s].values()):>9}{self.group_totals[s]:>7}" for s in splits)
        )
        lines.append(f"near-duplicate links across sources: {self.near_duplicate_links}")
        return "\n".join(lines)


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> bool:
        """Join the groups of a and b; False when they were one group already."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        self.parent[max(ra, rb)] = min(ra, rb)
        return True


def _image_hashes(shard_set: ShardSet, keys: Sequence[str]) -> list[tuple[int, int]]:
    """(pHash, mirror pHash) of every sample's image, in the order of `keys`, reading each shard once."""
    position = {key: i for i, key in enumerate(keys)}
    found: list[tuple[int, int] | None] = [None] * len(keys)
    with tqdm(total=len(keys), desc="hash", unit="img", disable=None) as bar:
        for url in shard_set.shards:
            with fsspec.open(url, "rb") as f:
                for name, data in iter_members(f, url):
                    key, _, ext = name.partition(".")
                    if ext in IMAGE_EXTENSIONS and key in position:
                        try:
                            image_size(data)  # over the pixel cap: an error here, as any undecodable image
                            with Image.open(io.BytesIO(data)) as im:
                                found[position[key]] = hashes(im)
                        except Exception as exc:  # Pillow raises many types for bad bytes
                            raise SplitError(f"{url}: sample {key}: image does not decode ({exc}); "
                                             f"run python -m shards.verify {shard_set.url}") from exc
                        bar.update()
    missing = [keys[i] for i, h in enumerate(found) if h is None]
    if missing:
        raise SplitError(f"{shard_set.url}: {len(missing)} manifest rows have no image in the tars, e.g. "
                         f"{missing[:3]}; run python -m shards.verify {shard_set.url}")
    return found  # type: ignore[return-value]


def group_samples(rows: Sequence[dict[str, Any]], image_hashes: Sequence[tuple[int, int]],
                  max_distance: int) -> tuple[list[int], int]:
    """Each sample's group (the smallest sample index in it) and the number of near-duplicate links
    that joined groups no shared field had joined."""
    groups = _UnionFind(len(rows))
    first: dict[tuple[str, str], int] = {}
    for i, row in enumerate(rows):
        for column in GROUP_COLUMNS:
            value = row.get(column)
            if value:
                scope = (row.get("provider") or "") if column == "source_id" else ""
                groups.union(first.setdefault((column, f"{scope}\0{value}"), i), i)
    index = BandIndex(max_distance)
    links = 0
    for i, (value, mirror) in enumerate(image_hashes):
        for j in {*index.within(value), *index.within(mirror)}:
            links += groups.union(j, i)
        index.add(value)
    return [groups.find(i) for i in range(len(rows))], links


def assign_groups(group_of: Sequence[int], fractions: dict[str, float], seed: int) -> list[str]:
    """Each sample's split: groups in a random order drawn from `seed`, each to the split furthest
    below its target (fraction x samples; ties to the first named).

    Every split ends within the largest group's size of its target: a split still short by
    more than that at the end would have been the furthest below target at every step, so
    no group could ever have pushed another split past its target, and the targets add up
    to the whole set.
    """
    members: dict[int, list[int]] = {}
    for i, g in enumerate(group_of):
        members.setdefault(g, []).append(i)
    order = sorted(members)  # by smallest member: the same groups give the same order
    random.Random(seed).shuffle(order)
    names = list(fractions)
    total = len(group_of)
    filled = dict.fromkeys(names, 0)
    split_of = [""] * total
    for g in order:
        name = max(names, key=lambda s: (fractions[s] * total - filled[s], -names.index(s)))
        filled[name] += len(members[g])
        for i in members[g]:
            split_of[i] = name
    return split_of


class _OpenShards:
    """The last few shards read, kept open: samples come back in random order, mostly from other shards."""

    def __init__(self) -> None:
        self._files: OrderedDict[str, BinaryIO] = OrderedDict()

    def get(self, url: str) -> BinaryIO:
        if url in self._files:
            self._files.move_to_end(url)
        else:
            if len(self._files) >= _OPEN_SHARDS:
                self._files.popitem(last=False)[1].close()
            self._files[url] = fsspec.open(url, "rb").open()
        return self._files[url]

    def close(self) -> None:
        while self._files:
            self._files.popitem()[1].close()


def _read_image(f: BinaryIO, url: str, row: dict[str, Any], position: int) -> bytes:
    """The image bytes of the manifest row's sample: from its recorded offset, or by counting samples in
    sets written before offsets were recorded."""
    if row.get("offset") is None:
        f.seek(0)
        members = leading_sample(iter_members(f, url, position), row["key"])
    else:
        members = members_at(f, url, row["key"], row["offset"])
    if not members or row["ext"] not in members:
        raise SplitError(f"{url}: sample {row['key']} is not where the manifest says (offset {row.get('offset')}, "
                         f"sample {position}); run python -m shards.verify on the source set")
    return members[row["ext"]]


def _rows(table: pa.Table) -> Iterator[dict[str, Any]]:
    """The table's rows as dicts, a thousand at a time: a split's manifest rows, metadata included, can be large."""
    for batch in table.to_batches(max_chunksize=1000):
        yield from batch.to_pylist()


def _check_outputs(out: str, names: Sequence[str]) -> None:
    for name in names:
        if exists(join(out, name)):
            raise SplitError(f"{join(out, name)} already exists; remove it or choose another --out")


def _publish(staged: Path, out: str) -> None:
    """Move a finished split from local staging to `out`: a rename on this disk, else an upload with stats.json last."""
    fs, path = open_fs(out)
    if is_local(fs):
        os.rename(staged, path)
    else:
        upload(staged, out)


def _write_split(name: str, rows: Iterator[dict[str, Any]], places: Sequence[int], urls: dict[str, str],
                 shards: _OpenShards, directory: Path, classes: Sequence[str], config: SplitConfig) -> None:
    """Write one split's manifest rows, in the order given, as a shard set; `places` are their places in their shards."""
    with ShardWriter(directory, classes, max_samples=config.shard_size, shuffle_seed=config.seed) as writer:
        for place, row in zip(places, tqdm(rows, total=len(places), desc=f"write {name}", unit="img", disable=None)):
            url = urls[row["shard"]]
            image = _read_image(shards.get(url), url, row, place)
            writer.write(Sample(key=row["key"], image=image, label=row["label"], ext=row["ext"], split=name,
                                meta=json.loads(row["meta"]) if row["meta"] else {}))


def split_shard_set(src: str, out: str | os.PathLike, config: SplitConfig | None = None) -> SplitResult:
    """Split the shard set at `src` (a directory or fsspec URL) into `out/<split>` shard sets."""
    config = config or SplitConfig()
    config.validate()
    out = str(out)
    names = list(config.fractions)
    _check_outputs(out, names)
    try:
        shard_set = open_shard_set(src)
        manifest = read_manifest(src)
    except ShardSetError as exc:
        raise SplitError(str(exc)) from exc
    except (ValueError, OSError) as exc:  # a set file that does not parse or is missing
        raise SplitError(f"shard set {src}: {exc}") from exc
    if "offset" not in manifest.column_names:  # sets written before offsets were recorded
        manifest = manifest.append_column("offset", pa.nulls(manifest.num_rows, pa.int64()))
    grouping = manifest.select(["key", "shard", "label_name", "provider", *GROUP_COLUMNS]).to_pylist()
    group_of, links = group_samples(grouping, _image_hashes(shard_set, [r["key"] for r in grouping]),
                                    config.max_distance)
    split_of = assign_groups(group_of, config.fractions, config.seed)
    members = {name: [i for i, s in enumerate(split_of) if s == name] for name in names}
    result = SplitResult(source=str(src), classes=list(shard_set.classes), config=config, near_duplicate_links=links)
    for name, chosen in members.items():
        if not chosen:
            raise SplitError(f"split {name!r} gets no sample: {src} has {len(set(group_of))} groups of samples "
                             f"for {len(names)} splits; use fewer splits or larger fractions")
        result.count(name, [(group_of[i], grouping[i]["label_name"]) for i in chosen])

    place: list[int] = []  # each sample's place in its shard: manifest rows follow tar order
    seen: Counter = Counter()
    for row in grouping:
        place.append(seen[row["shard"]])
        seen[row["shard"]] += 1
    urls = {u.rsplit("/", 1)[-1]: u for u in shard_set.shards}
    with OutputLock(out) as lock:  # one split at a time into `out`
        # Staged beside the outputs on a local disk (one rename each), on local disk for a store.
        staging = Path(tempfile.mkdtemp(prefix=".split-", dir=open_fs(out)[1] if lock.local else None))
        shards = _OpenShards()
        try:
            for name, order in members.items():
                random.Random(f"{config.seed}:{name}").shuffle(order)
                _write_split(name, _rows(manifest.take(order)), [place[i] for i in order], urls, shards,
                             staging / name, result.classes, config)
            _check_outputs(out, names)  # nobody wrote them meanwhile
            for name in names:
                _publish(staging / name, join(out, name))
                result.outputs[name] = join(out, name)
        finally:
            shards.close()
            shutil.rmtree(staging, ignore_errors=True)
        write_json(join(out, SUMMARY_NAME), result.to_dict())
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m shards.split", description=__doc__.splitlines()[0])
    parser.add_argument("src", help="the shard set to split (a directory or an fsspec URL)")
    parser.add_argument("--out", required=True,
                        help="directory or object-store URL that receives one shard set per split (DIR/train, ...)")
    parser.add_argument("--fractions", default="train=0.8,val=0.1,test=0.1",
                        help="split=fraction pairs summing to 1 (default train=0.8,val=0.1,test=0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the group deal and the write order (default 0)")
    parser.add_argument("--max-distance", type=int, default=8,
                        help="pHash bits within which two images are near-duplicates (default 8, at most 15)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per output shard (default 1000)")
    add_log_level(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_level, "%(levelname)s %(name)s: %(message)s")
    try:
        config = SplitConfig(parse_fractions(args.fractions), args.seed, args.max_distance, args.shard_size)
        if is_file(args.out):
            raise SplitError(f"--out {args.out} exists and is not a directory")
        result = split_shard_set(args.src, args.out, config)
    except (SplitError, OutputLocked, UnknownScheme) as exc:  # OutputLocked: another split writes --out
        return bad_input(exc)
    print(result.table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
