"""`python -m shards.verify DIR`: check a shard set end to end before anyone trains on it.

DIR is a directory or an object-store URL (`shards.fs`): the same checks read the bytes the
trainer will read.

Reads every tar with the standard library (independently of the training reader, so
a reader bug cannot hide a data fault), and compares tars, manifest and sizes.
Exits non-zero on any fault, naming the shard and the key. It also reports how well the
set's order mixes the classes (`shards.mixing`) and warns, without failing, when the set
is class-sorted.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass, field
import pyarrow as pa
from PIL import Image
from tqdm import tqdm

from shards.cli import ArgumentParser, add_log_level, bad_input, configure_logging
from shards.fs import exists, is_dir, join, names, open_fs, read_json, read_parquet
from shards.manifest import MANIFEST_NAME
from shards.mixing import LOADER_WORKERS, Mixing, describe, measure
from shards.pixels import TooManyPixels, image_size
from shards.reader import open_shard_set
from shards.sample import IMAGE_EXTENSIONS
from shards.writer import SIZES_NAME, STATS_NAME


@dataclass
class Report:
    faults: list[str] = field(default_factory=list)
    per_class: Counter = field(default_factory=Counter)
    per_split: Counter = field(default_factory=Counter)
    samples: int = 0
    labels: dict[str, list[int]] = field(default_factory=dict)  # shard URL -> labels in tar order
    mixing: Mixing | None = None  # None when the set has faults or too few samples to simulate


def _read_tar(url: str, report: Report) -> dict[str, dict[str, bytes]]:
    """Members of one tar grouped by key (split at the first dot, as WebDataset does)."""
    groups: dict[str, dict[str, bytes]] = {}
    fs, path = open_fs(url)
    name = path.rsplit("/", 1)[-1]
    size = fs.size(path)
    with fs.open(path, "rb") as f:
        f.seek(max(0, size - 1024))
        ending = f.read()
    if size % 512 or ending != bytes(1024):
        # tarfile stops quietly at a cut between members; a complete tar ends with two zero blocks.
        report.faults.append(f"{name}: truncated or unreadable tar (no end-of-archive marker)")
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} truncated")
                members = groups.setdefault(key, {})
                if ext in members:
                    report.faults.append(f"{name}: duplicate key {key} within the shard ({member.name} twice)")
                members[ext] = data
    except (tarfile.TarError, OSError, EOFError) as exc:
        report.faults.append(f"{name}: truncated or unreadable tar ({exc})")
    return groups


@dataclass(frozen=True)
class Checked:
    """What a sample's members say, for comparison with its manifest row."""

    label: int
    sha256: str
    size: tuple[int, int] | None  # None: the image does not decode


def _check_sample(shard: str, key: str, members: dict[str, bytes], classes: list[str], report: Report) -> Checked | None:
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    missing = [m for m in ("cls", "json") if m not in members] + ([] if image_ext else ["image"])
    if missing:
        report.faults.append(f"{shard}: sample {key} has no {', '.join(missing)}")
        return None
    try:
        label = int(members["cls"])
    except ValueError:
        report.faults.append(f"{shard}: sample {key} has a non-integer cls {members['cls'][:20]!r}")
        return None
    if not 0 <= label < len(classes):
        report.faults.append(f"{shard}: sample {key} has cls {label} outside the class list {classes}")
        return None
    try:
        json.loads(members["json"])
    except ValueError as exc:
        report.faults.append(f"{shard}: sample {key} has unreadable json ({exc})")
    image = members[image_ext]  # type: ignore[index]
    size = None
    try:
        image_size(image)  # a header over the pixel cap is a fault, and is not decoded here either
        with Image.open(io.BytesIO(image)) as im:
            im.load()
            size = im.size
    except TooManyPixels as exc:
        report.faults.append(f"{shard}: sample {key} image {exc}: readers skip it")
    except Exception as exc:  # Pillow raises many types for bad bytes
        report.faults.append(f"{shard}: sample {key} image does not decode ({exc})")
    return Checked(label, hashlib.sha256(image).hexdigest(), size)


def _disagreements(checked: Checked, row: dict, shard: str) -> list[str]:
    """The manifest fields of `row` that the sample itself contradicts."""
    found = {"shard": shard, "label": checked.label, "sha256": checked.sha256}
    if checked.size is not None:
        found["width"], found["height"] = checked.size
    return [f"{name} {row[name]!r} (the sample's: {value!r})" for name, value in found.items() if row[name] != value]


