"""The one module that wires the stages: fetch -> decode -> faces -> dedupe -> shards.

Two halves, as in img2dataset's downloader and writer:

- `process_work_shard` runs where the work is (a local process or a Ray task): it
  fetches one work shard's candidates, decodes, detects and aligns faces, encodes the
  crops, hashes them, removes the duplicates inside the shard, and returns a
  `WorkShardOutput`: one status row per candidate (failures included, with their
  reason) and one row per face. It touches no file, so it runs unchanged on any node.
- `Committer` runs in the driver: it takes work shards strictly in index order, removes
  duplicates across shards (one `Deduper` fed in that fixed order), and writes the
  survivors through `shards.ShardWriter`. Its decisions depend only on the work shards'
  contents, never on which finished first or on which machine, so one machine and a
  Ray cluster write the same keys. On resume it replays every finished work shard from
  the start, rebuilding the same dedupe state, and skips keys the writer already holds.

Per-candidate faults are statuses (`fetch_status` reasons, `decode` reasons, `no_face`,
`face_filtered`, `duplicate`, `conflict_skipped`); a fault of the machinery raises.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import socket
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Sequence

import pyarrow as pa

from crawler.decode import DecodeConfig, Decoder
from crawler.dedupe import DedupeConfig, Deduper, hashes, hex64
from crawler.faces import FaceConfig, FaceStage
from crawler.fetch import Fetcher, FetchConfig

log = logging.getLogger(__name__)

ConflictPolicy = Literal["skip", "first"]

#: Statuses a candidate can end with, grouped for the summary.
FETCH_OK = "ok"
SKIPPED = ("conflict_skipped", "bad_label", "unsupported_media")
DECODE_FAILURES = ("not_image", "truncated", "too_many_pixels", "decompression_bomb", "too_small", "decode_error")

STATUS_SCHEMA = pa.schema(
    [
        ("position", pa.int32()),
        ("candidate_id", pa.string()),
        ("url", pa.string()),
        ("label", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("fetch_status", pa.string()),
        ("http_status", pa.int32()),
        ("attempts", pa.int32()),
        ("bytes", pa.int64()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("faces_found", pa.int32()),
        ("faces_kept", pa.int32()),
        ("faces_rejected", pa.string()),
        ("fetch_s", pa.float32()),
        ("final_url", pa.string()),
    ]
)

FACE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("position", pa.int32()),
        ("face", pa.int32()),
        ("candidate_id", pa.string()),
        ("label", pa.string()),
        ("image", pa.binary()),
        ("meta", pa.string()),
        ("sha256", pa.string()),
        ("phash", pa.string()),
        ("phash_mirror", pa.string()),
        ("dedupe", pa.string()),
        ("duplicate_of", pa.string()),
        ("distance", pa.int32()),
    ]
)


@dataclass(frozen=True)
class PipelineConfig:
    """Everything a work-shard task needs; frozen and picklable (it travels to processes and Ray tasks)."""

    fetch: FetchConfig = field(default_factory=FetchConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    faces: FaceConfig = field(default_factory=FaceConfig)
    dedupe: DedupeConfig = field(default_factory=DedupeConfig)
    #: What to do with an image found under several classes: "skip" it, or keep it under
    #: the "first" of its labels in canonical order (flagged `conflict` in its metadata).
    conflicts: ConflictPolicy = "skip"
    jpeg_quality: int = 95
    #: Torch threads per worker process (MTCNN); 0 leaves torch's default.
    torch_threads: int = 1

    def validate(self) -> "PipelineConfig":
        self.fetch.validate()
        self.decode.validate()
        self.faces.validate()
        self.dedupe.validate()
        if self.conflicts not in ("skip", "first"):
            raise ValueError(f"conflict policy {self.conflicts!r}: choose 'skip' or 'first'")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be within [1, 100], got {self.jpeg_quality}")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads must be >= 0, got {self.torch_threads}")
        return self

    def decode_for_faces(self) -> DecodeConfig:
        """The decode settings used: JPEGs are drafted down to what the face stage can use."""
        if self.decode.draft_min_side is not None:
            return self.decode
        need = self.faces.crop_size if self.faces.mode == "none" else 2 * self.faces.detect_max_side
        return dataclasses.replace(self.decode, draft_min_side=need)


@dataclass
class WorkShardOutput:
    index: int
    status: pa.Table  # STATUS_SCHEMA, one row per candidate, in candidate order
    faces: pa.Table  # FACE_SCHEMA, one row per aligned face, in (candidate, face) order
    worker: str = ""


# -- the work-shard task ---------------------------------------------------------------------

_STAGES: dict[PipelineConfig, tuple[Fetcher, Decoder, FaceStage]] = {}


def _stages(config: PipelineConfig) -> tuple[Fetcher, Decoder, FaceStage]:
    """Stages built once per process and config (the detector is loaded once, not per shard)."""
    if config not in _STAGES:
        if config.torch_threads and config.faces.mode == "mtcnn":
            import torch

            torch.set_num_threads(config.torch_threads)  # this process is a dedicated worker
        _STAGES[config] = (Fetcher(config.fetch), Decoder(config.decode_for_faces()), FaceStage(config.faces).load())
    return _STAGES[config]


def choose_label(labels: Sequence[str], conflict: bool, policy: ConflictPolicy,
                 classes: Sequence[str]) -> tuple[str | None, str | None]:
    """(label, None) or (None, skip status) for one candidate."""
    from shards.classes import CANONICAL

    if not labels or any(label not in CANONICAL for label in labels):
        return None, "bad_label"
    if conflict and policy == "skip":
        return None, "conflict_skipped"
    label = min(labels, key=CANONICAL.index) if conflict else labels[0]
    if label not in classes:
        return None, "bad_label"
    return label, None


def sample_key(base_key: str, face_index: int, faces_in_image: int) -> str:
    """The candidate's key, with `-f<i>` when its image gave several faces."""
    return f"{base_key}-f{face_index}" if faces_in_image > 1 else base_key


