"""Contact sheets of face crops: the one place the project draws pictures of its samples.

SCN's worth lies in which samples it doubts and relabels, and no number shows that. The
evaluation report shows the confident errors per class and the lowest-alpha test samples,
the training-run report the lowest-alpha training samples and the relabels, the crawl
report what each class looks like and what the dedupe dropped, the demo report the same
kinds of sheets; all are drawn here so that they read alike: a caption under every tile,
a green frame where a label or prediction is right, a red one where it is wrong, none
where nobody knows.

Sheets are matplotlib figures (object API on the Agg canvas, no pyplot);
`scn_scale.report.save_figure` writes them. Images come by key from a shard set
(`SampleImages`), read at the byte offset the manifest records for each sample, so a
sheet of 16 faces reads 16 samples, not the set.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image

from shards.fs import join, open_fs
from shards.manifest import MANIFEST_NAME
from shards.pixels import TooManyPixels, image_size
from shards.sample import IMAGE_EXTENSIONS
from shards.tario import TarFormatError, iter_members, members_at

log = logging.getLogger(__name__)

#: Width and height of one tile's picture, in inches (at the figure's 100 dpi, 120 pixels).
TILE_INCHES = 1.2
#: Frame colours of a tile whose label or prediction is right, and wrong.
RIGHT_COLOR, WRONG_COLOR = "tab:green", "tab:red"
#: Manifest rows read at a time while looking for keys: a set of millions costs a pass, not its size in memory.
_MANIFEST_BATCH = 65536


# -- images by key --------------------------------------------------------------------------


class SampleImages:
    """The image bytes of a shard set's samples (a directory or an fsspec URL), fetched by key.

    Each manifest row names its shard and the byte offset of its sample's first tar
    member, so a sample costs one seek. Rows without an offset (sets written before
    offsets were recorded), and offsets that no longer point at their sample (a shard
    rewritten since), fall back to one scan of their shard.
    """

    def __init__(self, shards: str) -> None:
        self.shards = str(shards)
        self._fs, self._root = open_fs(self.shards)

    def fetch(self, keys: Iterable[str]) -> dict[str, bytes]:
        """key -> image bytes, for each of `keys` the set holds; the others are left out, with a warning."""
        wanted = sorted(set(keys))
        if not wanted:
            return {}
        found: dict[str, bytes] = {}
        for shard, places in self._places(wanted).items():
            found.update(self._read(join(self._root, shard), places))
        if len(found) < len(wanted):
            missing = [k for k in wanted if k not in found]
            log.warning("%s: %d of %d samples asked for have no image there, e.g. %s",
                        self.shards, len(missing), len(wanted), missing[:3])
        return found

    def _places(self, wanted: list[str]) -> dict[str, list[tuple[str, int | None]]]:
        """shard name -> (key, offset or None) of the wanted keys, from the manifest."""
        places: dict[str, list[tuple[str, int | None]]] = {}
        value_set = pa.array(wanted, pa.string())
        with self._fs.open(join(self._root, MANIFEST_NAME), "rb") as f:
            manifest = pq.ParquetFile(f)
            columns = [c for c in ("key", "shard", "offset") if c in manifest.schema_arrow.names]
            for batch in manifest.iter_batches(batch_size=_MANIFEST_BATCH, columns=columns):
                for row in batch.filter(pc.is_in(batch.column("key"), value_set=value_set)).to_pylist():
                    places.setdefault(row["shard"], []).append((row["key"], row.get("offset")))
        return places

    def _read(self, path: str, places: list[tuple[str, int | None]]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        with self._fs.open(path, "rb") as f:
            for key, offset in sorted(places, key=lambda p: p[1] or 0):
                if offset is not None and (image := _image_at(f, path, key, offset)) is not None:
                    found[key] = image
            rest = {key for key, _ in places if key not in found}
            if rest:
                f.seek(0)
                found.update(_scan(f, path, rest))
        return found


def _image_at(f, path: str, key: str, offset: int) -> bytes | None:
    """The image member of the sample `key` whose members start at `offset`, or None if they are not there."""
    try:
        members = members_at(f, path, key, offset)
    except TarFormatError:
        return None  # no tar there: the shard changed since the manifest was written
    return next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None) if members else None


def _scan(f, path: str, keys: set[str]) -> dict[str, bytes]:
    """The image members of `keys`, reading the shard from its start until all are found."""
    found: dict[str, bytes] = {}
    try:
        for name, data in iter_members(f, path):
            key, _, ext = name.partition(".")
            if key in keys and ext in IMAGE_EXTENSIONS:
                found[key] = data
                if len(found) == len(keys):
                    break
    except TarFormatError as exc:  # a damaged shard costs its tiles ("no image"), not the report
        log.warning("%s: %s; %d samples not read", path, exc, len(keys) - len(found))
    return found


# -- drawing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tile:
    """One picture of a sheet with its caption."""

    image: bytes | None  # encoded (JPEG, PNG, WebP); None draws an empty tile that says so
    caption: str  # one line or several, "\n"-separated
    right: bool | None = None  # framed green (True), red (False), or not framed (None: not known)


def in_rows(tiles: Sequence[Tile], columns: int = 8) -> list[list[Tile]]:
    """Tiles cut into rows of `columns`."""
    return [list(tiles[i : i + columns]) for i in range(0, len(tiles), columns)]


def clip(text: str, width: int = 16) -> str:
    """Text cut to fit under a tile (content-hash keys are long; their start is enough to find them)."""
    return text if len(text) <= width else text[: width - 1] + "…"


def contact_sheet(rows: Sequence[Sequence[Tile]], title: str, row_titles: Sequence[str] | None = None,
                  note: str = "") -> Figure:
    """A grid of tiles, one list per row, each row optionally titled on its left; `note` goes under the title.

    An empty row keeps its place (and title) and says "none"; a sheet without any tile says so.
    """
    columns = max((len(row) for row in rows), default=0)
    heading = f"{title}\n{note}" if note else title
    if columns == 0:
        fig = Figure(figsize=(6, 1.2), layout="constrained")
        fig.suptitle(heading, fontsize=10)
        fig.text(0.5, 0.3, "nothing to show", ha="center", color="gray")
        return fig
    lines = max(tile.caption.count("\n") + 1 for row in rows for tile in row)
    # Room for the tiles, their captions (7 pt lines) and the heading (10 pt, about 0.075 in a character).
    width = max(columns * TILE_INCHES + (0.8 if row_titles else 0.2), 0.075 * max(map(len, heading.split("\n"))))
    height = len(rows) * (TILE_INCHES + 0.16 * lines + 0.15) + 0.25 * (heading.count("\n") + 1) + 0.2
    fig = Figure(figsize=(width, height), layout="constrained")
    fig.suptitle(heading, fontsize=10)
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for r, row in enumerate(rows):
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(row):
                _draw_tile(ax, row[c])
            else:
                for spine in ax.spines.values():
                    spine.set_visible(False)
        if not row:
            axes[r][0].text(0.5, 0.5, "none", ha="center", va="center", color="gray", transform=axes[r][0].transAxes)
        if row_titles:
            axes[r][0].set_ylabel(row_titles[r], fontsize=9)
    return fig


def _draw_tile(ax: Axes, tile: Tile) -> None:
    pixels, why = _pixels(tile.image)
    if pixels is None:
        ax.set_facecolor("0.93")
        ax.text(0.5, 0.5, why, ha="center", va="center", fontsize=7, color="gray", transform=ax.transAxes)
    else:
        ax.imshow(pixels)
    ax.set_xlabel(tile.caption, fontsize=7)
    for spine in ax.spines.values():
        if tile.right is None:
            spine.set_visible(False)
        else:
            spine.set_edgecolor(RIGHT_COLOR if tile.right else WRONG_COLOR)
            spine.set_linewidth(3)


def _pixels(data: bytes | None) -> tuple[np.ndarray | None, str]:
    """The tile's pixels, or None and what the tile says instead. The header is checked against the
    pixel cap before decoding: a shard's pixel bomb is drawn as a grey tile, not decoded."""
    if data is None:
        return None, "no image"
    try:
        image_size(data)
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB")), ""
    except TooManyPixels as exc:
        log.warning("an image of %d bytes skipped: %s", len(data), exc)
        return None, "too many pixels"
    except Exception as exc:  # Pillow raises many types for bad bytes; the tile says "unreadable"
        log.warning("an image of %d bytes does not decode: %s", len(data), exc)
        return None, "unreadable"


