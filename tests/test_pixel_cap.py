"""A pixel bomb in a shard: a 17 KB PNG declaring 12000x12000 pixels (432 MB as an RGB tensor).

The writer refuses it unless told otherwise; once in a set (written with `max_pixels=None`,
as a hostile or foreign tool would), every reader checks its header first and skips it,
counted, without decoding it: the training and evaluation stream, the galleries of the
reports, verify and split. The good samples beside it are still read.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_hostile_server import bomb_png

from scn_scale import gallery
from scn_scale.data import shard_loader
from scn_scale.importers.__main__ import main as import_main
from shards import Sample, ShardWriter, key_from_bytes, open_shard_set
from shards.pixels import DEFAULT_MAX_PIXELS, TooManyPixels, image_size
from shards.verify import verify
from tests.conftest import jpeg_bytes

CLASSES = ("neutral", "happiness")
BOMB = bomb_png(12_000, 12_000)
BOMB_KEY = "bomb-000"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


class PeakRss:
    """The largest resident set size seen while the block runs, in MB above where it started."""

    def __enter__(self) -> "PeakRss":
        self.start, self.peak, self._done = rss_mb(), 0.0, threading.Event()
        self._thread = threading.Thread(target=self._watch)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, rss_mb() - self.start)
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def test_the_bomb_is_what_it_says() -> None:
    assert len(BOMB) < 20_000
    assert 12_000 * 12_000 > DEFAULT_MAX_PIXELS
    with pytest.raises(TooManyPixels, match="12000x12000"):
        image_size(BOMB)
    assert image_size(BOMB, max_pixels=None) == (12_000, 12_000)  # told otherwise: just the header


@pytest.fixture
def bombed_set(tmp_path: Path) -> tuple[Path, list[str]]:
    """A set of 4 good samples and the bomb, in one shard; returns (directory, good keys)."""
    rng = np.random.default_rng(0)
    good = []
    with ShardWriter(tmp_path, CLASSES, max_pixels=None) as writer:
        for i in range(5):
            if i == 2:
                writer.write(Sample(key=BOMB_KEY, image=BOMB, label=0, ext="png"))
                continue
            data = jpeg_bytes(rng, 32, i % 2)
            good.append(key_from_bytes(data))
            writer.write(Sample(key=good[-1], image=data, label=i % 2))
    return tmp_path, good


def test_the_writer_refuses_a_bomb_naming_its_key_and_keeps_the_rest(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    data = jpeg_bytes(rng, 32)
    with ShardWriter(tmp_path, CLASSES) as writer:
        with pytest.raises(TooManyPixels, match=f"sample {BOMB_KEY}: image 12000x12000"):
            writer.write(Sample(key=BOMB_KEY, image=BOMB, label=0, ext="png"))
        writer.write(Sample(key=key_from_bytes(data), image=data, label=1))
    assert open_shard_set(str(tmp_path)).num_samples == 1


def test_an_import_refuses_a_bomb_with_one_error_line_unless_told_otherwise(tmp_path: Path, capsys) -> None:
    tree = tmp_path / "tree"
    for name in CLASSES:
        (tree / name).mkdir(parents=True)
        (tree / name / "ok.jpg").write_bytes(jpeg_bytes(np.random.default_rng(len(name)), 40))
    (tree / "neutral" / "bomb.png").write_bytes(BOMB)
    assert import_main(["imagefolder", "--root", str(tree), "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [line for line in err.splitlines()
                                                                                if line.strip()]
    assert "bomb.png" in err and "over the cap" in err
    assert import_main(["imagefolder", "--root", str(tree), "--out", str(tmp_path / "told"), "--max-pixels", "0"]) == 0
    assert open_shard_set(str(tmp_path / "told")).num_samples == 3


def test_the_training_and_evaluation_loader_skips_the_bomb_undecoded(bombed_set) -> None:
    out, good = bombed_set
    for train in (False, True):
        loader = shard_loader(open_shard_set(str(out)), train=train, image_size=32, batch_size=1, loader_workers=0,
                              shuffle_buffer=0, interleave=1)
        with PeakRss() as rss:
            batches = list(loader)
        keys = {k for batch in batches for k in batch["key"]}
        assert keys == set(good)
        assert sum(int(batch["skipped"]) for batch in batches) == 1
        assert rss.peak < 200  # decoding the bomb alone would take 432 MB


def test_the_galleries_draw_the_bomb_as_a_tile_without_decoding_it(bombed_set) -> None:
    out, good = bombed_set
    images = gallery.SampleImages(str(out)).fetch([BOMB_KEY, *good])
    assert images[BOMB_KEY] == BOMB
    with PeakRss() as rss:
        assert gallery._pixels(BOMB) == (None, "too many pixels")
        figure = gallery.samples(images, [BOMB_KEY, *good], ["bomb", *good], title="with a bomb")
        figure.canvas.draw()
    assert rss.peak < 200
    assert any(text.get_text() == "too many pixels" for ax in figure.axes for text in ax.texts)


def test_verify_names_the_bomb(bombed_set) -> None:
    out, _ = bombed_set
    faults = verify(out).faults
    assert len(faults) == 1 and BOMB_KEY in faults[0] and "over the cap" in faults[0]
