"""The embedded web: Openverse-format search over a corpus, its noise model, ground truth, loopback only."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

from crawler.candidate import read_candidates
from crawler.discover import DiscoverConfig, discover
from crawler.localweb import Catalog, LocalWeb, LocalWebSettings, label_noise
from crawler.queries import Query, load_queries
from shards.classes import CANONICAL

CLEAN = dict(noise=0.0, broken=0.0, slow=0.0, nonimage=0.0, duplicates=0.0)
OPENVERSE_FIELDS = {
    "id", "title", "foreign_landing_url", "url", "creator", "creator_url", "license", "license_version",
    "license_url", "provider", "source", "filesize", "filetype", "tags", "attribution", "mature", "height",
    "width", "thumbnail",
}


def make_corpus(root: Path, per_class: int, classes=CANONICAL, index: bool = False,
                intensity=lambda k, n: 1.0) -> Path:
    """Tiny distinct JPEGs in class folders; with `index`, also the synthetic corpus's corpus.csv
    (image k of n in a class with intensity(k, n))."""
    rows = []
    for ci, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            rel = f"{cls}/{cls}-{k + 1:06d}.jpg"
            Image.new("RGB", (12 + k % 5, 10), (ci * 30 % 256, k * 9 % 256, 77)).save(root / rel, quality=95)
            rows.append({"file": rel, "class": cls, "intensity": intensity(k, per_class), "identity": k, "seed": k})
    if index:
        with open(root / "corpus.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return root


def keyword(cls: str) -> str:
    return next(q.text for q in load_queries(None) if q.label == cls)


async def get(session: aiohttp.ClientSession, url: str, **params):
    async with session.get(url, params=params) as resp:
        return resp.status, resp.headers.get("Content-Type"), await resp.read()


def fetch_all(urls: list[str]):
    async def run():
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*(get(session, u) for u in urls))

    return asyncio.run(run())


def search(base: str, text: str, page: int = 1, page_size: int = 20):
    async def run():
        async with aiohttp.ClientSession() as session:
            return await get(session, f"{base}/v1/images/", q=text, page=page, page_size=page_size)

    status, _, body = asyncio.run(run())
    return status, json.loads(body)


def test_clean_search_pages_through_a_class_and_serves_its_files(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", per_class=7, classes=("happiness", "sadness"))
    with LocalWeb(corpus, LocalWebSettings(**CLEAN)) as web:
        assert web.base_url.startswith("http://127.0.0.1:")
        status, first = search(web.base_url, keyword("happiness"), page_size=5)
        _, second = search(web.base_url, keyword("happiness"), page=2, page_size=5)
        assert status == 200 and (first["result_count"], first["page_count"], first["page"]) == (7, 2, 1)
        results = first["results"] + second["results"]
        assert all(OPENVERSE_FIELDS <= set(item) for item in results)
        truth = web.ground_truth()["images"]
        assert {truth[r["id"]]["class"] for r in results} == {"happiness"} and len({r["id"] for r in results}) == 7
        for item, (code, ctype, body) in zip(results, fetch_all([r["url"] for r in results])):
            assert (code, ctype) == (200, "image/jpeg")
            assert body == (corpus / truth[item["id"]]["file"]).read_bytes()
            assert Image.open(io.BytesIO(body)).size == (item["width"], item["height"])


def test_unknown_text_and_out_of_range_pages(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", per_class=3, classes=("anger",))
    with LocalWeb(corpus, LocalWebSettings(**CLEAN, max_page_size=50)) as web:
        status, body = search(web.base_url, "a quiet lake at dawn")
        assert status == 200 and (body["result_count"], body["results"]) == (0, [])
        assert search(web.base_url, keyword("anger"), page=2, page_size=20)[0] == 400
        assert search(web.base_url, keyword("anger"), page_size=51)[0] == 401


def test_noise_model_shares_faults_and_duplicates(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", per_class=30)
    settings = LocalWebSettings(noise=0.4, broken=0.1, slow=0.1, nonimage=0.1, duplicates=0.2, slow_seconds=0.2)
    with LocalWeb(corpus, settings) as web:
        truth = web.ground_truth()["images"]
        for cls in CANONICAL:
            _, body = search(web.base_url, keyword(cls), page_size=500)
            off = sum(truth[r["id"]]["class"] != cls for r in body["results"])
            assert abs(off / body["result_count"] - settings.noise) <= 1 / body["result_count"]
        # Each image is found by the queries of one class only: a wrong label is not also a conflict.
        assert all(len(e["listed_under"]) == 1 for e in truth.values())
        faults = [e["fault"] for e in truth.values()]
        originals = sum(e["duplicate_of"] is None for e in truth.values())
        for kind in ("broken", "slow", "nonimage"):
            assert 0.03 < faults.count(kind) / len(faults) < 0.2, kind
        assert 0.1 < (len(truth) - originals) / originals < 0.3

        def first(kind: str) -> dict:
            return next(e for e in truth.values() if e["fault"] == kind and e["duplicate_of"] is None)

        start = time.monotonic()
        (broken, _, _), (nonimage, ctype, html), (slow, _, data) = fetch_all(
            [first(k)["url"] for k in ("broken", "nonimage", "slow")]
        )
        assert time.monotonic() - start >= settings.slow_seconds
        assert (broken, nonimage, slow) == (404, 200, 200)
        assert ctype == "image/jpeg" and html.lstrip().startswith(b"<!DOCTYPE html")
        assert data == (corpus / first("slow")["file"]).read_bytes()

        pairs = [(e, truth[e["duplicate_of"]]) for e in truth.values() if e["duplicate_of"]]
        pairs = [(d, o) for d, o in pairs if not d["fault"] and not o["fault"]]
        bodies = fetch_all([u for d, o in pairs for u in (d["url"], o["url"])])
        assert pairs and all(d["url"] != o["url"] for d, o in pairs)
        assert all(bodies[2 * i][2] == bodies[2 * i + 1][2] for i in range(len(pairs)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ambiguous_noise_files_weak_expressions_under_wrong_queries(tmp_path, seed):
    # Intensities 0, 1/39, ..., 1 in every class: the same share of each class's results is
    # wrong as with uniform noise, but drawn from its weak expressions, and the strongest never.
    corpus = make_corpus(tmp_path / "corpus", per_class=40, index=True, intensity=lambda k, n: k / (n - 1))
    uniform, ambiguous = (Catalog(corpus, LocalWebSettings(**{**CLEAN, "noise": 0.3, "seed": seed, "noise_pick": pick}))
                          for pick in ("uniform", "ambiguous"))
    truth = ambiguous.ground_truth("http://127.0.0.1:1")["images"]
    moved = [e["intensity"] for e in truth.values() if e["noise"] == ["label"]]
    kept = [e["intensity"] for e in truth.values() if not e["noise"]]
    assert len(moved) == 8 * 12 and len(kept) == 8 * 28
    assert sum(kept) / len(kept) - sum(moved) / len(moved) > 0.15
    assert 1.0 not in moved
    for catalog in (uniform, ambiguous):  # each class gives 12 and is dealt 12 +- 1 back
        for cls in CANONICAL:
            wrong = [i for i in catalog.results[cls] if catalog.images[i].true_class != cls]
            assert abs(len(wrong) - 12) <= 1 and len(catalog.results[cls]) - len(wrong) == 28


def test_ambiguous_noise_needs_intensities(tmp_path):
    plain = make_corpus(tmp_path / "plain", per_class=2)
    with pytest.raises(ValueError, match=r"plain: noise_pick 'ambiguous' needs each image's intensity"):
        Catalog(plain, LocalWebSettings(noise_pick="ambiguous"))
    indexed = make_corpus(tmp_path / "indexed", per_class=2, index=True)
    text = (indexed / "corpus.csv").read_text().replace("fear/fear-000002.jpg,fear,1.0", "fear/fear-000002.jpg,fear,strong")
    (indexed / "corpus.csv").write_text(text)
    with pytest.raises(ValueError, match=r"corpus\.csv: row \d+: intensity 'strong' is not a number in \[0, 1\]"):
        Catalog(indexed, LocalWebSettings())
    with pytest.raises(ValueError, match="noise_pick must be one of"):
        LocalWebSettings(noise_pick="hard")


def test_deterministic_from_the_seed_with_ids_stable_across_seeds(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", per_class=10)
    noisy = dict(noise=0.3, broken=0.2, duplicates=0.2)
    a, b = (Catalog(corpus, LocalWebSettings(**noisy, seed=1)) for _ in range(2))
    c = Catalog(corpus, LocalWebSettings(**noisy, seed=2))
    base = "http://127.0.0.1:1"
    assert a.ground_truth(base) == b.ground_truth(base)
    assert [i.id for i in a.search("happy face")] == [i.id for i in b.search("happy face")]
    assert a.ground_truth(base) != c.ground_truth(base)
    originals = {i for i, im in a.images.items() if im.duplicate_of is None}
    assert originals == {i for i, im in c.images.items() if im.duplicate_of is None}
    # Two keywords of one class rank the same images differently, as two searches would.
    assert [i.id for i in a.search("happy face")] != [i.id for i in a.search("cara feliz")]
    assert {i.id for i in a.search("happy face")} == {i.id for i in a.search("cara feliz")}


@pytest.mark.parametrize("host", ["0.0.0.0", "localhost", "10.1.2.3", "::1", "192.168.0.5"])
def test_refuses_to_listen_off_loopback(host):
    with pytest.raises(ValueError, match="loopback"):
        LocalWebSettings(host=host)


def test_corpus_index_layout_and_its_errors(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", per_class=2, classes=("fear", "disgust"), index=True)
    assert {im.true_class for im in Catalog(corpus, LocalWebSettings(**CLEAN)).images.values()} == {"fear", "disgust"}
    text = (corpus / "corpus.csv").read_text().replace("disgust/disgust-000002.jpg,disgust", "disgust/disgust-000002.jpg,grief")
    (corpus / "corpus.csv").write_text(text)
    with pytest.raises(ValueError, match=r"corpus\.csv: row 4: unknown class 'grief'"):
        Catalog(corpus, LocalWebSettings())
    plain = make_corpus(tmp_path / "plain", per_class=1, classes=("fear",))
    (plain / "holiday").mkdir()
    with pytest.raises(ValueError, match="holiday: folder name is not a class"):
        Catalog(plain, LocalWebSettings())


def test_label_noise_counts_rows_against_the_truth(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", per_class=4, classes=("happiness", "sadness", "anger"))
    truth = Catalog(corpus, LocalWebSettings(**CLEAN)).ground_truth("http://127.0.0.1:1")
    entries = sorted(truth["images"].values(), key=lambda e: e["url"])
    flipped = {e["url"] for e in entries[::3]}
    other = {"happiness": "sadness", "sadness": "anger", "anger": "happiness"}
    rows = [{"url": e["url"], "label_name": other[e["class"]] if e["url"] in flipped else e["class"]} for e in entries]
    rows.append({"url": "http://elsewhere.example/x.jpg", "label_name": "anger"})
    measured = label_noise(rows, truth)
    assert (measured["samples"], measured["noisy"], measured["unknown"]) == (len(entries), len(flipped), 1)
    assert measured["noise"] == len(flipped) / len(entries)
    for cls, stats in measured["per_class"].items():
        labelled = [r for r in rows[:-1] if r["label_name"] == cls]
        assert stats["samples"] == len(labelled)
        assert stats["noisy"] == sum(r["url"] in flipped for r in labelled)


@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_a_discovery_of_the_embedded_web_measures_its_noise(tmp_path, noise):
    corpus = make_corpus(tmp_path / "corpus", per_class=12, classes=("happiness", "surprise"))
    with LocalWeb(corpus, LocalWebSettings(**{**CLEAN, "noise": noise})) as web:
        queries = [Query("happiness", "happy face", "en"), Query("surprise", "surprised face", "en")]
        cfg = DiscoverConfig(provider="localweb", api_base=web.base_url, progress=False)
        discover(queries, cfg, tmp_path / "c.parquet")
        rows = [{"url": r.url, "label_name": r.label} for r in read_candidates(tmp_path / "c.parquet")]
        measured = label_noise(rows, web.ground_truth())
        ground_truth_over_http = fetch_all([f"{web.base_url}/ground_truth.json"])[0]
    assert measured["unknown"] == 0 and measured["samples"] == len(rows)
    if noise == 0:
        assert measured["noise"] == 0.0
    else:
        assert 0.2 < measured["noise"] < 0.6
    assert ground_truth_over_http[0] == 200 and b'"images"' in ground_truth_over_http[2]


def test_cli_announces_ready_and_stops_on_sigterm(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", per_class=2, classes=("neutral",))
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "crawler.localweb", "--corpus", str(corpus), "--seed", "3", "--noise", "0"],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    try:
        lines = [proc.stdout.readline().strip() for _ in range(2)]
        assert lines[1].startswith("READY http://127.0.0.1:") and lines[0] == lines[1].split()[1]
        status, body = search(lines[0], keyword("neutral"))
        assert status == 200 and body["result_count"] == 2
        digest = hashlib.sha256((corpus / "neutral/neutral-000001.jpg").read_bytes()).hexdigest()
        served = {hashlib.sha256(b).hexdigest() for _, _, b in fetch_all([r["url"] for r in body["results"]])}
        assert digest in served
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