def _provenance(c: dict[str, Any], label: str) -> dict[str, Any]:
    i = c["labels"].index(label) if label in c["labels"] else 0
    queries, langs = c.get("queries") or [], c.get("langs") or []
    return {
        "provider": c["provider"],
        "source_id": c.get("provider_id") or c["url"],
        "url": c["url"],
        "page_url": c.get("page_url"),
        "query": queries[i] if i < len(queries) else None,
        "lang": langs[i] if i < len(langs) else None,
        "license": c.get("license"),
        "license_version": c.get("license_version"),
        "license_url": c.get("license_url"),
        "creator": c.get("creator"),
        "attribution": c.get("attribution"),
        "title": c.get("title"),
        "candidate_id": c["candidate_id"],
        "labels": list(c["labels"]),
        "queries": list(queries),
        "langs": list(langs),
        "conflict": bool(c.get("conflict")),
    }


def _encode(crop, quality: int) -> bytes:
    buf = io.BytesIO()
    crop.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def process_work_shard(index: int, candidates: Sequence[dict[str, Any]], config: PipelineConfig) -> WorkShardOutput:
    """Fetch and process one work shard; the result depends on the candidates and config only.

    Candidates come from `candidate_dicts`: label chosen, key made, skips decided. (This
    module imports nothing from `shards` at load time, so a worker process starts fast.)
    """
    fetcher, decoder, face_stage = _stages(config)
    n = len(candidates)
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    labels: list[str | None] = [None] * n
    to_fetch: list[int] = []
    for pos, c in enumerate(candidates):
        rows[pos] = {"position": pos, "candidate_id": c["candidate_id"], "url": c["url"], "label": c["label"],
                     "status": c["skip"], "faces_found": 0, "faces_kept": 0}
        if c["skip"] is None:
            labels[pos] = c["label"]
            to_fetch.append(pos)
    faces: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    processed: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}  # sha256 -> (row fields, faces)
    for j, result in fetcher.stream([candidates[pos]["url"] for pos in to_fetch]):
        pos = to_fetch[j]
        row = rows[pos]
        row.update(fetch_status=result.status, http_status=result.http_status, attempts=result.attempts,
                   fetch_s=result.elapsed_s, final_url=result.final_url)
        if not result.ok:
            row.update(status=result.status, error=result.error)
            continue
        data = result.data
        assert data is not None
        sha = hashlib.sha256(data).hexdigest()
        row.update(bytes=len(data), sha256=sha)
        if sha not in processed:  # the same bytes give the same faces: process them once
            try:
                processed[sha] = _process_image(data, config, decoder, face_stage)
            except Exception as exc:  # one odd image must not end a crawl of millions; counted, logged
                log.warning("processing %s failed", candidates[pos]["url"], exc_info=True)
                processed[sha] = ({"status": "process_error", "error": f"{type(exc).__name__}: {exc}"[:300]}, [])
        fields_, image_faces = processed[sha]
        row.update(fields_)
        c = candidates[pos]
        prov = _provenance(c, labels[pos])  # type: ignore[arg-type]
        for f in image_faces:
            key = sample_key(c["key"], f["face"], len(image_faces))
            meta = {**prov, **f["meta"], "final_url": result.final_url, "source_sha256": sha}
            faces[pos].append({**f, "key": key, "position": pos, "candidate_id": c["candidate_id"],
                               "label": labels[pos], "sha256": sha, "meta": meta})
    # Duplicates inside the shard, offered in candidate order (not completion order).
    dedupe = Deduper(config.dedupe)
    face_rows: list[dict[str, Any]] = []
    for pos in range(n):
        kept = 0
        for f in faces[pos]:
            decision = dedupe.offer(f["key"], f["candidate_id"], f["sha256"], int(f["phash"], 16),
                                    int(f["phash_mirror"], 16))
            if decision.keep:
                kept += 1
            else:
                f.update(image=None, dedupe=decision.reason, duplicate_of=decision.duplicate_of,
                         distance=decision.distance)
            face_rows.append(f)
        if faces[pos]:
            rows[pos]["faces_kept"] = kept
            rows[pos]["status"] = "ok" if kept else "duplicate"
    for f in face_rows:
        f["meta"] = json.dumps(f["meta"], sort_keys=True, default=str)
    return WorkShardOutput(
        index=index,
        status=pa.Table.from_pylist(rows, schema=STATUS_SCHEMA),
        faces=pa.Table.from_pylist(face_rows, schema=FACE_SCHEMA),
        worker=_worker_name(),
    )


