"""The shard format: writer, plain-library readability, crash safety, verify, reader splitting."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds

from shards import (
    CANONICAL,
    DuplicateKeyError,
    Sample,
    ShardSetError,
    ShardStream,
    ShardWriter,
    key_from_bytes,
    make_loader,
    open_shard_set,
    read_manifest,
)
from shards import verify as verify_mod
from tests.conftest import jpeg_bytes, write_shard_set


def test_writer_caps_shards_and_writes_set_files(tmp_path: Path) -> None:
    keys = write_shard_set(tmp_path, [5])
    rng = np.random.default_rng(1)
    with ShardWriter(tmp_path, CANONICAL, max_samples=3) as writer:
        for i in range(7):
            data = jpeg_bytes(rng)
            writer.write(Sample(key=key_from_bytes(data), image=data, label=i % 8, meta={"query": "q", "lang": "en"}))
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert sizes == {"shard-000000.tar": 5, "shard-000001.tar": 3, "shard-000002.tar": 3, "shard-000003.tar": 1}
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["classes"] == list(CANONICAL)
    assert stats["num_samples"] == 12 and sum(stats["per_class"].values()) == 12
    manifest = pq.read_table(tmp_path / "manifest.parquet")
    assert manifest.num_rows == 12
    assert set(keys) <= set(manifest.column("key").to_pylist())
    for column in ("key", "shard", "label", "label_name", "split", "sha256", "width", "height", "provider", "query"):
        assert column in manifest.column_names
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_byte_cap_closes_shards(tmp_path: Path, rng: np.random.Generator) -> None:
    images = [jpeg_bytes(rng, 48) for _ in range(6)]
    cap = len(images[0]) * 2
    with ShardWriter(tmp_path, CANONICAL, max_samples=100, max_bytes=cap) as writer:
        for data in images:
            writer.write(Sample(key=key_from_bytes(data), image=data, label=0))
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert sum(sizes.values()) == 6 and len(sizes) >= 3
    for shard in sorted(sizes)[:-1]:  # a shard closes on the sample that reaches the cap, in tar bytes
        with tarfile.open(tmp_path / shard) as tar:
            per_sample = Counter()
            for m in tar:
                per_sample[m.name.partition(".")[0]] += 512 + -(-m.size // 512) * 512
        stats = json.loads((tmp_path / shard.replace(".tar", "_stats.json")).read_text())
        assert stats["bytes"] == sum(per_sample.values()) >= cap
        assert stats["bytes"] - per_sample[list(per_sample)[-1]] < cap  # below the cap before its last sample


def test_set_opens_with_plain_webdataset_and_pyarrow(tmp_path: Path) -> None:
    keys = write_shard_set(tmp_path, [4, 3])
    urls = sorted(str(p) for p in tmp_path.glob("*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == keys
    first = samples[0]
    assert first["jpg"].size == (32, 32)
    assert isinstance(first["cls"], int) and first["json"]["label_name"] == CANONICAL[first["cls"]]
    table = pq.read_table(tmp_path / "manifest.parquet")
    assert table.column("key").to_pylist() == keys


def test_set_opens_with_ray_data(tmp_path: Path, local_ray: str) -> None:
    import ray

    keys = write_shard_set(tmp_path, [4, 3])
    tars = sorted(str(p) for p in tmp_path.glob("*.tar"))
    rows = ray.data.read_webdataset(tars, decoder=None).take_all()
    assert sorted(r["__key__"] for r in rows) == sorted(keys)
    assert all(r["jpg"] for r in rows)


def test_duplicate_key_is_refused_naming_both_places(tmp_path: Path, rng: np.random.Generator) -> None:
    data = jpeg_bytes(rng)
    with ShardWriter(tmp_path, CANONICAL, max_samples=1) as writer:
        writer.write(Sample(key="same", image=data, label=0))
    with ShardWriter(tmp_path, CANONICAL) as writer:
        with pytest.raises(DuplicateKeyError) as err:
            writer.write(Sample(key="same", image=data, label=1))
    assert "shard-000000.tar" in str(err.value) and "shard-000001.tar" in str(err.value)


def test_bad_keys_and_classes_are_refused(tmp_path: Path, rng: np.random.Generator) -> None:
    with pytest.raises(ValueError, match="no dots"):
        Sample(key="a.b", image=jpeg_bytes(rng), label=0)
    with pytest.raises(ValueError, match="canonical order"):
        ShardWriter(tmp_path, ["happiness", "neutral"])
    write_shard_set(tmp_path, [2])
    with pytest.raises(ValueError, match="stats.json"):
        ShardWriter(tmp_path, ["neutral", "happiness"])


KILLED_WRITER = textwrap.dedent(
    """
    import os, sys, numpy as np
    from shards import CANONICAL, Sample, ShardWriter, key_from_bytes
    from tests.conftest import jpeg_bytes
    rng = np.random.default_rng(int(sys.argv[2]))
    writer = ShardWriter(sys.argv[1], CANONICAL, max_samples=4)
    for i in range(10):
        data = jpeg_bytes(rng)
        writer.write(Sample(key=key_from_bytes(data), image=data, label=i % 8))
        if i == 5:  # shard 0 finished, shard 1 half written
            print("READY", flush=True)
            sys.stdin.read()
    """
)


def test_killed_writer_leaves_no_partial_shard_and_extends_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "set"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(out), "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.stdout.readline().strip() == "READY"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finals = sorted(p.name for p in out.glob("*.tar"))
    assert finals == ["shard-000000.tar"]  # the half-written shard exists only as a temp file
    with tarfile.open(out / "shard-000000.tar") as tar:
        assert len(tar.getnames()) == 4 * 3
    assert any(p.name.endswith(".tmp") for p in out.iterdir())
    # Extending: the first 4 samples come again (same seed) and must be skipped, not duplicated.
    rng = np.random.default_rng(0)
    with ShardWriter(out, CANONICAL, max_samples=4) as writer:
        for i in range(10):
            data = jpeg_bytes(rng)
            key = key_from_bytes(data)
            if key not in writer:
                writer.write(Sample(key=key, image=data, label=i % 8))
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())
    keys = read_manifest(str(out)).column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 10
    assert verify_mod.main([str(out)]) == 0


def _fault(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert verify_mod.main([str(tmp_path)]) == 1
    return capsys.readouterr().err


def test_verify_passes_a_good_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_shard_set(tmp_path, [3, 2])
    assert verify_mod.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "5 samples checked" in out and "train" in out


def test_verify_catches_truncated_tar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_shard_set(tmp_path, [3, 2])
    tar = tmp_path / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[:1500])
    assert "shard-000001.tar: truncated or unreadable tar" in _fault(tmp_path, capsys)


def _rewrite_tar(
    path: Path, drop: str | None = None, replace: dict[str, bytes] | None = None, append: dict[str, bytes] | None = None
) -> None:
    """Rewrite a tar in place without member `drop`, with `replace`d member bodies and `append`ed members."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    members += [(tarfile.TarInfo(name), data) for name, data in (append or {}).items()]
    with tarfile.open(path, "w") as tar:
        for member, data in members:
            if member.name == drop:
                continue
            data = (replace or {}).get(member.name, data)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def _members_of(path: Path, key: str) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name.startswith(f"{key}.")}


