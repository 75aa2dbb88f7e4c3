"""`python -m crawler.build`: search queries (or a URL list) to a shard set of aligned faces.

    python -m crawler.build --queries queries.yaml --provider openverse --out runs/web
    python -m crawler.build --provider urllist --input urls.csv --out runs/list --faces none
    python -m crawler.build --provider localweb --api-base http://127.0.0.1:8000 \\
        --allow-host 127.0.0.1:8000 --out runs/demo --resume --ray-address auto

OUT is a directory or an object-store URL (s3://bucket/crawl, gs://...; `shards.fs`): the
crawl's state lives there too, so `--resume` continues a crawl killed on any machine.

Stages and files, in OUT:
1. discovery (`crawler.discover`) writes `candidates.parquet` first (reused on resume);
2. candidates are cut into work shards of `work_shard_size`; `work/plan.json` records
   the cut and every setting that decides the output, and a resume with other ones is
   refused;
3. each work shard is fetched and processed by one task (`crawler.pipeline`), in local
   processes or as Ray tasks (`--ray-address`); the driver writes its
   `work/ws-NNNNNN.faces.parquet` and then, atomically and last, its
   `work/ws-NNNNNN.status.parquet` (one row per candidate, failures included): a work
   shard is done when its status file exists;
4. work shards are committed in index order, duplicates across them removed, into the
   shard set (`shard-NNNNNN.tar`, `manifest.parquet`, `stats.json`, via `shards`);
5. `duplicates.parquet` (what was dropped as a copy of what), `crawl_summary.json` and
   a summary table; against the embedded web, the measured label noise of what was written.

Exit status 0 when the crawl ran to the end, whatever share of URLs failed; 2 for bad
arguments or settings, or an --out that another crawl is writing (`shards.lock`); 1 when
the crawl could not run (discovery failed, e.g. the API is unreachable).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import ipaddress
import json
import logging
import os
import random
import sys
import time
import typing
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

import pyarrow as pa
from tqdm import tqdm

from crawler.distribute import DistributeConfig, open_runner
from crawler.faces import HAAR_INSTALL, MTCNN_INSTALL
from crawler.fetch import Fetcher
from crawler.netguard import check_scheme, origin_entry
from crawler.pipeline import (
    DECODE_FAILURES,
    DROPPED_SCHEMA,
    SKIPPED,
    Committer,
    PipelineConfig,
    WorkShardOutput,
    candidate_dicts,
    process_work_shard,
)
from crawler.settings import coerce
from shards.cli import (
    ArgumentParser,
    add_log_level,
    add_set,
    bad_input,
    configure_logging,
    key_values,
    parse_yaml,
    read_yaml,
)
from shards.fs import exists, is_dir, is_file, join, names, open_fs, read_json, read_parquet
from shards.lock import OutputLock, OutputLocked

# Other `shards` modules are imported inside the functions that use them: the writer and reader load
# webdataset and torch (seconds), and every spawned worker process re-imports this module as __main__.

log = logging.getLogger(__name__)

CANDIDATES_NAME = "candidates.parquet"
WORK_DIR = "work"
PLAN_NAME = "plan.json"
SUMMARY_NAME = "crawl_summary.json"
CONFIG_NAME = "crawl_config.json"
DUPLICATES_NAME = "duplicates.parquet"


class CrawlConfigError(ValueError):
    """The crawl is misconfigured; nothing was started."""


class CrawlError(RuntimeError):
    """The crawl could not run (discovery failed, the API is unreachable)."""


@dataclass(frozen=True)
class CrawlConfig:
    out: str
    provider: str
    queries: str | None = None
    api_base: str | None = None
    input: str | None = None
    #: Results asked per query; None: 200 for a search API, all of it for a URL list.
    per_query: int | None = None
    discover_concurrency: int = 4
    #: Largest search-API answer read, in bytes after decompression (`discover.max_bytes`).
    discover_max_bytes: int = 16 * 1024 * 1024
    #: Extra provider settings (see crawler.providers.get_provider), e.g. {"max_retries": 0}.
    provider_settings: dict[str, Any] = field(default_factory=dict)
    resume: bool = False
    work_shard_size: int = 256
    #: Candidates are cut into work shards in a random order drawn from this seed, so work shards,
    #: and the output shards they fill, each hold every class in about the crawl's proportions
    #: (discovery lists them query by query, class by class). Recorded in plan.json and stats.json.
    shuffle_seed: int = 0
    max_shard_samples: int = 1000
    max_shard_bytes: int = 256 * 1024 * 1024
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    distribute: DistributeConfig = field(default_factory=DistributeConfig)
    progress: bool = True
    #: Measure label noise against the embedded web's ground truth: None = when the API is on a loopback host.
    label_noise: bool | None = None

    def discover_config(self):
        from crawler.discover import DiscoverConfig

        settings = dict(self.provider_settings)
        if self.input is not None:
            settings["input"] = self.input
        per_query = self.per_query or (10**12 if self.provider == "urllist" else 200)
        return DiscoverConfig(provider=self.provider, api_base=self.api_base, per_query=per_query,
                              concurrency=self.discover_concurrency, settings=settings, progress=self.progress,
                              allow_hosts=self.pipeline.fetch.allow_hosts, max_bytes=self.discover_max_bytes)

    def validate(self) -> "CrawlConfig":
        """Check every setting before any work starts; raises CrawlConfigError naming the fault."""
        from crawler.providers import PROVIDERS

        try:
            if self.provider not in PROVIDERS:
                raise ValueError(f"unknown provider {self.provider!r}; known: {sorted(PROVIDERS)}")
            if self.provider == "urllist" and not self.input:
                raise ValueError("--provider urllist needs --input FILE (csv, tsv, jsonl or parquet)")
            if self.input is not None and not Path(self.input).is_file():
                raise ValueError(f"input file {self.input} does not exist")
            if self.api_base is not None and check_scheme(self.api_base):
                raise ValueError(f"--api-base {self.api_base!r} is not an http(s) URL")
            if self.queries is not None and not Path(self.queries).is_file():
                raise ValueError(f"queries file {self.queries} does not exist")
            if self.per_query is not None and self.per_query < 1:
                raise ValueError(f"per_query must be positive, got {self.per_query}")
            for name in ("discover_concurrency", "discover_max_bytes", "work_shard_size", "max_shard_samples",
                         "max_shard_bytes"):
                if getattr(self, name) < 1:
                    raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
            self.pipeline.validate()
            self.distribute.validate()
            mode = self.pipeline.faces.mode
            if mode == "mtcnn" and importlib.util.find_spec("facenet_pytorch") is None:
                raise ValueError(f"--faces mtcnn needs facenet-pytorch: {MTCNN_INSTALL}")
            if mode == "haar" and importlib.util.find_spec("cv2") is None:
                raise ValueError(f"--faces haar needs OpenCV: {HAAR_INSTALL}")
            if self.provider != "urllist" and self.queries is not None:
                from crawler.queries import load_queries

                load_queries(self.queries)
            self.discover_config().build_provider()  # reads and checks a URL list, checks provider settings
            out = self.out
            if is_file(out):
                raise ValueError(f"--out {out} exists and is not a directory")
            if not self.resume and is_dir(out) and _holds_crawl(out):
                raise ValueError(f"{out} already holds a crawl: pass --resume to continue it, or choose an empty --out")
        except (ValueError, ImportError, OSError) as exc:
            raise CrawlConfigError(str(exc)) from exc
        return self


def _holds_crawl(out: str) -> bool:
    return exists(join(out, CANDIDATES_NAME)) or exists(join(out, WORK_DIR)) or bool(names(out, "shard-*.tar"))


def _sha256_file(url: str) -> str:
    digest = hashlib.sha256()
    fs, path = open_fs(url)
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _plan(out: str, cfg: CrawlConfig, num_candidates: int, classes: list[str]) -> dict[str, Any]:
    """Write `work/plan.json`, or check a resumed crawl against it."""
    pipeline = dataclasses.asdict(cfg.pipeline)
    pipeline.pop("fetch")  # fetch settings may change between runs: they decide how, not what
    pipeline.pop("torch_threads")
    plan = _jsonable({
        "candidates": num_candidates,
        "candidates_sha256": _sha256_file(join(out, CANDIDATES_NAME)),
        "work_shard_size": cfg.work_shard_size,
        "shuffle_seed": cfg.shuffle_seed,
        "classes": classes,
        "pipeline": pipeline,
    })
    path = join(out, f"{WORK_DIR}/{PLAN_NAME}")
    if exists(path):
        existing = read_json(path)
        if existing != plan:
            changed = sorted(k for k in plan if existing.get(k) != plan[k])
            raise CrawlConfigError(
                f"{path}: this crawl was started with other settings ({', '.join(changed)} differ); "
                "resume it with the same settings, or start a new --out"
            )
    else:
        from shards import atomic

        atomic.write_json(path, plan)
    return plan


def _work_paths(out: str, index: int) -> tuple[str, str]:
    stem = join(out, f"{WORK_DIR}/ws-{index:06d}")
    return f"{stem}.faces.parquet", f"{stem}.status.parquet"


def _save_work_shard(out: str, output: WorkShardOutput) -> None:
    from shards import atomic

    faces_path, status_path = _work_paths(out, output.index)
    atomic.write_parquet(faces_path, output.faces)
    status = output.status.replace_schema_metadata({"worker": output.worker})
    atomic.write_parquet(status_path, status)  # last: the work shard's completion marker


def _classes(candidates: Sequence[Any], queries: Sequence[Any]) -> list[str]:
    from shards.classes import CANONICAL

    names = {q.label for q in queries} | {label for c in candidates for label in c.labels}
    return [c for c in CANONICAL if c in names]


def run_crawl(cfg: CrawlConfig) -> dict[str, Any]:
    """Run (or resume) a crawl into `cfg.out`; returns the summary also written to crawl_summary.json."""
    from shards import atomic

    cfg.validate()
    out = str(cfg.out)
    start = time.monotonic()
    # The crawl's lock, taken before anything is written, covers the shard set too: its writer is handed it.
    with OutputLock(out) as lock:
        # A crawl killed mid-write leaves temp files in its work directory, which a resume never reads
        # (the shard writer clears the output directory's own when it opens the set).
        for path in atomic.remove_temp_files(join(out, WORK_DIR)):
            log.info("removed %s, left by an interrupted write", path)
        atomic.write_json(join(out, CONFIG_NAME), _jsonable(dataclasses.asdict(cfg)))
        try:
            runner = open_runner(cfg.distribute)  # workers start now, while discovery runs
        except ConnectionError as exc:
            raise CrawlError(f"cannot reach the Ray cluster at {cfg.distribute.ray_address}: {exc}") from exc
        with runner:
            candidates, classes, resumed = _discover(cfg, out)
            committer, num_shards, fresh, crawl_s = _crawl(cfg, out, runner, candidates, classes, lock)
        _compact_work(out, num_shards)
        atomic.write_parquet(join(out, DUPLICATES_NAME), pa.Table.from_pylist(committer.stats.dropped, schema=DROPPED_SCHEMA))
        summary = summarize(out, num_shards, committer)
        summary.update(
            provider=cfg.provider,
            classes=classes,
            discovery_resumed=resumed,
            candidates_fetched_this_run=fresh,
            crawl_s=round(crawl_s, 3),
            elapsed_s=round(time.monotonic() - start, 3),
            images_per_s=round(fresh / crawl_s, 2) if crawl_s > 0 and fresh else None,
        )
        summary["label_noise"] = _label_noise(cfg, out)
        atomic.write_json(join(out, SUMMARY_NAME), summary)
    return summary


def _discover(cfg: CrawlConfig, out: str) -> tuple[list[Any], list[str], bool]:
    """Candidates (discovered now, or read back on resume), the set's classes, and whether discovery was reused."""
    from crawler.candidate import read_candidates
    from crawler.discover import DiscoveryError, discover
    from crawler.providers import ProviderError

    queries = []
    if cfg.provider != "urllist":
        from crawler.queries import load_queries

        queries = load_queries(cfg.queries)
    try:
        discovered = discover(queries or None, cfg.discover_config(), join(out, CANDIDATES_NAME))
    except (DiscoveryError, ProviderError) as exc:
        raise CrawlError(f"discovery failed: {exc}") from exc
    candidates = read_candidates(join(out, CANDIDATES_NAME))
    classes = _classes(candidates, queries)
    if not classes:
        raise CrawlError(f"discovery found no candidates ({join(out, CANDIDATES_NAME)} is empty)")
    _plan(out, cfg, len(candidates), classes)
    return candidates, classes, bool(discovered.resumed)


