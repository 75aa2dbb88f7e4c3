"""The reports people look at: an evaluation, a training run and a crawl, each as markdown with its
contact sheets and as one self-contained HTML file that headless Chromium renders with every image loaded."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from scn_scale import checkpoint, gallery, metrics, report
from scn_scale.config import TrainConfig, save_config
from scn_scale.evaluate import EvalConfig, evaluate
from scn_scale.model import SCNModel
from scn_scale.noise import make_noise, save_overrides
from scn_scale.relabel import Proposal
from scn_scale.relabel_table import RelabelTable
from scn_scale.weights import save_model_file
from shards import BASIC7, read_manifest
from tests.conftest import write_shard_set

CHROMIUM_INSTALL = "apt-get install -y chromium (Debian's package; .ci/run installs it)"
#: Marks on <body>, once the page has loaded, how many images it has and how many did not load.
PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  document.body.dataset.images = images.length;
  document.body.dataset.broken = images.filter(i => !i.complete || i.naturalWidth === 0).length;
  document.body.dataset.text = document.body.innerText.trim().length;
});
</script>"""


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    """Headless Chromium, time-bounded, with a profile of its own (root needs --no-sandbox)."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail(f"headless Chromium is needed to render the HTML reports: {CHROMIUM_INSTALL}")
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
               "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=True)


def screenshot(html: Path, png: Path, profile: Path, size: tuple[int, int] = (1200, 1600)) -> None:
    chromium([f"--window-size={size[0]},{size[1]}", f"--screenshot={png}", html.as_uri()], profile)


def check_in_chromium(html: Path, tmp: Path) -> None:
    """Every image of the page loads in Chromium, the page has text, and a screenshot of it is not blank."""
    page = html.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//|<link|<script""", page, re.I), "an external resource"
    probe = tmp / f"probe-{html.parent.name}.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    dom = chromium(["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], tmp / "profile").stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    marks = dict(re.findall(r'data-(\w+)="(\d+)"', body.group(1)))
    assert int(marks["images"]) == page.count("<img ") > 0
    assert int(marks["broken"]) == 0
    assert int(marks["text"]) > 200
    shot = tmp / f"shot-{html.parent.name}.png"
    screenshot(html, shot, tmp / "profile")
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("L"), dtype=np.float64)
    assert pixels.std() > 10 and (pixels < 200).mean() > 0.01, "the page renders blank"


def linked_images(md: Path) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md.read_text())


def check_page(md: Path) -> None:
    """Every image the markdown names exists and decodes, and the HTML twin sits beside it."""
    for name in linked_images(md):
        with Image.open(md.parent / name) as im:
            im.load()
    assert (md.parent / "report.html").is_file()


# -- evaluation -----------------------------------------------------------------------------


def test_evaluation_report_has_galleries_and_renders_in_chromium(tmp_path: Path) -> None:
    shards = tmp_path / "set"
    write_shard_set(shards, [9, 7], classes=BASIC7, size=32)
    torch.manual_seed(0)
    (tmp_path / "ckpt").mkdir()
    save_model_file(str(tmp_path / "ckpt" / "model.pt"), SCNModel(7), list(BASIC7), {"epoch": 1, "image_size": 32})
    result = evaluate(EvalConfig(checkpoint=str(tmp_path / "ckpt"), shards=str(shards), out=str(tmp_path / "eval"),
                                 batch_size=8, loader_workers=0))
    md = tmp_path / "eval" / "report.md"
    assert result["galleries"] == {"confident_errors": report.ERRORS_PNG, "lowest_alpha": report.LOWEST_ALPHA_PNG}
    assert set(result["galleries"].values()) <= set(linked_images(md))
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["galleries"] == result["galleries"]
    check_page(md)
    check_in_chromium(tmp_path / "eval" / "report.html", tmp_path)


# -- training runs --------------------------------------------------------------------------


