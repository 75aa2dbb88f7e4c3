"""The dataset format every part of scn-scale speaks: WebDataset tars plus a parquet manifest."""

from shards.classes import BASIC7, CANONICAL, class_index, index_map, validate_classes
from shards.manifest import read_manifest
from shards.reader import ShardSet, ShardSetError, ShardStream, make_loader, open_shard_set, plan_epoch
from shards.sample import Sample, key_from_bytes, key_from_source
from shards.writer import DuplicateKeyError, ShardWriter, finalize

__all__ = [
    "BASIC7",
    "CANONICAL",
    "DuplicateKeyError",
    "Sample",
    "ShardSet",
    "ShardSetError",
    "ShardStream",
    "ShardWriter",
    "class_index",
    "finalize",
    "index_map",
    "key_from_bytes",
    "key_from_source",
    "make_loader",
    "open_shard_set",
    "plan_epoch",
    "read_manifest",
    "validate_classes",
]