def _crawl(cfg: CrawlConfig, out: str, runner, candidates: list[Any], classes: list[str],
           lock: OutputLock) -> tuple[Committer, int, int, float]:
    """Run the work shards not yet done and commit every work shard in order into the shard set."""
    from shards.writer import ShardWriter

    rows = candidate_dicts(candidates, classes, cfg.pipeline.conflicts)
    random.Random(cfg.shuffle_seed).shuffle(rows)
    size = cfg.work_shard_size
    num_shards = (len(rows) + size - 1) // size
    done = {i for i in range(num_shards) if exists(_work_paths(out, i)[1])}
    # Each task fetches with its share of the per-host budget, so the whole crawl keeps to it.
    pipeline = dataclasses.replace(cfg.pipeline, fetch=cfg.pipeline.fetch.shared_by(runner.parallel))
    tasks = [(i, rows[i * size:(i + 1) * size], pipeline) for i in range(num_shards) if i not in done]
    fresh = sum(len(t[1]) for t in tasks)
    log.info("%d candidates in %d work shards; %d already done", len(rows), num_shards, len(done))
    crawl_start = time.monotonic()
    with ShardWriter(out, classes, max_samples=cfg.max_shard_samples, max_bytes=cfg.max_shard_bytes,
                     shuffle_seed=cfg.shuffle_seed, lock=lock) as writer:
        committer = Committer(writer, classes, cfg.pipeline.dedupe)

        def commit_ready() -> None:
            while committer.next_index in done:
                i = committer.next_index
                committer.commit(i, read_parquet(_work_paths(out, i)[0]))

        commit_ready()  # on resume: replays what is done, so dedupe decisions are rebuilt identically
        with tqdm(total=len(rows), initial=len(rows) - fresh, unit="img", desc="crawl", disable=not cfg.progress,
                  dynamic_ncols=True) as bar:
            for output in runner.run(process_work_shard, tasks):
                _save_work_shard(out, output)
                done.add(output.index)
                commit_ready()
                bar.update(output.status.num_rows)
                bar.set_postfix(written=committer.stats.written + committer.stats.already_written, refresh=False)
        if committer.next_index != num_shards:
            raise RuntimeError(f"only {committer.next_index} of {num_shards} work shards were committed")
    return committer, num_shards, fresh, time.monotonic() - crawl_start


