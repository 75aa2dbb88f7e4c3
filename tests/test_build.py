"""`python -m crawler.build` end to end: the embedded web's label noise, kill -9 and resume, one machine vs Ray.

Every server listens on 127.0.0.1 in this process; crawls that must be killed or that
drive a Ray cluster run as real subprocesses.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import pytest
from aiohttp import web

from crawler import build
from crawler.localweb import LocalWeb, LocalWebSettings, ServerThread
from crawler.synthetic import CorpusConfig, generate_corpus
from shards import key_from_source, read_manifest
from shards.atomic import is_temp
from shards.verify import verify
from ray_cluster import RayCluster, ray_cluster
from test_hostile_server import photo_jpeg

REPO = Path(__file__).resolve().parents[1]
QUERIES = """\
happiness:
  en: [happy face, smiling face]
sadness:
  en: [sad face]
anger:
  en: [angry face]
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    generate_corpus(CorpusConfig(out=str(out), per_class=10, classes=["happiness", "sadness", "anger"]))
    return out


@pytest.fixture
def queries(tmp_path) -> Path:
    path = tmp_path / "queries.yaml"
    path.write_text(QUERIES)
    return path


def work_rows(out: Path) -> list[dict]:
    return [row for path in sorted((out / "work").glob("ws-*.status.parquet")) for row in pq.read_table(path).to_pylist()]


def manifest_keys(out: Path) -> list[str]:
    return read_manifest(str(out), columns=["key"]).column("key").to_pylist()


# -- the embedded web -----------------------------------------------------------------------------

def test_crawl_of_the_embedded_web_reports_label_noise(corpus: Path, queries: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    settings = LocalWebSettings(noise=0.3, slow_seconds=0.2, seed=1)
    with LocalWeb(corpus, settings) as local_web:
        port = local_web.base_url.rsplit(":", 1)[1]  # its port only, as the demo allows it
        argv = ["--queries", str(queries), "--provider", "localweb", "--api-base", local_web.base_url,
                "--out", str(out), "--faces", "none", "--allow-host", f"127.0.0.1:{port}", "--workers", "0",
                "--conflicts", "first", "--work-shard-size", "8", "--no-progress", "--set", "fetch.timeout_s=5"]
        assert build.main(argv) == 0
        truth = local_web.ground_truth()
    printed = capsys.readouterr().out
    summary = json.loads((out / "crawl_summary.json").read_text())
    assert verify(out).faults == []

    # Measured independently: each written sample's label against the image's true class.
    true_class = {entry["url"]: entry["class"] for entry in truth["images"].values()}
    rows = read_manifest(str(out), columns=["url", "label_name"]).to_pylist()
    wrong = sum(row["label_name"] != true_class[row["url"]] for row in rows)
    noise = summary["label_noise"]
    assert noise["samples"] == len(rows) == summary["written"] > 0
    assert noise["noisy"] == wrong > 0
    assert noise["noise"] == pytest.approx(wrong / len(rows))
    assert "label noise (measured)" in printed

    # One status row per candidate, faults of the embedded web among them, and provenance on every sample.
    candidates = pq.read_table(out / "candidates.parquet").num_rows
    status = work_rows(out)
    assert len(status) == candidates == summary["candidates"]
    faults = Counter(entry["fault"] for entry in truth["images"].values() if entry["fault"])
    if faults["broken"]:
        assert summary["failed"].get("http_404", 0) >= 1
    meta = json.loads(read_manifest(str(out), columns=["meta"]).column("meta")[0].as_py())
    for name in ("provider", "source_id", "url", "page_url", "query", "lang", "license", "creator", "attribution",
                 "labels", "conflict", "detector", "face_score", "face_box", "source_sha256", "phash"):
        assert name in meta, name
    assert meta["license"] == "cc0" and meta["detector"] == "none"


# -- kill -9 and resume ---------------------------------------------------------------------------

class CountingImages:
    """N distinct JPEGs at /img/<i>.jpg, each served after a short delay; hits counted per path."""

    def __init__(self, n: int, delay: float) -> None:
        self.images = {f"/img/{i}.jpg": photo_jpeg(1000 + i, size=96) for i in range(n)}
        self.hits: Counter = Counter()
        self.delay = delay
        app = web.Application()
        app.router.add_get("/img/{name}", self._image)
        self.server = ServerThread(app, "127.0.0.1")

    async def _image(self, request):
        self.hits[request.path] += 1
        await asyncio.sleep(self.delay)
        if request.path not in self.images:
            return web.Response(status=404)
        return web.Response(body=self.images[request.path], content_type="image/jpeg")

    def url_list(self, path: Path) -> list[str]:
        urls = [self.server.base_url + p for p in self.images]
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["url", "label"])
            for i, url in enumerate(urls):
                writer.writerow([url, ("happiness", "sadness", "anger")[i % 3]])
        return urls