def lay_out_run(tmp_path: Path, method: str = "scn") -> tuple[Path, dict]:
    """A run as the trainer leaves it: checkpoints (config, classes, state, relabel table) and
    per-rank alpha parts; its training set has a noise table that records the truth."""
    train = tmp_path / "train"
    keys = write_shard_set(train, [6, 6], classes=BASIC7, size=32)
    manifest = read_manifest(str(train), columns=["key", "label"]).to_pydict()
    label = dict(zip(manifest["key"], manifest["label"]))
    noise = make_noise(manifest["key"], manifest["label"], 7, 0.5, seed=0)
    save_overrides(noise, str(tmp_path / "noise.parquet"))
    noisy = noise.to_pydict()
    run = tmp_path / "runs" / "scn"
    table = RelabelTable()
    # One noisy sample relabeled back to its true label, another to a third class.
    k0, k1 = noisy["key"][0], noisy["key"][1]
    wrong = next(c for c in range(7) if c not in (noisy["label"][1], noisy["true_label"][1]))
    table.merge([Proposal(k0, noisy["label"][0], noisy["true_label"][0], 0.6, 2),
                 Proposal(k1, noisy["label"][1], wrong, 0.4, 2)])
    cfg = TrainConfig(train_shards=str(train), val_shards=str(train), run_name="scn",
                      label_overrides=str(tmp_path / "noise.parquet"), method=method)
    for epoch in (1, 2):
        directory = run / checkpoint.checkpoint_dir_name(epoch)
        directory.mkdir(parents=True)
        save_config(cfg, directory / checkpoint.CONFIG_FILE)
        (directory / checkpoint.CLASSES_FILE).write_text(json.dumps(list(BASIC7)))
        table.save(str(directory / checkpoint.TABLE_FILE))
        (directory / checkpoint.STATE_FILE).write_text(json.dumps({"epoch": epoch}))
    rng = np.random.default_rng(0)
    alpha = {k: float(a) for k, a in zip(keys, rng.uniform(0.2, 0.9, len(keys)))}
    # Rank 1 trained two of rank 0's samples again (readers revisit samples): rank 0's values count.
    metrics.write_alpha_part(str(run), 2, 0, pa.array(keys[:8]), np.array([alpha[k] for k in keys[:8]]))
    metrics.write_alpha_part(str(run), 2, 1, pa.array(keys[6:]), np.array([0.01, 0.02] + [alpha[k] for k in keys[8:]]))
    metrics.write_alpha_part(str(run), 1, 0, pa.array(keys), np.zeros(len(keys)))  # an older epoch: not shown
    truth = {**label, **dict(zip(noisy["key"], noisy["true_label"]))}
    given = {**label, **dict(zip(noisy["key"], noisy["label"]))}
    current = {**given, k0: noisy["true_label"][0], k1: wrong}
    return run, {"keys": keys, "alpha": alpha, "truth": truth, "given": given, "current": current}


def test_run_report_shows_lowest_alpha_and_relabels(tmp_path: Path, monkeypatch, capsys) -> None:
    run, known = lay_out_run(tmp_path)
    read = report.read_alpha(str(run), 2)
    assert dict(zip(read.column("key").to_pylist(), read.column("alpha").to_pylist())) == pytest.approx(known["alpha"])
    assert report.read_alpha(str(run), 3) is None

    drawn = {}

    def spy(name):
        original = getattr(gallery, name)

        def wrapper(*args, **kwargs):
            drawn[name] = fig = original(*args, **kwargs)
            return fig
        monkeypatch.setattr(gallery, name, wrapper)

    spy("lowest_alpha")
    spy("relabels")
    assert report.main([str(run), "--samples", "4"]) == 0
    assert "report written to" in capsys.readouterr().out
    md = run / "report" / "report.md"
    check_page(md)
    text = md.read_text()
    mean = np.mean(list(known["alpha"].values()))  # each key once, with rank 0's value
    assert f"The 4 of 12 samples trained in epoch 2 with the lowest alpha (mean alpha {mean:.3f})" in text
    assert "2 samples carry a label other than their original one" in text
    assert "does not train alpha" not in text
    assert "1 relabels are right and 1 wrong" in text

    lowest = sorted(known["alpha"], key=known["alpha"].get)[:4]
    captions = [ax.get_xlabel() for ax in drawn["lowest_alpha"].axes if ax.get_xlabel()]
    assert [c.split("\n")[0] for c in captions] == [gallery.clip(k) for k in lowest]
    for key, caption in zip(lowest, captions):  # the label trained on (the noise table's), the truth where it differs
        lines = caption.split("\n")
        given, now, true = (BASIC7[known[name][key]] for name in ("given", "current", "truth"))
        assert lines[1] == (f"label {given}" if given == now else f"{given} -> {now}")
        assert (f"true {true}" in lines) == (now != true)
    relabel_captions = [ax.get_xlabel() for ax in drawn["relabels"].axes if ax.get_xlabel()]
    assert len(relabel_captions) == 2 and "margin 0.60, epoch 2" in relabel_captions[0]
    check_in_chromium(run / "report" / "report.html", tmp_path)


@pytest.mark.parametrize("method", ["baseline", "eac"])
def test_run_report_says_when_the_method_does_not_train_alpha(tmp_path: Path, method: str) -> None:
    run, _ = lay_out_run(tmp_path, method)
    assert report.main([str(run), "--samples", "4"]) == 0
    assert (f"The {method} method does not train alpha: these are its untrained importance branch's values."
            in (run / "report" / "report.md").read_text())


