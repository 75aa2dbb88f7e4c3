"""One training sample as stored in a shard: key, image bytes, class index, metadata.

The key is the relabel table's primary key, so it must outlive any rebuild of the
shards: it is derived from the image content or from the source's own id, never from
a position. WebDataset splits a tar member name into key and extension at the first
dot, so keys carry no dots (nor path separators).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

#: Bumped when the meaning of a stored field changes.
SCHEMA_VERSION = 1

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "png", "webp")

# 90 characters leave room for the extension inside the 100-byte ustar name field.
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,90}$")

#: Provenance fields every sample's metadata may carry; they become manifest columns.
PROVENANCE_FIELDS: tuple[str, ...] = (
    "provider",
    "source_id",
    "url",
    "page_url",
    "query",
    "lang",
    "license",
    "license_version",
    "license_url",
    "creator",
    "attribution",
)


def validate_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(
            f"invalid sample key {key!r}: keys are 1-90 characters of letters, digits, '_' or '-' "
            "(no dots: WebDataset splits key and extension at the first dot)"
        )
    return key


def key_from_bytes(data: bytes, prefix: str = "") -> str:
    """A content-derived key: the same image bytes always get the same key."""
    digest = hashlib.sha256(data).hexdigest()[:24]
    return validate_key(f"{prefix}{digest}")


def key_from_source(provider: str, source_id: str) -> str:
    """A key from the source's own id, stable even if the image is re-encoded upstream."""
    safe_provider = re.sub(r"[^A-Za-z0-9]", "", provider)[:24] or "src"
    digest = hashlib.sha256(f"{provider}\0{source_id}".encode()).hexdigest()[:24]
    return validate_key(f"{safe_provider}-{digest}")


@dataclass
class Sample:
    """A sample ready to be written.

    `label` indexes the shard set's own class list; `meta` holds provenance
    (PROVENANCE_FIELDS), face geometry (`face_box`, `landmarks`, `face_score`) and
    anything else worth keeping, and is stored as the sample's `json` member.
    """

    key: str
    image: bytes
    label: int
    ext: str = "jpg"
    split: str = "train"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_key(self.key)
        if self.ext not in IMAGE_EXTENSIONS:
            raise ValueError(f"sample {self.key}: image extension {self.ext!r} not in {IMAGE_EXTENSIONS}")
        if not self.image:
            raise ValueError(f"sample {self.key}: empty image")

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.image).hexdigest()
