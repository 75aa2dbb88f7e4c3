"""Every command that writes a shard set, a crawl, a noise table or a report, run against a bucket: a real
S3 API (moto's server, the `s3` fixture) on 127.0.0.1, reached through fsspec and s3fs as a real bucket is.

Each result is read back from the bucket (the set verified, the table loaded, the report's files listed).
gs:// takes the same fsspec path with gcsfs; no GCS server runs here, so it is not exercised.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from crawler import build
from scn_scale import evaluate, export, noise, report
from scn_scale.importers import __main__ as importers
from scn_scale.model import SCNModel
from scn_scale.weights import load_model_file, save_model_file
from shards import CANONICAL, key_from_source, open_shard_set, read_manifest
from shards import split, verify
from shards.fs import read_json, read_parquet
from test_build import CountingImages, crawl_argv, kill_9_when
from tests.conftest import S3, jpeg_bytes

REPO = Path(__file__).resolve().parents[1]


def keys_of(url: str) -> list[str]:
    return read_manifest(url, columns=["key"]).column("key").to_pylist()


@pytest.fixture(scope="module")
def crawl(s3: S3, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A crawl into the bucket, killed (-9) after some output shards and resumed: its URL.

    The checks are here, where the kill's state can be seen; the other tests read the set it leaves.
    """
    tmp = tmp_path_factory.mktemp("crawl")
    out = f"s3://{s3.bucket}/commands-{os.getpid()}/crawl"
    site = CountingImages(120, delay=0.05)
    with site.server:
        urls = site.url_list(tmp / "urls.csv")

        def two_shards_finished() -> bool:
            s3.fs.invalidate_cache()  # s3fs caches listings; the crawl writes from another process
            return len(s3.fs.glob(f"{out}/shard-*_stats.json")) >= 2

        kill_9_when(crawl_argv(tmp / "urls.csv", out, "--workers", "1"), tmp / "crawl.log", two_shards_finished)
        s3.fs.invalidate_cache()
        before = [key for path in sorted(s3.fs.glob(f"{out}/shard-*_stats.json"))
                  for key in read_parquet("s3://" + path.replace("_stats.json", ".parquet"), ["key"]).column("key").to_pylist()]
        done = s3.fs.glob(f"{out}/work/ws-*.status.parquet")
        done_urls = {url for path in done for url in read_parquet("s3://" + path, ["url"]).column("url").to_pylist()}
        assert before and len(done_urls) < len(urls), "the kill came too late to test anything"
        hits_before = Counter(site.hits)

        # Resumed in the bucket: the dead crawl's lock object is taken over, finished work is not redone.
        assert build.main(crawl_argv(tmp / "urls.csv", out, "--workers", "1", "--resume")) == 0
    keys = keys_of(out)
    assert len(keys) == len(set(keys)) == len(urls)  # no key twice, none lost
    assert set(before) <= set(keys) and set(keys) == {key_from_source("urllist", url) for url in urls}
    for url in done_urls:
        path = "/" + url.split("/", 3)[3]
        assert site.hits[path] == hits_before[path] == 1
    assert read_json(f"{out}/crawl_summary.json")["already_written"] >= len(before)
    assert not s3.fs.exists(f"{out}/.writer.lock")  # released
    assert not Path(REPO, "s3:").exists()  # nothing written to a local folder named after the URL
    return out


def test_a_crawl_killed_and_resumed_in_the_bucket_verifies(crawl: str, capsys) -> None:
    assert verify.main([crawl]) == 0
    assert "ok" in capsys.readouterr().out


def test_split_from_and_to_the_bucket(crawl: str, s3: S3) -> None:
    out = crawl.rsplit("/", 1)[0] + "/split"
    assert split.main([crawl, "--out", out, "--fractions", "train=0.6,val=0.2,test=0.2", "--shard-size", "16"]) == 0
    parts = {name: keys_of(f"{out}/{name}") for name in ("train", "val", "test")}
    for name in parts:
        assert verify.main([f"{out}/{name}"]) == 0
    assert sorted(k for keys in parts.values() for k in keys) == sorted(keys_of(crawl))
    assert read_json(f"{out}/split.json")["outputs"]["train"] == f"{out}/train"
    assert not s3.fs.glob(f"{out.removeprefix('s3://')}/.split-*")  # staged on local disk, nothing left in the bucket


def test_noise_table_from_and_to_the_bucket(crawl: str) -> None:
    table = crawl.rsplit("/", 1)[0] + "/noise/noise_0.3.parquet"
    assert noise.main(["--shards", crawl, "--rate", "0.3", "--out", table]) == 0
    overrides = noise.load_overrides(table)
    rows = read_manifest(crawl, columns=["key", "label"]).to_pydict()
    manifest = dict(zip(rows["key"], rows["label"]))
    assert len(overrides) == round(0.3 * len(manifest))
    assert all(manifest[key] != label for key, label in overrides.items())  # every one changed