# -- the galleries ------------------------------------------------------------------------


def samples(
    images: Mapping[str, bytes],
    keys: Sequence[str],
    captions: Sequence[str],
    *,
    title: str,
    note: str = "",
    right: Sequence[bool | None] | None = None,
    columns: int = 8,
) -> Figure:
    """A sheet of the given samples, in order, each with its caption (and frame, from `right`);
    `images` holds their bytes by key (`SampleImages.fetch`), a key it lacks draws "no image"."""
    frames = right if right is not None else [None] * len(keys)
    tiles = [Tile(images.get(key), caption, r) for key, caption, r in zip(keys, captions, frames)]
    return contact_sheet(in_rows(tiles, columns), title, note=note)


def _label_lines(label: int, classes: Sequence[str], truth: int | None, current: int | None = None) -> list[str]:
    """"label X", or "X -> Y" when relabeled to Y; then "true Z" when the truth is known and differs."""
    shown = label if current is None else current
    lines = [f"label {classes[label]}" if shown == label else f"{classes[label]} -> {classes[shown]}"]
    if truth is not None and truth != shown:
        lines.append(f"true {classes[truth]}")
    return lines


def lowest_alpha(
    images: SampleImages,
    keys: Sequence[str],
    alpha: Sequence[float],
    labels: Sequence[int],
    classes: Sequence[str],
    *,
    n: int = 16,
    preds: Sequence[int] | None = None,
    truth: Mapping[str, int] | None = None,
    relabeled: Mapping[str, int] | None = None,
    title: str = "Lowest alpha",
) -> Figure:
    """The `n` samples of lowest alpha (importance): those SCN trusts least, mislabeled or ambiguous.

    With `preds` (an evaluation) the frame says whether the prediction is right; with
    `truth` (key -> true label, where known) whether the label trained on is. `relabeled`
    (key -> current label) shows the labels the relabel table changed.
    """
    order = [int(i) for i in np.argsort(np.asarray(alpha, dtype=np.float64), kind="stable")[:n]]
    chosen, captions, right = [keys[i] for i in order], [], []
    for i, key in zip(order, chosen):
        label = int(labels[i])
        known = None if truth is None else truth.get(key)
        current = None if relabeled is None else relabeled.get(key)
        lines = [clip(key), *_label_lines(label, classes, known, current)]
        if preds is not None:
            lines.append(f"pred {classes[int(preds[i])]}")
            right.append(int(preds[i]) == label)
        else:
            right.append(None if known is None else known == (label if current is None else current))
        captions.append("\n".join([*lines, f"alpha {float(alpha[i]):.3f}"]))
    note = "the samples SCN weighs least"
    if preds is not None:
        note += "; frame: prediction right (green) or wrong (red)"
    elif truth is not None:
        note += "; frame: label right (green) or wrong (red)"
    return samples(images.fetch(chosen), chosen, captions, title=title, note=note, right=right)