def _compact_work(out: str, num_shards: int) -> None:
    """Once every face is in a finished shard, drop the image bytes from the work files (hashes stay for resume)."""
    from shards import atomic

    for i in range(num_shards):
        path = _work_paths(out, i)[0]
        table = read_parquet(path)
        if table.column("image").null_count < table.num_rows:
            images = table.schema.get_field_index("image")
            atomic.write_parquet(path, table.set_column(images, "image", pa.nulls(table.num_rows, pa.binary())))


def summarize(out: str, num_shards: int, committer: Committer) -> dict[str, Any]:
    """Counts over every work shard's status rows plus the commit's decisions."""
    statuses: Counter = Counter()
    fetched = faces_found = frames = 0
    rejected: Counter = Counter()
    for i in range(num_shards):
        table = read_parquet(_work_paths(out, i)[1], columns=["status", "fetch_status", "faces_found",
                                                                 "faces_rejected", "frames"])
        statuses.update(table.column("status").to_pylist())
        fetched += table.column("fetch_status").to_pylist().count("ok")
        frames += sum(v or 0 for v in table.column("frames").to_pylist())
        faces_found += sum(v or 0 for v in table.column("faces_found").to_pylist())
        for text in table.column("faces_rejected").to_pylist():
            if text:
                rejected.update(json.loads(text))
    candidates = sum(statuses.values())
    non_failures = {"ok", "duplicate", "no_face", "face_filtered", "opted_out", "too_small", *SKIPPED}
    stats = committer.stats
    return {
        "candidates": candidates,
        "work_shards": num_shards,
        "fetched": fetched,
        "failed": dict(sorted((k, v) for k, v in statuses.items() if k not in non_failures)),
        "failed_decode": sum(statuses[k] for k in DECODE_FAILURES),
        "opted_out": statuses["opted_out"],
        "too_small": statuses["too_small"],  # a side under decode.min_side: dropped by policy, not a failure
        "skipped": {k: statuses[k] for k in SKIPPED if statuses[k]},
        "no_face": statuses["no_face"],
        "filtered": statuses["face_filtered"],
        "video_frames": frames,
        "faces_found": faces_found,
        "faces_rejected": dict(sorted(rejected.items())),
        "duplicates": dict(sorted(stats.duplicates.items())),
        "written": sum(stats.per_class.values()),
        "written_this_run": stats.written,
        "already_written": stats.already_written,
        "written_per_class": {c: stats.per_class[c] for c in committer.classes},
        "statuses": dict(sorted(statuses.items())),
    }