def test_verify_catches_sample_without_cls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = write_shard_set(tmp_path, [3])
    _rewrite_tar(tmp_path / "shard-000000.tar", drop=f"{keys[0]}.cls")
    assert f"sample {keys[0]} has no cls" in _fault(tmp_path, capsys)


def test_verify_catches_undecodable_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = write_shard_set(tmp_path, [3])
    _rewrite_tar(tmp_path / "shard-000000.tar", replace={f"{keys[1]}.jpg": b"\xff\xd8\xff garbage"})
    assert f"sample {keys[1]} image does not decode" in _fault(tmp_path, capsys)


def test_verify_catches_duplicate_key_across_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = write_shard_set(tmp_path, [2, 2])
    _rewrite_tar(tmp_path / "shard-000001.tar", append=_members_of(tmp_path / "shard-000000.tar", keys[0]))
    err = _fault(tmp_path, capsys)
    assert f"duplicate key {keys[0]} in shard-000000.tar and shard-000001.tar" in err


def test_verify_catches_duplicate_key_within_a_shard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = write_shard_set(tmp_path, [3])
    # The copy comes after another sample, so a reader grouping neighbours would yield it twice.
    _rewrite_tar(tmp_path / "shard-000000.tar", append=_members_of(tmp_path / "shard-000000.tar", keys[0]))
    assert f"shard-000000.tar: duplicate key {keys[0]} within the shard ({keys[0]}.jpg twice)" in _fault(tmp_path, capsys)


