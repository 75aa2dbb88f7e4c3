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

Videos take the same path with two more steps: a `video_page` (a YouTube watch page) is
first turned into a media URL by `crawler.resolve`, the video's bytes are fetched under
the video byte cap, and `crawler.frames` samples frames that go through the face stage
like photos; each face's key then names its frame's time.

Per-candidate faults are statuses (`fetch_status` reasons, `decode`, `resolve` and
`frames` reasons, `no_face`, `face_filtered`, `duplicate`, `conflict_skipped`); a fault
of the machinery raises.
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
from crawler.dedupe import DedupeConfig, Deduper, hex64
from crawler.faces import FaceConfig, FaceResult, FaceStage
from crawler.fetch import Fetcher, FetchConfig
from crawler.frames import FrameConfig, sample_frames
from shards.phash import hashes

log = logging.getLogger(__name__)

ConflictPolicy = Literal["skip", "first"]

#: Statuses a candidate can end with, grouped for the summary.
FETCH_OK = "ok"
SKIPPED = ("conflict_skipped", "bad_label")
DECODE_FAILURES = ("not_image", "truncated", "too_many_pixels", "decompression_bomb", "decode_error",
                   "not_video", "no_video_stream", "frame_too_large", "video_error")

#: Side (px) and JPEG quality of the thumbnail each face keeps after the crawl drops its crop.
THUMBNAIL_SIDE = 64
THUMBNAIL_QUALITY = 80

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
        ("frames", pa.int32()),
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
        ("thumbnail", pa.binary()),  # THUMBNAIL_SIDE px JPEG: outlives `image`, which the crawl drops once committed
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
    frames: FrameConfig = field(default_factory=FrameConfig)
    #: What to do with an image found under several classes: "skip" it, or keep it under
    #: the "first" of its labels in canonical order (flagged `conflict` in its metadata).
    conflicts: ConflictPolicy = "skip"
    jpeg_quality: int = 95
    #: Torch threads per worker process (MTCNN); 0 leaves torch's default.
    torch_threads: int = 1

    def validate(self) -> "PipelineConfig":
        self.fetch.validate()
        self.video_fetch().validate()
        self.decode.validate()
        self.faces.validate()
        self.dedupe.validate()
        self.frames.validate()
        if self.conflicts not in ("skip", "first"):
            raise ValueError(f"conflict policy {self.conflicts!r}: choose 'skip' or 'first'")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be within [1, 100], got {self.jpeg_quality}")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads must be >= 0, got {self.torch_threads}")
        return self

    def video_fetch(self) -> FetchConfig:
        """The fetch settings for videos: the same, with the video byte cap."""
        return dataclasses.replace(self.fetch, max_bytes=self.frames.max_bytes)

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

@dataclass
class _Stages:
    fetcher: Fetcher
    video_fetcher: Fetcher  # the same fetch settings with the video byte cap
    decoder: Decoder
    faces: FaceStage
    resolver: Any = None  # crawler.resolve.Resolver, built for the first video page (it needs yt-dlp)

    def resolve(self, config: PipelineConfig) -> Any:
        if self.resolver is None:
            from crawler.netguard import AllowList
            from crawler.resolve import Resolver

            fetch = config.fetch
            self.resolver = Resolver(AllowList.parse(fetch.allow_hosts), fetch.timeout_s, fetch.user_agent,
                                     max_bytes=fetch.max_bytes, total_s=fetch.total_timeout_s)
        return self.resolver


_STAGES: dict[PipelineConfig, _Stages] = {}


def _stages(config: PipelineConfig) -> _Stages:
    """Stages built once per process and config (the detector is loaded once, not per shard)."""
    if config not in _STAGES:
        if config.torch_threads and config.faces.mode == "mtcnn":
            import torch

            torch.set_num_threads(config.torch_threads)  # this process is a dedicated worker
        _STAGES[config] = _Stages(Fetcher(config.fetch), Fetcher(config.video_fetch()),
                                  Decoder(config.decode_for_faces()), FaceStage(config.faces).load())
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


def sample_key(base_key: str, face_index: int, faces_in_image: int, frame_ms: int | None = None) -> str:
    """The candidate's key, with `-t<ms>` for a video frame and `-f<i>` when its picture gave several faces."""
    key = base_key if frame_ms is None else f"{base_key}-t{frame_ms}"
    return f"{key}-f{face_index}" if faces_in_image > 1 else key


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


def _thumbnail(crop) -> bytes:
    """A small JPEG of the crop, about 1 KB: what a report shows of a face the dedupe dropped.

    Whether a face is a duplicate of another work shard's face is decided only at commit, and
    the crawl then removes every crop from its work files, so each face keeps its thumbnail.
    """
    thumb = crop.copy()
    thumb.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    return _encode(thumb, THUMBNAIL_QUALITY)