def _worker_name() -> str:
    """Which process ran a work shard (and which Ray node, under Ray): recorded with its status file."""
    name = f"{socket.gethostname()}:{os.getpid()}"
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        name += f":{ray.get_runtime_context().get_node_id()}"
    return name


def _process_image(data: bytes, config: PipelineConfig, decoder: Decoder,
                   face_stage: FaceStage) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Decode, detect, align, encode and hash one image: (status row fields, face rows)."""
    decoded = decoder(data)
    fields_: dict[str, Any] = {"width": decoded.width, "height": decoded.height}
    if not decoded.ok:
        fields_.update(status=decoded.status, error=decoded.error)
        return fields_, []
    assert decoded.image is not None
    result = face_stage.detect(decoded.image)
    fields_.update(faces_found=result.found, faces_rejected=json.dumps(result.rejected, sort_keys=True),
                   status=result.status)
    scale = decoded.scale  # geometry back to original pixels when a JPEG was decoded at a reduced scale
    out = []
    for i, face in enumerate(result.faces):
        ph, ph_mirror = hashes(face.crop)
        out.append({
            "face": i,
            "image": _encode(face.crop, config.jpeg_quality),
            "phash": hex64(ph),
            "phash_mirror": hex64(ph_mirror),
            "meta": {
                "detector": config.faces.mode,
                "face_score": face.score,
                "face_box": [round(v * scale, 2) for v in face.box],
                "landmarks": None if face.landmarks is None else [
                    [round(x * scale, 2), round(y * scale, 2)] for x, y in face.landmarks],
                "sharpness": face.sharpness,
                "align_matrix": None if face.matrix is None else [
                    [round(r[0] / scale, 6), round(r[1] / scale, 6), r[2]] for r in face.matrix],
                "face_index": i,
                "faces_in_image": len(result.faces),
                "source_width": decoded.width,
                "source_height": decoded.height,
                "crop_size": config.faces.crop_size,
                "phash": hex64(ph),
                "phash_mirror": hex64(ph_mirror),
            },
        })
    return fields_, out


# -- the ordered commit -------------------------------------------------------------------------

@dataclass
class CommitStats:
    offered: int = 0
    written: int = 0
    already_written: int = 0
    duplicates: Counter = field(default_factory=Counter)
    per_class: Counter = field(default_factory=Counter)
    dropped: list[dict[str, Any]] = field(default_factory=list)


class Committer:
    """Writes work shards' faces into the shard set, in work-shard order, across-shard duplicates removed."""

    def __init__(self, writer, classes: Sequence[str], dedupe: DedupeConfig) -> None:
        self.writer = writer
        self.classes = list(classes)
        self.deduper = Deduper(dedupe)
        self.stats = CommitStats()
        self.next_index = 0
        from shards.sample import Sample

        self._sample = Sample

    def commit(self, index: int, faces: pa.Table) -> None:
        if index != self.next_index:
            raise RuntimeError(f"work shard {index} committed out of order (expected {self.next_index})")
        for row in faces.to_pylist():
            if row["dedupe"] is not None:  # dropped inside its work shard
                self.stats.duplicates[row["dedupe"]] += 1
                self.stats.dropped.append(_dropped(row, row["dedupe"], row["duplicate_of"], row["distance"], index,
                                                   "work_shard"))
                continue
            self.stats.offered += 1
            decision = self.deduper.offer(row["key"], row["candidate_id"], row["sha256"], int(row["phash"], 16),
                                          int(row["phash_mirror"], 16))
            if not decision.keep:
                self.stats.duplicates[decision.reason] += 1
                self.stats.dropped.append(_dropped(row, decision.reason, decision.duplicate_of, decision.distance,
                                                   index, "global"))
                continue
            self.stats.per_class[row["label"]] += 1
            if row["key"] in self.writer:
                self.stats.already_written += 1
                continue
            if row["image"] is None:
                raise RuntimeError(f"work shard {index}: face {row['key']} must be written but its image was "
                                   "removed from the work files; delete the output shards and crawl again")
            self.writer.write(self._sample(key=row["key"], image=row["image"], label=self.classes.index(row["label"]),
                                     meta=json.loads(row["meta"])))
            self.stats.written += 1
        self.next_index += 1


