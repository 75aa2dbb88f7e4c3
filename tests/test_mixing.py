"""Batches that mix the classes whatever order a set was written in, and `shards.verify`'s view of it.

The sets here are the case the reader must survive: 8 classes x 600 images, written class
by class into shards of 1,000 (as `shards.ShardWriter` fed by another tool writes them),
and the same tree through the ImageFolder importer at its defaults.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from scn_scale.data import shard_loader
from scn_scale.importers.__main__ import main as import_main
from shards import CANONICAL, Sample, ShardWriter, key_from_bytes, open_shard_set
from shards import verify as verify_mod
from tests.conftest import jpeg_bytes

PER_CLASS = 600
BATCH = 32


def _images(rng: np.random.Generator) -> list[tuple[int, bytes]]:
    """(label, JPEG) class by class, 8 x PER_CLASS small images."""
    return [(label, jpeg_bytes(rng, 8, label)) for label in range(len(CANONICAL)) for _ in range(PER_CLASS)]


@pytest.fixture(scope="module")
def images() -> list[tuple[int, bytes]]:
    return _images(np.random.default_rng(0))


@pytest.fixture(scope="module")
def class_sorted(tmp_path_factory: pytest.TempPathFactory, images: list[tuple[int, bytes]]) -> Path:
    out = tmp_path_factory.mktemp("sorted")
    with ShardWriter(out, CANONICAL, max_samples=1000) as writer:
        for label, data in images:
            writer.write(Sample(key=key_from_bytes(data), image=data, label=label))
    return out


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory, images: list[tuple[int, bytes]]) -> Path:
    """The same images as an ImageFolder tree, imported with `python -m scn_scale.importers imagefolder` defaults."""
    root = tmp_path_factory.mktemp("tree")
    for i, (label, data) in enumerate(images):
        folder = root / "tree" / CANONICAL[label]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}.jpg").write_bytes(data)
    assert import_main(["imagefolder", "--root", str(root / "tree"), "--out", str(root / "set")]) == 0
    return root / "set"


def _batch_mixing(shard_dir: Path, world_size: int, **mixing: int) -> tuple[float, float]:
    """(distinct classes per batch, top-class share per batch), averaged over every rank's epoch-1 batches."""
    shard_set = open_shard_set(str(shard_dir))
    distinct, top = [], []
    for rank in range(world_size):
        loader = shard_loader(shard_set, train=True, image_size=8, batch_size=BATCH, rank=rank,
                              world_size=world_size, loader_workers=2, **mixing)
        for batch in loader:
            counts = Counter(batch["label"].tolist())
            distinct.append(len(counts))
            top.append(max(counts.values()) / BATCH)
    return float(np.mean(distinct)), float(np.mean(top))


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("which", ["class_sorted", "imported"])
def test_training_batches_mix_the_classes(which: str, world_size: int, request: pytest.FixtureRequest) -> None:
    distinct, top = _batch_mixing(request.getfixturevalue(which), world_size)
    print(f"{which}, {world_size} rank(s): {distinct:.2f} classes per batch, top class {top:.2f}")
    assert distinct >= 6.5 and top <= 0.40, (distinct, top)


def test_the_class_sorted_set_does_not_mix_shard_by_shard(class_sorted: Path) -> None:
    """The set really is the hard case: read a shard at a time with no buffer, batches hold one or two classes."""
    distinct, top = _batch_mixing(class_sorted, 1, interleave=1, shuffle_buffer=0)
    assert distinct < 2.5 and top > 0.7, (distinct, top)


def test_importers_write_in_a_seeded_random_order(imported: Path, images: list[tuple[int, bytes]]) -> None:
    stats = json.loads((imported / "stats.json").read_text())
    assert stats["shuffle_seed"] == 0 and stats["num_samples"] == len(images)
    for shard in stats["shards"]:
        per_class = json.loads((imported / shard.replace(".tar", "_stats.json")).read_text())["per_class"]
        assert len(per_class) == len(CANONICAL)  # every class in every shard


def test_verify_flags_a_class_sorted_set_and_passes_a_mixed_one(class_sorted: Path, imported: Path, capsys) -> None:
    assert verify_mod.main([str(class_sorted)]) == 0  # a warning, not a fault
    out = capsys.readouterr().out
    assert f"WARNING: {class_sorted} is class-sorted" in out and "shard-000000.tar 0.75" in out
    report = verify_mod.verify(imported)
    assert report.mixing is not None and not report.mixing.class_sorted
    assert report.mixing.classes_per_batch >= 6.5  # the simulated reader agrees with the measured one
    assert verify_mod.main([str(imported)]) == 0
    out = capsys.readouterr().out
    assert "mixing: shards' class shares differ" in out and "WARNING" not in out