def test_import_into_the_bucket(s3: S3, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("happiness", "sadness"):
        (tmp_path / "tree" / name).mkdir(parents=True)
        for i in range(5):
            (tmp_path / "tree" / name / f"{i}.jpg").write_bytes(jpeg_bytes(rng))
    out = f"s3://{s3.bucket}/commands-{os.getpid()}/imported"
    assert importers.main(["imagefolder", "--root", str(tmp_path / "tree"), "--out", out, "--shard-size", "4"]) == 0
    assert verify.main([out]) == 0
    shard_set = open_shard_set(out)
    assert list(shard_set.classes) == ["happiness", "sadness"] and sum(shard_set.sizes) == 10
    assert read_json(f"{out}/import_summary.json")["outputs"] == {"train": out}


def test_evaluate_report_and_export_into_the_bucket(crawl: str, s3: S3, tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_model_file(str(tmp_path / "model.pt"), SCNModel(len(CANONICAL)), CANONICAL, {"epoch": 1, "image_size": 32})
    base = crawl.rsplit("/", 1)[0]
    assert evaluate.main(["--checkpoint", str(tmp_path / "model.pt"), "--shards", crawl, "--out", f"{base}/eval",
                          "--batch-size", "16", "--loader-workers", "0"]) == 0
    result = read_json(f"{base}/eval/report.json")
    assert result["samples"] == len(keys_of(crawl))
    assert read_parquet(f"{base}/eval/predictions.parquet").num_rows == result["samples"]
    s3.fs.invalidate_cache()
    written = {p.rsplit("/", 1)[1] for p in s3.fs.ls(f"{base}/eval".removeprefix("s3://"))}
    assert {"report.md", "report.html", *result["plots"].values(), *result["galleries"].values()} <= written

    assert report.main([crawl, "--samples", "4"]) == 0  # the default: DIR/report, in the bucket
    s3.fs.invalidate_cache()
    pages = {p.rsplit("/", 1)[1] for p in s3.fs.ls(f"{crawl}/report".removeprefix("s3://"))}
    assert {"report.md", "report.html", "crawl_happiness.png", report.DUPLICATES_PNG} <= pages
    html = s3.fs.cat_file(f"{crawl}/report/report.html".removeprefix("s3://")).decode()
    assert "data:image/png;base64," in html  # its pictures inline, read from where they were staged

    assert export.main(["--checkpoint", str(tmp_path / "model.pt"), "--out", f"{base}/export",
                        "--format", "safetensors"]) == 0
    model, classes, extra = load_model_file(f"{base}/export/model.safetensors")
    assert classes == list(CANONICAL) and extra["epoch"] == 1
    assert s3.fs.isfile(f"{base}/export/README.md".removeprefix("s3://"))


# -- URLs that cannot be opened here --------------------------------------------------------------

def _run(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    """The command as a user runs it, from an empty directory (where a wrong fallback would create `foo:`)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", *argv], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)


def test_an_unknown_scheme_is_an_error_naming_the_url(tmp_path: Path) -> None:
    (tmp_path / "urls.csv").write_text("url,label\nhttp://127.0.0.1:9/a.jpg,happiness\n")
    runs = {
        "crawler.build": _run(tmp_path, "crawler.build", "--provider", "urllist", "--input", "urls.csv",
                              "--out", "foo://bucket/crawl", "--faces", "none"),
        "shards.split": _run(tmp_path, "shards.split", "foo://bucket/set", "--out", "foo://bucket/split"),
        "scn_scale.noise": _run(tmp_path, "scn_scale.noise", "--shards", "foo://bucket/set", "--rate", "0.2",
                                "--out", "noise.parquet"),
    }
    for command, done in runs.items():
        assert done.returncode == 2, (command, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "foo://bucket/" in lines[0], (command, lines)
        assert "unknown URL scheme 'foo'" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["urls.csv"]  # no folder `foo:`, nothing written


def test_a_scheme_whose_package_is_missing_names_it(tmp_path: Path) -> None:
    if sys.modules.get("gcsfs") is not None or __import__("importlib").util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here: gs:// opens")
    done = _run(tmp_path, "shards.verify", "gs://bucket/set")
    assert done.returncode == 2
    line = done.stderr.strip()
    assert line.startswith("error: gs://bucket/set: ") and "gcsfs" in line
    assert list(tmp_path.iterdir()) == []