def _label_noise(cfg: CrawlConfig, out: str) -> dict[str, Any] | None:
    """Label noise of the written set against the embedded web's `/ground_truth.json`, when there is one."""
    if cfg.label_noise is False or not cfg.api_base:
        return None
    host = urlsplit(cfg.api_base).hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if cfg.label_noise is None and not (cfg.provider == "localweb" or loopback):
        return None
    from crawler.localweb import label_noise
    from shards.manifest import read_manifest

    url = cfg.api_base.rstrip("/") + "/ground_truth.json"
    # Through the fetcher and its guard, like every request of the crawl: the API's own host and port
    # are allowed (the crawl was pointed at them), nothing else beyond the crawl's allow-list.
    fetch = dataclasses.replace(cfg.pipeline.fetch, allow_hosts=(*cfg.pipeline.fetch.allow_hosts,
                                                                 origin_entry(cfg.api_base)))
    (result,) = Fetcher(fetch).fetch_all([url])
    try:
        if not result.ok:
            raise ValueError(f"{result.status}: {result.error}")
        truth = json.loads(result.data or b"")
        if not isinstance(truth, dict):
            raise ValueError(f"a JSON {type(truth).__name__}, not an object")
    except ValueError as exc:
        log.info("no ground truth at %s (%s): label noise not measured", url, exc)
        return None
    rows = read_manifest(out, columns=["url", "label_name"]).to_pylist()
    return label_noise(rows, truth)


