"""`shards.split`: grouped, seeded train/val/test splits that pass `shards.verify`."""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from shards import CANONICAL, Sample, ShardWriter
from shards.phash import hashes
from shards.split import SplitConfig, SplitError, assign_groups, main, split_shard_set
from shards.verify import verify

FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}


def picture(seed: int) -> Image.Image:
    """A smooth random picture: low frequencies dominate, as in a face crop."""
    coarse = np.random.default_rng(seed).integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((64, 64), Image.Resampling.BICUBIC)


def encode(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def near_copy(image: Image.Image, mirror: bool) -> Image.Image:
    copy = image.resize((56, 56), Image.Resampling.BILINEAR)
    return ImageOps.mirror(copy) if mirror else copy


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, str]]]:
    """A crawl-like set in write order: single photos, videos of several frames, and near-copies of
    photos (re-encoded and resized, some mirrored) under other sources. Returns (dir, near pairs)."""
    root = tmp_path_factory.mktemp("split") / "web"
    samples: list[Sample] = []
    pairs: list[tuple[str, str]] = []
    seed = 0

    def add(key: str, image: Image.Image, source_id: str, page: str | None = None, quality: int = 90) -> None:
        nonlocal seed
        seed += 1
        meta = {"provider": "web", "source_id": source_id, "url": f"https://img.example/{key}.jpg",
                "page_url": page, "license": "cc-by", "creator": f"someone-{seed % 7}", "face_score": 0.99}
        samples.append(Sample(key=key, image=encode(image, quality), label=seed % len(CANONICAL), meta=meta))

    for i in range(40):
        add(f"photo-{i}", picture(1000 + i), f"photo-{i}")
    for v in range(12):  # video frames: one source id, one page
        for t in range(3):
            add(f"video-{v}-t{t}", picture(2000 + 10 * v + t), f"video-{v}", page=f"https://video.example/{v}")
    for i in range(12):  # near copies: another source, another page, another URL
        original = picture(3000 + i)
        add(f"orig-{i}", original, f"orig-{i}")
        add(f"copy-{i}", near_copy(original, mirror=i % 3 == 0), f"repost-{i}", quality=70)
        pairs.append((f"orig-{i}", f"copy-{i}"))
    for i in range(6):  # two faces of one photo: same source
        add(f"group-{i}-a", picture(4000 + i), f"group-{i}")
        add(f"group-{i}-b", picture(4100 + i), f"group-{i}")
    with ShardWriter(root, CANONICAL, max_samples=16) as writer:
        for sample in samples:
            writer.write(sample)
    return root, pairs


def manifests(out: Path) -> dict[str, list[dict]]:
    return {name: pq.read_table(out / name / "manifest.parquet").to_pylist() for name in FRACTIONS}


def test_planted_copies_are_near_and_others_are_not() -> None:
    """The fixture means what the split test assumes: copies within 8 bits, other pictures far apart."""
    for i in range(12):
        original, copy = picture(3000 + i), near_copy(picture(3000 + i), mirror=i % 3 == 0)
        h, h_mirror = hashes(Image.open(io.BytesIO(encode(original))))
        c, _ = hashes(Image.open(io.BytesIO(encode(copy, 70))))
        assert min((h ^ c).bit_count(), (h_mirror ^ c).bit_count()) <= 8
    others = [hashes(picture(1000 + i))[0] for i in range(40)]
    assert min((a ^ b).bit_count() for k, a in enumerate(others) for b in others[k + 1:]) > 8


def test_split_keeps_groups_together_and_passes_verify(source, tmp_path: Path) -> None:
    src, pairs = source
    result = split_shard_set(str(src), tmp_path, SplitConfig(fractions=FRACTIONS, seed=3, shard_size=10))
    original = {row["key"]: row for row in pq.read_table(src / "manifest.parquet").to_pylist()}
    outputs = manifests(tmp_path)

    split_of: dict[str, str] = {}
    for name, rows in outputs.items():
        for row in rows:
            assert row["key"] not in split_of, f"{row['key']} in {split_of.get(row['key'])} and {name}"
            split_of[row["key"]] = name
    assert set(split_of) == set(original)  # every sample exactly once

    by_source: dict[str, set[str]] = {}
    for key, name in split_of.items():
        by_source.setdefault(original[key]["source_id"], set()).add(name)
    assert all(len(names) == 1 for names in by_source.values())
    assert all(split_of[a] == split_of[b] for a, b in pairs)

    largest = 3  # a video's frames; near-copy pairs and two-face photos are 2
    total = len(original)
    for name, fraction in FRACTIONS.items():
        assert abs(len(outputs[name]) - fraction * total) <= largest
        assert sum(result.samples[name].values()) == len(outputs[name])

    for name, rows in outputs.items():
        assert verify(tmp_path / name).faults == []
        stats = json.loads((tmp_path / name / "stats.json").read_text())
        assert stats["shuffle_seed"] == 3 and stats["classes"] == list(CANONICAL)
        for row in rows:  # every manifest field kept; only where it lives and the split name change
            before = original[row["key"]]
            assert row["split"] == name
            assert {k: v for k, v in row.items() if k not in ("shard", "offset", "split")} == {
                k: v for k, v in before.items() if k not in ("shard", "offset", "split")}
    assert result.near_duplicate_links == len(pairs)
    assert result.group_totals["train"] + result.group_totals["val"] + result.group_totals["test"] == 40 + 12 + 12 + 6
    summary = json.loads((tmp_path / "split.json").read_text())
    assert summary["seed"] == 3 and summary["outputs"]["val"] == str(tmp_path / "val")


