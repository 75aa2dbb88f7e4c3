"""The dataset format every part of scn-scale speaks: WebDataset tars plus a parquet manifest.

Names are imported lazily (PEP 562): the writer and reader pull in webdataset and with
it torch, which a process that only needs the class list (the embedded web, say) should
not pay for at start-up.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BASIC7": "shards.classes",
    "CANONICAL": "shards.classes",
    "class_index": "shards.classes",
    "index_map": "shards.classes",
    "validate_classes": "shards.classes",
    "read_manifest": "shards.manifest",
    "OutputLock": "shards.lock",
    "OutputLocked": "shards.lock",
    "ShardSet": "shards.reader",
    "ShardSetError": "shards.reader",
    "ShardStream": "shards.reader",
    "make_loader": "shards.reader",
    "open_shard_set": "shards.reader",
    "plan_epoch": "shards.reader",
    "Sample": "shards.sample",
    "key_from_bytes": "shards.sample",
    "key_from_source": "shards.sample",
    "DuplicateKeyError": "shards.writer",
    "ShardWriter": "shards.writer",
    "finalize": "shards.writer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'shards' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