# -- the command line ---------------------------------------------------------------------------

def format_summary(summary: dict[str, Any]) -> str:
    lines: list[tuple[str, Any]] = [("candidates", summary["candidates"]), ("fetched", summary["fetched"])]
    failed = summary["failed"]
    lines.append(("failed", sum(failed.values())))
    lines += [(f"  {reason}", n) for reason, n in failed.items()]
    lines.append(("opted out", summary["opted_out"]))
    lines.append(("too small", summary["too_small"]))
    for reason, n in summary["skipped"].items():
        lines.append((f"skipped ({reason})", n))
    if summary.get("video_frames"):
        lines.append(("video frames sampled", summary["video_frames"]))
    lines += [("no face", summary["no_face"]), ("filtered (every face)", summary["filtered"])]
    lines += [(f"  faces {reason}", n) for reason, n in summary["faces_rejected"].items()]
    lines.append(("duplicates (faces)", sum(summary["duplicates"].values())))
    lines += [(f"  {reason}", n) for reason, n in summary["duplicates"].items()]
    lines.append(("written", summary["written"]))
    lines += [(f"  {cls}", n) for cls, n in summary["written_per_class"].items()]
    if summary.get("already_written"):
        lines.append(("  (written before resume)", summary["already_written"]))
    noise = summary.get("label_noise")
    if noise:
        lines.append(("label noise (measured)", f"{noise['noise']:.3f} ({noise['noisy']}/{noise['samples']})"))
        lines += [(f"  {cls}", f"{v['noise']:.3f} ({v['noisy']}/{v['samples']})")
                  for cls, v in noise["per_class"].items()]
    if summary.get("images_per_s"):
        lines.append(("images/s", summary["images_per_s"]))
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"{name:<{width}}  {value:>8}" if isinstance(value, int) else f"{name:<{width}}  {value}"
                     for name, value in lines)