def _dropped(row: dict[str, Any], reason: str | None, of: str | None, distance: int | None, index: int,
             where: str) -> dict[str, Any]:
    return {"key": row["key"], "candidate_id": row["candidate_id"], "label": row["label"], "reason": reason,
            "duplicate_of": of, "distance": distance, "work_shard": index, "stage": where}


DROPPED_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("candidate_id", pa.string()),
        ("label", pa.string()),
        ("reason", pa.string()),
        ("duplicate_of", pa.string()),
        ("distance", pa.int32()),
        ("work_shard", pa.int32()),
        ("stage", pa.string()),
    ]
)


def candidate_dicts(candidates: Iterable[Any], classes: Sequence[str], policy: ConflictPolicy) -> list[dict[str, Any]]:
    """Plain dicts of what a work shard needs (cheap to pickle): provenance, chosen label, key, skip status."""
    from shards.sample import key_from_source

    wanted = ("candidate_id", "url", "page_url", "provider", "provider_id", "license", "license_version",
              "license_url", "creator", "attribution", "title", "labels", "queries", "langs", "conflict")
    rows = []
    for c in candidates:
        row = {name: getattr(c, name, None) for name in wanted}
        row["labels"] = list(row["labels"] or [])
        row["label"], row["skip"] = choose_label(row["labels"], bool(row["conflict"]), policy, classes)
        if (getattr(c, "media_type", None) or "image") != "image":
            row["skip"] = "unsupported_media"  # video candidates need frame sampling, not built here yet
        row["key"] = key_from_source(row["provider"], row["provider_id"] or row["url"])
        rows.append(row)
    return rows