def process_work_shard(index: int, candidates: Sequence[dict[str, Any]], config: PipelineConfig) -> WorkShardOutput:
    """Fetch and process one work shard; the result depends on the candidates and config only.

    Candidates come from `candidate_dicts`: label chosen, key made, skips decided. (This
    module imports nothing from `shards` at load time, so a worker process starts fast.)
    """
    stages = _stages(config)
    n = len(candidates)
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    images: list[int] = []
    videos: list[int] = []
    for pos, c in enumerate(candidates):
        rows[pos] = {"position": pos, "candidate_id": c["candidate_id"], "url": c["url"], "label": c["label"],
                     "status": c["skip"], "faces_found": 0, "faces_kept": 0}
        if c["skip"] is None:
            (images if c["media_type"] == "image" else videos).append(pos)
    media_urls: dict[int, str | None] = {pos: candidates[pos]["url"] for pos in images + videos}
    for pos in videos:
        if candidates[pos]["media_type"] == "video_page":
            resolved = stages.resolve(config)(candidates[pos]["url"])
            media_urls[pos] = resolved.media_url
            if resolved.media_url is None:
                rows[pos].update(status=resolved.status, error=resolved.error)
    videos = [pos for pos in videos if media_urls[pos]]
    faces: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    processed: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}  # sha256 -> (row fields, faces)

    def process_image(data: bytes) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return _process_image(data, config, stages.decoder, stages.faces)

    def process_video(data: bytes) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return _process_video(data, config, stages.faces)

    for fetcher, positions, process in ((stages.fetcher, images, process_image),
                                        (stages.video_fetcher, videos, process_video)):
        for j, result in fetcher.stream([media_urls[pos] for pos in positions]):
            pos = positions[j]
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
                    processed[sha] = process(data)
                except Exception as exc:  # one odd file must not end a crawl of millions; counted, logged
                    log.warning("processing %s failed", candidates[pos]["url"], exc_info=True)
                    processed[sha] = ({"status": "process_error", "error": f"{type(exc).__name__}: {exc}"[:300]}, [])
            fields_, found = processed[sha]
            row.update(fields_)
            c = candidates[pos]
            prov = _provenance(c, c["label"])
            for f in found:
                key = sample_key(c["key"], f["face"], f["faces_in_image"], f.get("frame_ms"))
                meta = {**prov, **f["meta"], "final_url": result.final_url, "source_sha256": sha}
                faces[pos].append({**f, "key": key, "position": pos, "candidate_id": c["candidate_id"],
                                   "label": c["label"], "sha256": sha, "meta": meta})
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
    # decoded.scale maps geometry back to original pixels when a JPEG was decoded at a reduced scale.
    return fields_, _face_rows(result, config, decoded.scale, decoded.width, decoded.height)


def _process_video(data: bytes, config: PipelineConfig,
                   face_stage: FaceStage) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Sample frames, then detect, align, encode and hash the faces of each: (status row fields, face rows)."""
    sampled = sample_frames(data, config.frames)
    fields_: dict[str, Any] = {"width": sampled.width, "height": sampled.height, "frames": len(sampled.frames)}
    if not sampled.ok:
        fields_.update(status=sampled.status, error=sampled.error)
        return fields_, []
    if min(sampled.width or 0, sampled.height or 0) < config.decode.min_side:  # frames are pictures too
        fields_.update(status="too_small", error=f"{sampled.width}x{sampled.height}: a side under "
                                                 f"{config.decode.min_side}")
        return fields_, []
    found, rejected, out = 0, Counter(), []
    for frame in sampled.frames:
        result = face_stage.detect(frame.image)
        found += result.found
        rejected.update(result.rejected)
        for f in _face_rows(result, config, 1.0, sampled.width, sampled.height):
            f["frame_ms"] = round(frame.time_s * 1000)
            f["meta"].update(frame_time_s=frame.time_s, video_duration_s=sampled.duration_s)
            out.append(f)
    status = "ok" if out else ("no_face" if not found else "face_filtered")
    fields_.update(faces_found=found, faces_rejected=json.dumps(dict(rejected), sort_keys=True), status=status)
    return fields_, out


def _face_rows(result: FaceResult, config: PipelineConfig, scale: float, width: int | None,
               height: int | None) -> list[dict[str, Any]]:
    """One row per kept face of one picture: the encoded crop, its hashes and its metadata."""
    out = []
    for i, face in enumerate(result.faces):
        ph, ph_mirror = hashes(face.crop)
        out.append({
            "face": i,
            "faces_in_image": len(result.faces),
            "image": _encode(face.crop, config.jpeg_quality),
            "thumbnail": _thumbnail(face.crop),
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
                "source_width": width,
                "source_height": height,
                "crop_size": config.faces.crop_size,
                "phash": hex64(ph),
                "phash_mirror": hex64(ph_mirror),
            },
        })
    return out


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
            "duplicate_of": of, "distance": distance, "work_shard": index, "stage": where,
            "thumbnail": row.get("thumbnail")}  # work files written before thumbnails were kept have none


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
        ("thumbnail", pa.binary()),  # the dropped face, small: its crop is not kept anywhere else
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
        row["media_type"] = getattr(c, "media_type", None) or "image"
        row["key"] = key_from_source(row["provider"], row["provider_id"] or row["url"])
        rows.append(row)
    return rows
