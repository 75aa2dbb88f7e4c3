"""Contact sheets: images fetched by key from real shard sets (at their offsets, and without them), and
the samples each gallery picks, read back from the drawn figure's captions and frames."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from matplotlib.colors import to_rgba
from PIL import Image

from scn_scale import gallery
from scn_scale.report import save_figure
from shards import BASIC7
from shards.manifest import MANIFEST_NAME
from tests.conftest import write_shard_set


def tar_images(directory: Path) -> dict[str, bytes]:
    """Every sample's image bytes, read with the standard library's tarfile."""
    out = {}
    for path in sorted(directory.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext == "jpg":
                    out[key] = tar.extractfile(member).read()
    return out


def rewrite_manifest(directory: Path, offsets: pa.Array | None) -> None:
    """The manifest with its offsets replaced (or its offset column removed, as in sets written before them)."""
    table = pq.read_table(directory / MANIFEST_NAME)
    i = table.schema.get_field_index("offset")
    table = table.remove_column(i) if offsets is None else table.set_column(i, "offset", offsets)
    pq.write_table(table, directory / MANIFEST_NAME)


def captions(fig) -> list[str]:
    return [ax.get_xlabel() for ax in fig.axes if ax.get_xlabel()]


def frames(fig) -> list[str | None]:
    """Per captioned tile: "right", "wrong" or None (no frame), from its spines."""
    out = []
    for ax in fig.axes:
        if not ax.get_xlabel():
            continue
        spine = ax.spines["left"]
        if not spine.get_visible():
            out.append(None)
        else:
            out.append("right" if spine.get_edgecolor() == to_rgba(gallery.RIGHT_COLOR) else "wrong")
    return out


@pytest.fixture
def shard_set(tmp_path: Path) -> tuple[Path, list[str]]:
    directory = tmp_path / "set"
    keys = write_shard_set(directory, [5, 4, 6], classes=BASIC7, size=24)
    return directory, keys


def test_images_by_key_at_offsets_without_them_and_at_stale_ones(shard_set) -> None:
    directory, keys = shard_set
    truth = tar_images(directory)
    wanted = [keys[0], keys[4], keys[7], keys[14], "not-a-key"]
    expected = {k: truth[k] for k in wanted[:-1]}
    assert gallery.SampleImages(str(directory)).fetch(wanted) == expected
    assert gallery.SampleImages(str(directory)).fetch([]) == {}

    # Offsets pointing elsewhere (a shard rewritten since): found by scanning instead.
    offsets = pq.read_table(directory / MANIFEST_NAME).column("offset").to_numpy()
    rewrite_manifest(directory, pa.array(offsets[::-1].copy()))
    assert gallery.SampleImages(str(directory)).fetch(wanted) == expected
    # Null offsets, and no offset column at all.
    rewrite_manifest(directory, pa.nulls(len(keys), pa.int64()))
    assert gallery.SampleImages(str(directory)).fetch(wanted) == expected
    rewrite_manifest(directory, None)
    assert gallery.SampleImages(str(directory)).fetch(wanted) == expected


def test_sheet_draws_frames_captions_and_placeholders(tmp_path: Path, rng) -> None:
    from tests.conftest import jpeg_bytes

    tiles = [gallery.Tile(jpeg_bytes(rng, 32), "a\nright", True), gallery.Tile(jpeg_bytes(rng, 32), "b\nwrong", False),
             gallery.Tile(None, "c\nmissing"), gallery.Tile(b"not an image", "d\nbroken")]
    fig = gallery.contact_sheet([tiles[:2], [], tiles[2:]], "a sheet", row_titles=["one", "two", "three"], note="why")
    assert captions(fig) == ["a\nright", "b\nwrong", "c\nmissing", "d\nbroken"]
    assert frames(fig) == ["right", "wrong", None, None]
    assert [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()] == ["one", "two", "three"]
    save_figure(fig, tmp_path / "sheet.png")
    with Image.open(tmp_path / "sheet.png") as im:
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3).astype(int)
    for color in (gallery.RIGHT_COLOR, gallery.WRONG_COLOR):  # the frames are drawn in their colours
        target = np.array(to_rgba(color)[:3]) * 255
        assert (np.abs(pixels - target).max(axis=1) < 8).sum() > 50, color
    save_figure(gallery.contact_sheet([], "empty"), tmp_path / "empty.png")  # a sheet of nothing still draws


def test_confident_errors_are_the_surest_wrong_predictions_per_class(shard_set) -> None:
    directory, keys = shard_set
    n = len(keys)
    classes = list(BASIC7)
    labels = np.array([i % 3 for i in range(n)])
    preds = labels.copy()
    wrong = [1, 2, 4, 5, 7, 10]  # true classes 1, 2, 1, 2, 1, 1
    preds[wrong] = 6
    probs = np.full((n, 7), 0.01)
    surety = {1: 0.5, 2: 0.9, 4: 0.7, 5: 0.3, 7: 0.95, 10: 0.6}
    for i, p in surety.items():
        probs[i, 6] = p
    fig = gallery.confident_errors(gallery.SampleImages(str(directory)), keys, labels, preds, probs, classes, per_class=3)
    shown = [c.split("\n")[0] for c in captions(fig)]
    expected = [7, 4, 10, 2, 5]  # class 1 by surety (top 3 of 4), then class 2
    assert shown == [gallery.clip(keys[i]) for i in expected]
    assert all(f == "wrong" for f in frames(fig))
    titles = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert titles[0] == "neutral\n0 of 5 wrong" and titles[1] == "happiness\n4 of 5 wrong"
    assert "p 0.95" in captions(fig)[0]
    assert "no image" not in "".join(t.get_text() for ax in fig.axes for t in ax.texts)


def test_lowest_alpha_and_relabels(shard_set) -> None:
    directory, keys = shard_set
    images = gallery.SampleImages(str(directory))
    classes = list(BASIC7)
    alpha = np.linspace(0.9, 0.1, len(keys))  # the last keys weigh least
    labels = [0] * len(keys)
    truth = {keys[-1]: 0, keys[-2]: 3}
    relabeled = {keys[-3]: 2}
    fig = gallery.lowest_alpha(images, keys, alpha, labels, classes, n=3, truth=truth, relabeled=relabeled)
    assert [c.split("\n")[0] for c in captions(fig)] == [gallery.clip(keys[-1]), gallery.clip(keys[-2]),
                                                        gallery.clip(keys[-3])]
    assert captions(fig)[1].split("\n")[1:] == ["label neutral", "true surprise", "alpha 0.157"]
    assert captions(fig)[2].split("\n")[1] == "neutral -> sadness"
    assert frames(fig) == ["right", "wrong", None]  # the third one's truth is not known

    table = {"key": keys[:4], "original_label": [0, 1, 2, 3], "current_label": [0, 4, 5, 6],
             "margin": [0.9, 0.2, 0.4, 0.3], "epoch": [2, 3, 4, 5]}
    fig = gallery.relabels(images, table, classes, n=2, truth={keys[2]: 5, keys[3]: 3})
    assert [c.split("\n")[:2] for c in captions(fig)] == [[gallery.clip(keys[2]), "sadness -> disgust"],
                                                        [gallery.clip(keys[3]), "surprise -> anger"]]
    assert "true surprise" in captions(fig)[1] and "margin 0.30, epoch 5" in captions(fig)[1]
    assert frames(fig) == ["right", "wrong"]