def crawl_argv(url_list: Path, out: Path, *extra: str) -> list[str]:
    return ["--provider", "urllist", "--input", str(url_list), "--out", str(out), "--faces", "none",
            "--allow-host", "127.0.0.1", "--work-shard-size", "10", "--shard-size", "8", "--no-progress",
            "--set", "fetch.concurrency=2", "--set", "fetch.per_host_rate=0", *extra]


def kill_9_when(argv: list[str], log_path: Path, ready: Callable[[], bool]) -> None:
    """Run `crawler.build argv` in a subprocess and kill -9 it (and its workers) once `ready()`."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "crawler.build", *argv], cwd=REPO, stdout=log, stderr=log,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while not ready():
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "the crawl never finished an output shard"
                time.sleep(0.02)
            os.killpg(proc.pid, signal.SIGKILL)  # kill -9, the crawl and its worker processes
        finally:
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_kill_9_then_resume(tmp_path: Path) -> None:
    site = CountingImages(150, delay=0.05)
    with site.server:
        urls = site.url_list(tmp_path / "urls.csv")
        out = tmp_path / "out"
        kill_9_when(crawl_argv(tmp_path / "urls.csv", out, "--workers", "1"), tmp_path / "crawl.log",
                    lambda: len(list(out.glob("shard-*_stats.json"))) >= 3)

        # What was finished at the moment of the kill.
        finished = {p.name[: -len("_stats.json")] for p in out.glob("shard-*_stats.json")}
        before = [k for name in sorted(finished) for k in pq.read_table(out / f"{name}.parquet").column("key").to_pylist()]
        done_urls = {row["url"] for row in work_rows(out)}
        assert 0 < len(before) and len(done_urls) < len(urls), "the kill came too late to test anything"
        hits_before = Counter(site.hits)
        # What a kill in the middle of an atomic write leaves (here planted: the kill's timing is not ours).
        (out / build.WORK_DIR / ".ws-000099.faces.parquet.k1ll3d.tmp").write_bytes(b"PAR1 half a file")

        assert build.main(crawl_argv(tmp_path / "urls.csv", out, "--workers", "1", "--resume")) == 0

    report = verify(out)
    assert report.faults == []
    assert not [p for p in out.rglob("*") if is_temp(p)]
    keys = manifest_keys(out)
    assert len(keys) == len(set(keys))  # no key twice
    assert Counter(keys)[before[0]] == 1 and set(before) <= set(keys)  # everything finished before the kill, once
    assert set(keys) == {key_from_source("urllist", url) for url in urls}  # and nothing lost
    # Work shards finished before the kill were not fetched again.
    for url in done_urls:
        path = url.split("127.0.0.1", 1)[1].split("/", 1)[1]
        assert site.hits[f"/{path}"] == hits_before[f"/{path}"] == 1
    summary = json.loads((out / "crawl_summary.json").read_text())
    assert summary["written"] == len(urls) and summary["already_written"] >= len(before)


def test_resume_of_a_finished_crawl_does_nothing_and_settings_are_pinned(tmp_path: Path) -> None:
    site = CountingImages(12, delay=0.0)
    with site.server:
        site.url_list(tmp_path / "urls.csv")
        out = tmp_path / "out"
        assert build.main(crawl_argv(tmp_path / "urls.csv", out, "--workers", "0")) == 0
        first = sorted(manifest_keys(out))
        hits = sum(site.hits.values())
        # Without --resume an existing crawl is refused; with other output-deciding settings too.
        assert build.main(crawl_argv(tmp_path / "urls.csv", out, "--workers", "0")) == 2
        changed = crawl_argv(tmp_path / "urls.csv", out, "--workers", "0", "--resume", "--set", "dedupe.max_distance=4")
        assert build.main(changed) == 2
        assert build.main(crawl_argv(tmp_path / "urls.csv", out, "--workers", "0", "--resume")) == 0
        assert sum(site.hits.values()) == hits  # nothing fetched again
    assert sorted(manifest_keys(out)) == first
    assert verify(out).faults == []


# -- the command line refuses to start a crawl that cannot run ------------------------------------

def test_settings_from_file_flags_and_set(tmp_path: Path) -> None:
    config = tmp_path / "crawl.yaml"
    config.write_text("fetch:\n  timeout_s: 3\n  allow_hosts: [10.0.0.0/8]\nfaces:\n  min_score: 0.8\nwork_shard_size: 7\n")
    args = build.parser().parse_args([
        "--provider", "urllist", "--input", "x.csv", "--out", "o", "--config", str(config), "--faces", "haar",
        "--allow-host", "127.0.0.1", "127.0.0.2", "--set", "fetch.retries=5", "--set", "conflicts=first",
        "--allow-host", "::1", "--workers", "3"])
    cfg = build.config_from_args(args)
    assert cfg.pipeline.fetch.timeout_s == 3.0 and cfg.pipeline.fetch.retries == 5
    assert cfg.pipeline.fetch.allow_hosts == ("10.0.0.0/8", "127.0.0.1", "127.0.0.2", "::1")
    assert cfg.pipeline.faces.mode == "haar" and cfg.pipeline.faces.min_score == 0.8
    assert cfg.pipeline.conflicts == "first" and cfg.work_shard_size == 7 and cfg.distribute.workers == 3
    # A URL list is crawled whole; a search API is asked 200 results per query unless told otherwise.
    assert cfg.discover_config().per_query >= 10**9
    assert build.CrawlConfig(out="o", provider="openverse").discover_config().per_query == 200
    with pytest.raises(ValueError):
        build.override(cfg, "fetch.timeout_s", "soon")


def test_old_flag_spellings_still_work() -> None:
    """--crop-size and --max-shard-samples, the spellings before the commands agreed on --image-size and --shard-size."""
    def config(*flags: str) -> build.CrawlConfig:
        return build.config_from_args(build.parser().parse_args(["--provider", "urllist", "--out", "o", *flags]))

    old = config("--crop-size", "224", "--max-shard-samples", "5")
    assert old == config("--image-size", "224", "--shard-size", "5")
    assert old.pipeline.faces.crop_size == 224 and old.max_shard_samples == 5


def test_exit_status_for_a_crawl_that_cannot_run(tmp_path: Path, queries: Path, capsys) -> None:
    out = str(tmp_path / "out")
    assert build.main(["--provider", "nosuch", "--out", out]) == 2
    assert build.main(["--provider", "urllist", "--out", out]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("joy:\n  en: [happy]\n")
    assert build.main(["--provider", "localweb", "--api-base", "http://127.0.0.1:9", "--queries", str(bad),
                       "--out", out]) == 2
    assert build.main(["--provider", "localweb", "--api-base", "http://127.0.0.1:9", "--queries", str(queries),
                       "--out", out, "--set", "fetch.no_such_setting=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown provider" in err and "needs --input" in err and "joy" in err and "no_such_setting" in err
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = build.main(["--provider", "localweb", "--api-base", f"http://127.0.0.1:{port}", "--queries", str(queries),
                       "--out", out, "--faces", "none", "--no-progress", "--provider-setting", "max_retries=0"])
    assert code == 1
    assert "could not run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build.main(["--provider", "urllist", "--out", out, "--faces", "yunet"])


# -- one machine and a two-node Ray cluster write the same keys -----------------------------------

@pytest.fixture
def ray_two_nodes():
    pytest.importorskip("ray")
    with ray_cluster(nodes=2) as cluster:
        yield cluster


@pytest.mark.slow
def test_one_machine_and_two_node_ray_write_the_same_keys(corpus: Path, queries: Path, tmp_path: Path,
                                                          ray_two_nodes: RayCluster) -> None:
    address, env = ray_two_nodes.address, ray_two_nodes.env
    settings = LocalWebSettings(noise=0.3, duplicates=0.3, slow_seconds=0.2, seed=2)
    outs = {"local": tmp_path / "local", "ray": tmp_path / "ray"}
    with LocalWeb(corpus, settings) as local_web:
        common = ["--queries", str(queries), "--provider", "localweb", "--api-base", local_web.base_url,
                  "--faces", "mtcnn", "--allow-host", "127.0.0.1", "--conflicts", "first", "--work-shard-size", "4",
                  "--shard-size", "5", "--no-progress", "--set", "fetch.timeout_s=10"]
        for name, extra in (("local", ["--workers", "2"]), ("ray", ["--ray-address", address])):
            result = subprocess.run([sys.executable, "-m", "crawler.build", *common, "--out", str(outs[name]), *extra],
                                    cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, result.stderr[-3000:]
    local, ray = (sorted(manifest_keys(outs[n])) for n in ("local", "ray"))
    assert local == ray and len(local) > 10
    for out in outs.values():
        assert verify(out).faults == []
    # Duplicates across work shards were among what both removed, the same way.
    drops = [pq.read_table(outs[n] / "duplicates.parquet").to_pylist() for n in ("local", "ray")]
    assert drops[0] == drops[1] and drops[0]
    # Work shards really ran on both Ray nodes.
    nodes = {pq.read_schema(p).metadata[b"worker"].decode().rsplit(":", 1)[1]
             for p in (outs["ray"] / "work").glob("ws-*.status.parquet")}
    assert len(nodes) == 2, nodes