def confident_errors(
    images: SampleImages,
    keys: Sequence[str],
    labels: Sequence[int],
    preds: Sequence[int],
    probs: np.ndarray,
    classes: Sequence[str],
    *,
    per_class: int = 6,
    title: str = "Confident errors per true class",
) -> Figure:
    """Per true class (a row each), the wrong predictions made with the highest probability: a
    mislabeled test sample, a face that really is ambiguous, or what the model confuses."""
    labels, preds = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    confidence = np.asarray(probs)[np.arange(len(preds)), preds] if len(preds) else np.zeros(0)
    chosen, row_titles = [], []
    for c, name in enumerate(classes):
        wrong = np.flatnonzero((labels == c) & (preds != c))
        chosen.append(wrong[np.argsort(-confidence[wrong], kind="stable")][:per_class])
        row_titles.append(f"{name}\n{len(wrong)} of {int((labels == c).sum())} wrong")
    fetched = images.fetch(keys[i] for row in chosen for i in row)
    rows = [
        [Tile(fetched.get(keys[i]), f"{clip(keys[i])}\npred {classes[preds[i]]}\np {confidence[i]:.2f}", False)
         for i in row]
        for row in chosen
    ]
    return contact_sheet(rows, title, row_titles, note="rows: true class; caption: the prediction and its probability")


def relabels(
    images: SampleImages,
    table: Mapping[str, Sequence],
    classes: Sequence[str],
    *,
    n: int = 16,
    truth: Mapping[str, int] | None = None,
    title: str = "Relabeled samples",
) -> Figure:
    """The `n` relabeled samples (original label != current label) with the largest margin, original ->
    current label; with `truth` (key -> true label, where known) the frame says whether the new label is right.

    `table` holds a relabel table's columns (`RelabelTable.to_pydict()`: key, original_label,
    current_label, margin, epoch).
    """
    changed = [i for i, (a, b) in enumerate(zip(table["original_label"], table["current_label"])) if a != b]
    changed.sort(key=lambda i: (-table["margin"][i], table["key"][i]))
    chosen, captions, right = [], [], []
    for i in changed[:n]:
        key, old, new = table["key"][i], int(table["original_label"][i]), int(table["current_label"][i])
        known = None if truth is None else truth.get(key)
        chosen.append(key)
        captions.append("\n".join([clip(key), *_label_lines(old, classes, known, new),
                                   f"margin {table['margin'][i]:.2f}, epoch {table['epoch'][i]}"]))
        right.append(None if known is None else known == new)
    note = f"the {len(chosen)} of {len(changed)} relabels with the largest margin"
    if truth is not None:
        note += "; frame: new label right (green) or wrong (red)"
    return samples(images.fetch(chosen), chosen, captions, title=title, note=note, right=right)