#: Shortcuts for --set: "fetch.timeout_s" means "pipeline.fetch.timeout_s".
_SECTIONS = {"fetch": "pipeline.fetch", "decode": "pipeline.decode", "faces": "pipeline.faces",
             "dedupe": "pipeline.dedupe", "frames": "pipeline.frames", "conflicts": "pipeline.conflicts", "jpeg_quality": "pipeline.jpeg_quality",
             "torch_threads": "pipeline.torch_threads"}
#: Discovery's settings by their section-style names: "discover.max_bytes" means "discover_max_bytes".
_DISCOVER = {"discover.max_bytes": "discover_max_bytes", "discover.concurrency": "discover_concurrency"}


def override(obj: Any, path: str, value: Any, *, prefix: str = "") -> Any:
    """A copy of the nested frozen dataclass `obj` with the dotted `path` set to `value`.

    `prefix` is the path down to `obj`, so an error names the whole setting.
    """
    if path in _DISCOVER and obj.__class__ is CrawlConfig:
        path = _DISCOVER[path]
    head, _, rest = path.partition(".")
    if head in _SECTIONS and obj.__class__ is CrawlConfig:
        return override(obj, _SECTIONS[head] + (f".{rest}" if rest else ""), value)
    names = {f.name for f in dataclasses.fields(obj)}
    if head not in names:
        raise ValueError(f"unknown setting {prefix + path!r} in {type(obj).__name__}; known: {sorted(names)}")
    current = getattr(obj, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"setting {prefix + head!r} has no field {rest!r}")
        return dataclasses.replace(obj, **{head: override(current, rest, value, prefix=f"{prefix}{head}.")})
    if dataclasses.is_dataclass(current):
        if not isinstance(value, dict):
            raise ValueError(f"setting {prefix + head!r} is a section: give a mapping")
        for key, item in value.items():
            current = override(current, key, item, prefix=f"{prefix}{head}.")
        return dataclasses.replace(obj, **{head: current})
    hint = typing.get_type_hints(type(obj))[head]
    return dataclasses.replace(obj, **{head: coerce(value, hint, prefix + head)})