def _set_files(root: str) -> tuple[list[str], dict[str, int], list[dict]]:
    """The class list, shard sizes and manifest rows; ValueError naming the file that cannot be read as one.

    Without them nothing can be checked, so they are errors of the input, not faults of the set.
    """
    stats, sizes = read_json(join(root, STATS_NAME)), read_json(join(root, SIZES_NAME))
    if not isinstance(stats, dict) or not isinstance(stats.get("classes"), list):
        raise ValueError(f"{join(root, STATS_NAME)}: holds no class list")
    if not isinstance(sizes, dict) or not all(isinstance(n, int) for n in sizes.values()):
        raise ValueError(f"{join(root, SIZES_NAME)}: is not a mapping of shard names to sample counts")
    columns = ["key", "shard", "label", "split", "sha256", "width", "height"]
    try:
        manifest = read_parquet(join(root, MANIFEST_NAME), columns=columns).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{join(root, MANIFEST_NAME)}: not a readable manifest ({exc})") from exc
    return stats["classes"], sizes, manifest


def verify(root: str | os.PathLike) -> Report:
    """Check the set at the directory or URL `root`; its faults are in the report. ValueError when `root` is no
    directory or a set-level file (stats, sizes, manifest) cannot be read at all."""
    root = str(root)
    if not is_dir(root):
        raise ValueError(f"{root}: no such directory")
    report = Report()
    for name in (STATS_NAME, SIZES_NAME, MANIFEST_NAME):
        if not exists(join(root, name)):
            report.faults.append(f"{root}: {name} is missing")
    if report.faults:
        return report
    classes, sizes, manifest = _set_files(root)
    by_key = {row["key"]: row for row in manifest}
    seen: dict[str, str] = {}
    tars = names(root, "*.tar")
    shard_set = open_shard_set(root)
    urls = dict(zip(sorted(sizes), shard_set.shards))
    for shard in sorted(set(tars) - set(sizes)):
        report.faults.append(f"{shard}: tar not listed in {SIZES_NAME}")
    for shard in tqdm(sorted(sizes), desc="verify", unit="shard"):
        if shard not in tars:
            report.faults.append(f"{shard}: listed in {SIZES_NAME} but missing")
            continue
        groups = _read_tar(join(root, shard), report)
        if len(groups) != sizes[shard]:
            report.faults.append(f"{shard}: {len(groups)} samples, {SIZES_NAME} says {sizes[shard]}")
        for key, members in groups.items():
            if key in seen:
                report.faults.append(f"duplicate key {key} in {seen[key]} and {shard}")
                continue
            seen[key] = shard
            checked = _check_sample(shard, key, members, classes, report)
            row = by_key.get(key)
            if row is None:
                report.faults.append(f"{shard}: sample {key} has no manifest row")
            elif row["shard"] != shard:
                report.faults.append(f"{shard}: sample {key} is listed in the manifest under shard {row['shard']}")
            elif checked is not None and (wrong := _disagreements(checked, row, shard)):
                report.faults.append(f"{shard}: sample {key} disagrees with its manifest row: {'; '.join(wrong)}")
            if checked is not None:
                report.labels.setdefault(urls[shard], []).append(checked.label)
                report.samples += 1
                report.per_class[classes[checked.label]] += 1
                report.per_split[row["split"] if row else "?"] += 1
    for row in manifest:
        if row["key"] not in seen:
            report.faults.append(f"manifest row {row['key']} (shard {row['shard']}) has no sample")
    if len(by_key) != len(manifest):
        dupes = [k for k, n in Counter(r["key"] for r in manifest).items() if n > 1]
        report.faults.append(f"{MANIFEST_NAME}: duplicate keys {dupes[:5]}")
    if not report.faults and report.samples >= LOADER_WORKERS:
        report.mixing = measure(shard_set, report.labels)
    return report


def _table(title: str, counts: Counter) -> str:
    width = max([len(title)] + [len(k) for k in counts])
    lines = [f"{title:<{width}}  samples"] + [f"{k:<{width}}  {v:>7}" for k, v in counts.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m shards.verify", description=__doc__.splitlines()[0],
                            epilog="Exit status 0 for a sound set, 1 when it has faults, 2 when it cannot be read as one.")
    parser.add_argument("dir", help="shard set directory or object-store URL (s3://..., gs://...)")
    add_log_level(parser, default="WARNING")
    args = parser.parse_args(argv)
    configure_logging(args.log_level, "%(levelname)s %(name)s: %(message)s")
    try:
        report = verify(args.dir)
    except ValueError as exc:  # ShardSetError too
        return bad_input(exc)
    print(_table("class", report.per_class))
    print(_table("split", report.per_split))
    print(f"{report.samples} samples checked")
    if report.mixing is not None:
        print("\n".join(describe(report.mixing, args.dir)))
    if report.faults:
        for fault in report.faults[:50]:
            print(f"FAULT {fault}", file=sys.stderr)
        print(f"{len(report.faults)} faults in {args.dir}", file=sys.stderr)
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