def test_run_report_without_alpha_and_bad_directories(tmp_path: Path, capsys) -> None:
    run, _ = lay_out_run(tmp_path)
    shutil.rmtree(run / metrics.ALPHA_DIR)
    assert report.main([str(run), "--out", str(tmp_path / "out")]) == 0
    assert "recorded no per-sample alpha for epoch 2" in (tmp_path / "out" / "report.md").read_text()
    check_page(tmp_path / "out" / "report.md")

    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "nowhere", tmp_path / "empty"):
        capsys.readouterr()
        assert report.main([str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err


# -- crawls ---------------------------------------------------------------------------------


QUERIES = """\
happiness:
  en: [happy face]
sadness:
  en: [sad face]
anger:
  en: [angry face]
"""


def test_crawl_report_shows_each_class_and_the_dropped_duplicates(tmp_path: Path) -> None:
    from crawler import build
    from crawler.localweb import LocalWeb, LocalWebSettings
    from crawler.synthetic import CorpusConfig, generate_corpus

    corpus = tmp_path / "corpus"
    generate_corpus(CorpusConfig(out=str(corpus), per_class=8, classes=["happiness", "sadness", "anger"]))
    (tmp_path / "queries.yaml").write_text(QUERIES)
    out = tmp_path / "crawl"
    settings = LocalWebSettings(noise=0.2, duplicates=0.5, broken=0.0, slow=0.0, nonimage=0.0, seed=3)
    with LocalWeb(corpus, settings) as web:
        assert build.main(["--queries", str(tmp_path / "queries.yaml"), "--provider", "localweb",
                           "--api-base", web.base_url, "--out", str(out), "--faces", "none",
                           "--allow-host", "127.0.0.1", "--workers", "0", "--conflicts", "first",
                           "--work-shard-size", "5", "--no-progress"]) == 0

    # The dropped faces' crops are gone from the work files; their thumbnails are kept.
    work = pa.concat_tables([pq.read_table(p) for p in sorted((out / "work").glob("ws-*.faces.parquet"))])
    assert work.column("image").null_count == work.num_rows
    dropped = pq.read_table(out / "duplicates.parquet").to_pylist()
    assert dropped and all(row["thumbnail"] for row in dropped)
    kept = gallery.SampleImages(str(out)).fetch(row["duplicate_of"] for row in dropped)
    for row in dropped:
        with Image.open(io.BytesIO(row["thumbnail"])) as thumb:
            assert max(thumb.size) <= 64
            small = np.asarray(thumb.convert("RGB"), dtype=np.float64)
        if row["reason"] == "exact" and row["duplicate_of"] in kept:  # the same bytes: the same face
            with Image.open(io.BytesIO(kept[row["duplicate_of"]])) as im:
                same = np.asarray(im.convert("RGB").resize(thumb.size), dtype=np.float64)
            assert np.abs(small - same).mean() < 12

    assert report.main([str(out), "--samples", "4"]) == 0
    md = out / "report" / "report.md"
    check_page(md)
    images = linked_images(md)
    assert images == ["crawl_happiness.png", "crawl_sadness.png", "crawl_anger.png", report.DUPLICATES_PNG]
    written = json.loads((out / "crawl_summary.json").read_text())["written_per_class"]
    for name, n in written.items():
        assert f"| {name} | {n} |" in md.read_text()
    check_in_chromium(out / "report" / "report.html", tmp_path)


def test_markdown_to_html_inlines_images_and_refuses_external_ones(tmp_path: Path) -> None:
    from scn_scale.report_html import markdown_to_html, write_html

    Image.new("RGB", (4, 3), "red").save(tmp_path / "a.png")
    md = tmp_path / "report.md"
    md.write_text("# Title <x>\n\ntext with **bold**, `a<b` and [a link](report.json)\nsecond line\n\n"
                  "- item one\n- item ![a](a.png)\n\n| h1 | h2 |\n|---|---|\n| 1 | 2 |\n")
    page = write_html(md).read_text()
    assert "<h1>Title &lt;x&gt;</h1>" in page  # raw HTML in a report is text
    assert ('<p>text with <strong>bold</strong>, <code>a&lt;b</code> and <a href="report.json">a link</a>\n'
            "second line</p>") in page
    assert '<li>item <img alt="a" src="data:image/png;base64,' in page
    assert re.search(r"<th>h1</th>\s*<th>h2</th>.*<td>1</td>\s*<td>2</td>", page, re.S)
    with pytest.raises(ValueError, match="local files only"):
        markdown_to_html("![x](https://example.com/x.png)", tmp_path, "t")
    with pytest.raises(FileNotFoundError):
        markdown_to_html("![x](missing.png)", tmp_path, "t")