def _key_values(items: Sequence[str], flag: str) -> dict[str, Any]:
    return {key: parse_yaml(value, f"{flag} {key}={value}") for key, value in key_values(items, flag).items()}


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m crawler.build", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", help="queries YAML {class: {lang: [keyword, ...]}} (default: the built-in set)")
    p.add_argument("--provider", required=True, help="openverse, wikimedia, flickr, urllist, youtube, localweb")
    p.add_argument("--api-base", help="the provider's base URL (e.g. the embedded web's)")
    p.add_argument("--input", help="the URL list for --provider urllist (csv, tsv, jsonl, parquet: url,label[,query])")
    p.add_argument("--out", required=True,
                   help="output directory or object-store URL, s3://... gs://... (the shard set and the crawl's state)")
    p.add_argument("--faces", choices=("mtcnn", "haar", "none"), help="face detector (default mtcnn)")
    p.add_argument("--allow-host", action="extend", nargs="+", default=[], metavar="HOST[:PORT]",
                   help="hosts, addresses or networks exempt from the private-address refusal, each for one port "
                        "(127.0.0.1:8470, [::1]:8470, 127.0.0.0/8:8470) or every port (no :PORT); one or more, "
                        "repeatable")
    p.add_argument("--allow-youtube", action="store_true",
                   help="opt in to --provider youtube (YouTube's terms restrict downloading; needs scn-scale[video])")
    p.add_argument("--resume", action="store_true", help="continue the crawl already in --out")
    p.add_argument("--ray-address", help="run work shards as Ray tasks on this cluster ('auto', 'HOST:PORT', 'local')")
    p.add_argument("--workers", type=int, help="local worker processes (default: the CPU count; 0: in-process)")
    p.add_argument("--per-query", type=int, help="results asked per query (default 200; a URL list: all rows)")
    p.add_argument("--image-size", "--crop-size", dest="crop_size", type=int, metavar="PX",
                   help="aligned crop side in pixels (default 112; 224 doubles the template)")
    p.add_argument("--min-side", type=int,
                   help="pictures (and video frames) with a side under this many pixels are dropped as too_small, "
                        "in every --faces mode (default 32; 0: keep any)")
    p.add_argument("--shard-size", "--max-shard-samples", dest="max_shard_samples", type=int, metavar="N",
                   help="samples per output shard (default 1000)")
    p.add_argument("--work-shard-size", type=int, help="candidates per work shard (default 256)")
    p.add_argument("--shuffle-seed", type=int,
                   help="candidates are crawled and written in a random order drawn from this seed, so every "
                        "shard holds every class (default 0; recorded in stats.json)")
    p.add_argument("--conflicts", choices=("skip", "first"),
                   help="images found under several classes: skip them (default), or keep the first label in "
                        "canonical order, flagged `conflict`")
    p.add_argument("--config", help="YAML file of settings (same names as --set)")
    add_set(p, "fetch.timeout_s=5 faces.min_score=0.95 dedupe.max_distance=6 fetch.inflight_bytes=268435456 "
               "(bytes of bodies a worker holds at once, default 512 MiB)")
    p.add_argument("--provider-setting", action="append", default=[], metavar="KEY=VALUE",
                   help="a provider setting, e.g. max_retries=0 page_size=20 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_log_level(p)
    return p


def config_from_args(args: argparse.Namespace) -> CrawlConfig:
    cfg = CrawlConfig(out=args.out, provider=args.provider, distribute=DistributeConfig(workers=os.cpu_count() or 1))
    if args.config:
        loaded = read_yaml(args.config) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: expected a mapping of settings")
        for key, value in loaded.items():
            cfg = override(cfg, key, value)
    flags = {
        "queries": args.queries, "api_base": args.api_base, "input": args.input, "faces.mode": args.faces,
        "distribute.ray_address": args.ray_address, "distribute.workers": args.workers, "per_query": args.per_query,
        "faces.crop_size": args.crop_size, "decode.min_side": args.min_side,
        "max_shard_samples": args.max_shard_samples,
        "work_shard_size": args.work_shard_size, "shuffle_seed": args.shuffle_seed, "conflicts": args.conflicts,
    }
    for key, value in flags.items():
        if value is not None:
            cfg = override(cfg, key, value)
    if args.allow_host:
        cfg = override(cfg, "fetch.allow_hosts", tuple(cfg.pipeline.fetch.allow_hosts) + tuple(args.allow_host))
    if args.resume:
        cfg = override(cfg, "resume", True)
    if args.no_progress:
        cfg = override(cfg, "progress", False)
    for key, value in _key_values(args.set, "--set").items():
        cfg = override(cfg, key, value)
    settings = {**cfg.provider_settings, **_key_values(args.provider_setting, "--provider-setting")}
    if args.allow_youtube:
        settings["allow_youtube"] = True
    return dataclasses.replace(cfg, provider_settings=settings)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        cfg = config_from_args(args)
    except (ValueError, OSError) as exc:
        return bad_input(exc)
    try:
        summary = run_crawl(cfg)  # validates every setting and input before it writes anything
    except (CrawlConfigError, OutputLocked) as exc:  # OutputLocked: another crawl writes --out
        return bad_input(exc)
    except CrawlError as exc:
        print(f"error: the crawl could not run: {exc}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    print(f"summary written to {join(cfg.out, SUMMARY_NAME)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
