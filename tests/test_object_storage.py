"""Shard sets read from object storage, as cluster nodes read them: a real S3 API (moto's
server, the `s3` fixture) on 127.0.0.1, reached through fsspec and s3fs, so the reader's
code path is the one a real bucket takes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from shards import ShardSetError, ShardStream, make_loader, open_shard_set, read_manifest
from tests.conftest import S3, write_shard_set
from tests.test_shards import _identity


def test_a_set_in_a_bucket_reads_as_from_a_directory(s3: S3, tmp_path: Path) -> None:
    keys = write_shard_set(tmp_path / "set", [9, 2, 7, 3, 5, 1, 4, 6])  # uneven: 37 samples, 8 shards
    s3.fs.put(str(tmp_path / "set"), f"{s3.bucket}/webemotion/train", recursive=True)
    url = f"s3://{s3.bucket}/webemotion/train"

    shard_set = open_shard_set(url)
    local = open_shard_set(str(tmp_path / "set"))
    assert [s.rsplit("/", 1)[1] for s in shard_set.shards] == [Path(s).name for s in local.shards]
    assert all(s.startswith(f"{url}/") for s in shard_set.shards)
    assert (shard_set.sizes, shard_set.classes, shard_set.class_counts) == (local.sizes, local.classes, local.class_counts)
    assert read_manifest(url).to_pydict() == read_manifest(str(tmp_path / "set")).to_pydict()

    # The training reader: 2 ranks x 2 loader workers (separate processes, each with its own S3 client).
    seen: Counter[str] = Counter()
    lengths = []
    for rank in range(2):
        stream = ShardStream(shard_set, rank=rank, world_size=2, loader_workers=2, batch_size=4,
                             transform=_identity, seed=3, shuffle_buffer=8)
        batches = list(make_loader(stream))
        lengths.append(len(batches))
        seen.update(key for batch in batches for key in batch["key"])
    assert lengths[0] == lengths[1] == len(stream)
    assert set(seen) == set(keys)


def test_a_missing_prefix_is_named(s3: S3) -> None:
    with pytest.raises(ShardSetError, match=f"s3://{s3.bucket}/nothing-here"):
        open_shard_set(f"s3://{s3.bucket}/nothing-here")