def test_verify_catches_a_manifest_row_the_sample_contradicts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pyarrow as pa

    keys = write_shard_set(tmp_path, [3])
    table = pq.read_table(tmp_path / "manifest.parquet")
    row = table.column("key").to_pylist().index(keys[1])
    sha = table.column("sha256").to_pylist()
    width = table.column("width").to_pylist()
    sha[row], width[row] = "0" * 64, 999
    table = table.set_column(table.schema.get_field_index("sha256"), "sha256", pa.array(sha, pa.string()))
    table = table.set_column(table.schema.get_field_index("width"), "width", pa.array(width, pa.int32()))
    pq.write_table(table, tmp_path / "manifest.parquet")
    err = _fault(tmp_path, capsys)
    assert f"shard-000000.tar: sample {keys[1]} disagrees with its manifest row: sha256 '{'0' * 64}'" in err
    assert "width 999 (the sample's: " in err and keys[0] not in err and keys[2] not in err


def test_verify_catches_manifest_row_without_sample(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pyarrow as pa

    write_shard_set(tmp_path, [2])
    table = pq.read_table(tmp_path / "manifest.parquet")
    ghost = table.slice(0, 1).set_column(0, "key", pa.array(["ghost"]))
    pq.write_table(pa.concat_tables([table, ghost]), tmp_path / "manifest.parquet")
    assert "manifest row ghost (shard shard-000000.tar) has no sample" in _fault(tmp_path, capsys)


def _identity(image):  # top-level so loader workers can pickle it
    return np.asarray(image.resize((8, 8)), dtype=np.uint8)


@pytest.mark.parametrize("sizes", [[9, 2, 7, 3, 5, 1, 4, 6], [37]], ids=["8 uneven shards", "one shard"])
def test_reader_gives_every_rank_the_same_batches_and_covers_the_set(tmp_path: Path, sizes: list[int]) -> None:
    """37 samples on 2 ranks x 2 loader workers: fewer shards than pieces wanted, or than readers, are split by sample."""
    keys = write_shard_set(tmp_path, sizes)
    shard_set = open_shard_set(str(tmp_path))
    seen: Counter[str] = Counter()
    lengths = []
    for rank in range(2):
        stream = ShardStream(shard_set, rank=rank, world_size=2, loader_workers=2, batch_size=4,
                             transform=_identity, seed=3, shuffle_buffer=8, interleave=4)
        stream.set_epoch(2)
        batches = list(make_loader(stream))
        lengths.append(len(batches))
        assert len(batches) == len(stream)
        manifest = read_manifest(str(tmp_path), columns=["key"]).column("key").to_pylist()
        for batch in batches:
            assert batch["image"].shape == (4, 8, 8, 3)
            assert len(batch["key"]) == 4 and batch["label"].shape == (4,)
            assert [manifest[row] for row in batch["row"].tolist()] == list(batch["key"])  # rows of the manifest
            seen.update(batch["key"])
    assert lengths[0] == lengths[1]
    assert set(seen) == set(keys)


def test_reader_order_depends_on_epoch_not_on_run(tmp_path: Path) -> None:
    write_shard_set(tmp_path, [3] * 8)
    shard_set = open_shard_set(str(tmp_path))

    def keys_of(epoch: int) -> list[str]:
        stream = ShardStream(shard_set, rank=0, world_size=2, loader_workers=0, batch_size=3,
                             transform=_identity, seed=0)
        stream.set_epoch(epoch)
        return [k for b in make_loader(stream) for k in b["key"]]

    assert keys_of(1) == keys_of(1)
    assert keys_of(1) != keys_of(2)


def test_pieces_start_at_recorded_offsets_and_survive_a_rewritten_shard(tmp_path: Path) -> None:
    """Pieces seek to the manifest's offsets; a shard rewritten since (offsets stale) is read by its headers."""
    from shards.tario import name_at

    keys = write_shard_set(tmp_path, [12])
    offsets = pq.read_table(tmp_path / "shard-000000.parquet", columns=["key", "offset"]).to_pylist()
    with open(tmp_path / "shard-000000.tar", "rb") as f:
        assert [name_at(f, row["offset"]) for row in offsets] == [f"{k}.cls" for k in keys]
    _rewrite_tar(tmp_path / "shard-000000.tar", replace={f"{keys[0]}.jpg": b"not a jpeg"})
    stream = ShardStream(open_shard_set(str(tmp_path)), rank=0, world_size=1, loader_workers=0, batch_size=11,
                         transform=_identity, interleave=6)
    batch = next(iter(make_loader(stream)))
    assert sorted(batch["key"]) == sorted(keys[1:]) and int(batch["skipped"]) == 1


def test_reader_refuses_fewer_samples_than_readers(tmp_path: Path) -> None:
    write_shard_set(tmp_path, [1, 2])
    with pytest.raises(ShardSetError, match="holds 3 samples, fewer than the 4 readers"):
        ShardStream(open_shard_set(str(tmp_path)), rank=0, world_size=2, loader_workers=2, batch_size=2,
                    transform=_identity)


def test_reader_errors_name_the_set(tmp_path: Path) -> None:
    with pytest.raises(ShardSetError, match="no such directory"):
        open_shard_set(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardSetError, match="sizes.json is missing"):
        open_shard_set(str(tmp_path / "empty"))


def test_reader_skips_and_counts_corrupt_samples_and_applies_overrides(tmp_path: Path) -> None:
    keys = write_shard_set(tmp_path, [8])
    _rewrite_tar(tmp_path / "shard-000000.tar", replace={f"{keys[0]}.jpg": b"not a jpeg"})
    shard_set = open_shard_set(f"file://{tmp_path}")  # fsspec URL, as object stores are read
    # Batches of 3 from 7 good samples: the worker reads its shard a second time and meets the
    # corrupt sample (the first) again, which is still one sample skipped.
    stream = ShardStream(shard_set, rank=0, world_size=1, loader_workers=1, batch_size=3,
                         transform=_identity, overrides={keys[1]: 7})
    batches = list(make_loader(stream))
    assert len(batches) == 3 and sum(int(b["skipped"]) for b in batches) == 1
    got = {k: int(lbl) for b in batches for k, lbl in zip(b["key"], b["label"])}
    assert keys[0] not in got and got[keys[1]] == 7


def test_reader_with_nothing_decodable_stops_with_an_error(tmp_path: Path) -> None:
    keys = write_shard_set(tmp_path, [2])
    _rewrite_tar(tmp_path / "shard-000000.tar", replace={f"{k}.jpg": b"not a jpeg" for k in keys})
    stream = ShardStream(open_shard_set(str(tmp_path)), rank=0, world_size=1, loader_workers=0, batch_size=2,
                         transform=_identity)
    with pytest.raises(ShardSetError, match="no readable sample"):
        list(make_loader(stream))


def test_fast_tar_reader_agrees_with_tarfile(tmp_path: Path) -> None:
    from shards.tario import iter_members

    write_shard_set(tmp_path, [5])
    ours = tmp_path / "shard-000000.tar"
    # A tar from another tool: PAX format with a name too long for the ustar field.
    other = tmp_path / "other.tar"
    with tarfile.open(other, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("k" * 150 + ".jpg", b"abc"), ("dir/x.cls", b"3"), ("y.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    for path in (ours, other):
        with tarfile.open(path) as tar:
            expected = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
        with open(path, "rb") as f:
            assert list(iter_members(f, str(path))) == expected


def test_fast_tar_reader_reports_truncation(tmp_path: Path) -> None:
    from shards.tario import TarFormatError, iter_members

    write_shard_set(tmp_path, [3])
    data = (tmp_path / "shard-000000.tar").read_bytes()
    with pytest.raises(TarFormatError, match="truncated"):
        list(iter_members(io.BytesIO(data[:1000]), "cut.tar"))


def test_balanced_stream_draws_classes_equally(tmp_path: Path, rng: np.random.Generator) -> None:
    classes = ("neutral", "happiness")
    with ShardWriter(tmp_path, classes, max_samples=50) as writer:
        for i in range(200):  # 160 neutral, 40 happiness
            data = jpeg_bytes(rng, 8)
            writer.write(Sample(key=key_from_bytes(data), image=data, label=int(i % 5 == 0)))
    shard_set = open_shard_set(str(tmp_path))
    assert shard_set.class_counts == (160, 40)
    labels = []
    for epoch in range(1, 4):
        stream = ShardStream(shard_set, rank=0, world_size=1, loader_workers=0, batch_size=10,
                             transform=_identity, balanced=True, seed=epoch)
        labels += [int(x) for b in make_loader(stream) for x in b["label"]]
    share = sum(labels) / len(labels)
    assert 0.38 < share < 0.62, share  # unbalanced it would be 0.2


def test_balanced_stream_weighs_the_label_training_uses(tmp_path: Path, rng: np.random.Generator) -> None:
    """Overrides (synthetic noise) and a caller's labels (the trainer's relabel table, per epoch) decide the
    balance, not the label in the shard: drawn by the shard's labels these epochs would be 7 of 8 "happiness"."""
    classes = ("neutral", "happiness")
    with ShardWriter(tmp_path, classes, max_samples=50) as writer:
        for i in range(200):  # 160 neutral, 40 happiness in the shards
            data = jpeg_bytes(rng, 8)
            writer.write(Sample(key=key_from_bytes(data), image=data, label=int(i % 5 == 0)))
    shard_set = open_shard_set(str(tmp_path))
    keys = read_manifest(str(tmp_path), columns=["key", "label"]).to_pydict()
    neutral = [k for k, label in zip(keys["key"], keys["label"]) if label == 0]
    overrides = {k: 1 for k in neutral[:120]}  # trained on: 40 neutral, 160 happiness
    train_labels, rows = [], []
    for epoch in range(1, 4):
        stream = ShardStream(shard_set, rank=0, world_size=1, loader_workers=0, batch_size=10,
                             transform=_identity, balanced=True, seed=epoch, overrides=overrides)
        for batch in make_loader(stream):
            train_labels += [int(x) for x in batch["label"]]
    share = sum(train_labels) / len(train_labels)
    assert 0.38 < share < 0.62, share

    relabeled = np.zeros(200, dtype=np.int64)
    relabeled[:30] = 1  # a table that moved every label: 30 rows of happiness, 170 of neutral
    for epoch in range(1, 4):
        stream = ShardStream(shard_set, rank=0, world_size=1, loader_workers=0, batch_size=10,
                             transform=_identity, balanced=True, seed=epoch, labels=relabeled)
        rows += [int(r) for batch in make_loader(stream) for r in batch["row"]]
    share = relabeled[rows].mean()
    assert 0.38 < share < 0.62, share  # by the shards' labels (or none) about 0.15



@pytest.mark.parametrize("loader_workers", [0, 2])
def test_a_stream_resumed_mid_epoch_gives_the_rest_of_the_epoch_exactly(tmp_path: Path, loader_workers: int) -> None:
    """start_batch=k: batches k.. of the uninterrupted epoch, images included (the training augmentation
    is random), each sample once; a corrupt sample among the passed-over ones leaves the same gap; the
    training process's own generator advances the same (only the DataLoader's seed draw touches it)."""
    from scn_scale.data import decode_rgb, train_transform

    keys = write_shard_set(tmp_path, [7, 5, 9, 6, 8, 5])
    _rewrite_tar(tmp_path / "shard-000000.tar", replace={f"{keys[1]}.jpg": b"not a jpeg"})
    shard_set = open_shard_set(str(tmp_path))

    def batches(start: int) -> list[dict]:
        stream = ShardStream(shard_set, rank=1, world_size=2, loader_workers=loader_workers, batch_size=3,
                             transform=train_transform(16), decode=decode_rgb, seed=5, shuffle_buffer=6,
                             interleave=2, balanced=True, start_batch=start)
        stream.set_epoch(3)
        return list(make_loader(stream))

    torch.manual_seed(0)
    whole = batches(0)
    after_whole = torch.get_rng_state()
    torch.manual_seed(0)
    resumed = batches(3)
    assert torch.equal(torch.get_rng_state(), after_whole)  # augmenting more or fewer batches drew nothing from it
    assert len(whole) >= 5 and len(resumed) == len(whole) - 3
    for got, want in zip(resumed, whole[3:]):
        assert list(got["key"]) == list(want["key"]) and torch.equal(got["image"], want["image"])
        assert torch.equal(got["label"], want["label"])
    assert not any(torch.equal(a["image"], b["image"]) for a, b in zip(whole, whole[1:]))  # augmented