def test_split_is_deterministic_by_seed(source, tmp_path: Path) -> None:
    src, _ = source
    config = SplitConfig(fractions=FRACTIONS, seed=7, shard_size=10)
    split_shard_set(str(src), tmp_path / "a", config)
    split_shard_set(str(src), tmp_path / "b", config)
    split_shard_set(str(src), tmp_path / "c", SplitConfig(fractions=FRACTIONS, seed=8, shard_size=10))
    for name in FRACTIONS:
        tars = sorted(p.name for p in (tmp_path / "a" / name).glob("*.tar"))
        assert tars == sorted(p.name for p in (tmp_path / "b" / name).glob("*.tar"))
        for tar in tars:  # same samples in the same order: byte-identical shards
            assert (tmp_path / "a" / name / tar).read_bytes() == (tmp_path / "b" / name / tar).read_bytes()
    keys = {run: {n: [r["key"] for r in rows] for n, rows in manifests(tmp_path / run).items()} for run in "ac"}
    assert keys["a"] != keys["c"]
    assert {k for rows in keys["a"].values() for k in rows} == {k for rows in keys["c"].values() for k in rows}


def test_split_reads_sets_written_before_offsets(source, tmp_path: Path) -> None:
    src, _ = source
    old = tmp_path / "old"
    shutil.copytree(src, old)
    table = pq.read_table(old / "manifest.parquet")
    pq.write_table(table.drop_columns(["offset"]), old / "manifest.parquet")
    split_shard_set(str(old), tmp_path / "out", SplitConfig(fractions=FRACTIONS, seed=3, shard_size=10))
    assert sum(len(rows) for rows in manifests(tmp_path / "out").values()) == table.num_rows
    assert all(verify(tmp_path / "out" / name).faults == [] for name in FRACTIONS)


def test_existing_output_is_refused_by_name(source, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = source
    (tmp_path / "val").mkdir()
    with pytest.raises(SplitError, match=str(tmp_path / "val")):
        split_shard_set(str(src), tmp_path)
    assert main([str(src), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / "val") in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "train").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["val"]  # no staging directory left behind


@pytest.mark.parametrize("args, named", [
    (["--fractions", "train=0.8,val=0.3"], "sum to 1.1"),
    (["--fractions", "train=0.8,val"], "'val' is not name=fraction"),
    (["--fractions", "train/x=0.5,val=0.5"], "'train/x'"),
    (["--max-distance", "40"], "max_distance"),
])
def test_bad_settings_are_one_line_errors(source, tmp_path: Path, capsys, args, named) -> None:
    src, _ = source
    assert main([str(src), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and len(err.strip().splitlines()) == 1


def test_cli_prints_samples_and_groups_per_split_and_class(source, tmp_path: Path, capsys) -> None:
    src, _ = source
    assert main([str(src), "--out", str(tmp_path), "--fractions", "train=0.5,val=0.25,test=0.25", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "samples" in out and "groups" in out
    table = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split() and line.split()[0] in CANONICAL}
    assert set(table) == set(CANONICAL) and all(len(cells) == 6 for cells in table.values())
    counts = json.loads((tmp_path / "split.json").read_text())["samples"]
    assert [int(table["neutral"][k]) for k in (0, 2, 4)] == [counts[s]["neutral"] for s in ("train", "val", "test")]


def test_a_split_without_a_sample_is_an_error(tmp_path: Path) -> None:
    src = tmp_path / "one-source"
    with ShardWriter(src, CANONICAL) as writer:
        for t in range(4):
            writer.write(Sample(key=f"v-t{t}", image=encode(picture(t)), label=0, meta={"source_id": "v"}))
    with pytest.raises(SplitError, match="split 'val' gets no sample"):
        split_shard_set(str(src), tmp_path / "out")


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(1, 6), min_size=1, max_size=60),
       weights=st.lists(st.integers(1, 10), min_size=1, max_size=4), seed=st.integers(0, 10))
def test_every_split_is_within_one_group_of_its_target(sizes, weights, seed) -> None:
    group_of = [g for g, size in enumerate(sizes) for _ in range(size)]
    fractions = {f"s{i}": w / sum(weights) for i, w in enumerate(weights)}
    split_of = assign_groups(group_of, fractions, seed)
    counts = Counter(split_of)
    for name, fraction in fractions.items():
        assert abs(counts[name] - fraction * len(group_of)) <= max(sizes) + 1e-9
    assert all(len({split_of[i] for i, g in enumerate(group_of) if g == k}) == 1 for k in range(len(sizes)))
    assert assign_groups(group_of, fractions, seed) == split_of
