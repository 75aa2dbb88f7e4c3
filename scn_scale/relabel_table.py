"""The relabel table: the current label of every sample SCN ever relabeled, identical on every rank.

The released code kept new labels in memory; here they survive restarts (parquet in the
checkpoint) and are checked across ranks (`digest`). Merging is a join: within one
epoch the result depends only on the set of proposals, not on how ranks split them or
in which order they arrive. A proposal older than a key's last merged epoch is outdated
(the key has been relabeled since) and is ignored, so merging any set of proposals
twice changes nothing and the current labels never depend on the order of epochs; the
history columns (original label, changes) assume epochs arrive in order, as they do
when the trainer merges at each epoch end.

The table is a set of dense columns indexed by sample row (`SampleIndex`: the row of a
key is its position among the sorted keys of the training set's manifest), so that at
web scale (10 million samples) it is 20 bytes a sample, merges vectorised, and its
digest comes from the columns. A table made without an index (a reader of a saved
table, a test) is keyed by its own keys and grows with the keys it merges.

When a relabel takes effect is the caller's business: the trainer merges at an epoch
end and looks labels up by key in the training process, so a change made from epoch e's
proposals is first trained on in epoch e + 1.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from scn_scale.relabel import Proposal, ProposalRows, reduce_proposals
from shards.atomic import write_parquet

log = logging.getLogger(__name__)

COLUMNS = ("key", "original_label", "current_label", "epoch", "margin", "changes", "previous_label")
#: The confirmation state (`merge_rows(..., confirm=k)`): the last proposal seen for a row, its epoch, and in how
#: many consecutive epochs ending there the same new label was proposed. Absent from tables saved before it.
PENDING_COLUMNS = ("proposed_label", "proposed_epoch", "streak")
SCHEMA = pa.schema([("key", pa.string()), *[(n, pa.float64() if n == "margin" else pa.int64()) for n in COLUMNS[1:] + PENDING_COLUMNS]])
# In memory: int16 labels and change counts (classes and epochs stay far below 32,768),
# float64 margins (the digest and the merge order see every bit of a margin).
_DTYPES = {
    "original_label": torch.int16,
    "current_label": torch.int16,
    "epoch": torch.int32,  # 1-based epoch of the last merged proposal; 0: no entry
    "margin": torch.float64,  # that proposal's margin
    "changes": torch.int16,  # epochs in which the label changed
    # The label when `epoch` began. Kept so that later proposals of the same epoch can
    # still win (any split, any order) and `changes` stays exact.
    "previous_label": torch.int16,
    "proposed_label": torch.int16,
    "proposed_epoch": torch.int32,  # 0: never proposed (or confirmation off)
    "streak": torch.int16,
}
#: Keys converted to bytes or looked up at a time: bounds the Python strings and temporaries alive at once.
_KEY_CHUNK = 1 << 20


class UnknownKeyError(LookupError):
    """A sample key that the sample index (the training set's manifest) does not hold."""


def _key_bytes(keys: Iterable[str] | np.ndarray | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Keys as a NumPy bytes array (sample keys are ASCII: letters, digits, '_' and '-')."""
    if isinstance(keys, np.ndarray) and keys.dtype.kind == "S":
        return keys
    if isinstance(keys, (pa.Array, pa.ChunkedArray)):
        if keys.null_count:
            raise ValueError(f"{keys.null_count} sample keys are null")
        parts = [np.asarray(keys.slice(s, _KEY_CHUNK).to_pylist(), dtype="S") for s in range(0, len(keys), _KEY_CHUNK)]
        return np.concatenate(parts) if parts else np.empty(0, dtype="S1")
    return np.asarray(keys if isinstance(keys, (list, tuple)) else list(keys), dtype="S")


#: Slots a lookup reads at once from a key's home slot; keys that lie further on (about one
#: in 150 at the most crowded) are followed one by one.
_WINDOW = np.arange(8, dtype=np.uint64)


@functools.cache
def _word_factors(words: int) -> np.ndarray:
    """Odd multipliers, one per 8-byte word of a key."""
    return np.array([0x9E3779B97F4A7C15 * (2 * i + 1) % 2**64 for i in range(words)], dtype=np.uint64)


def _hash(keys: np.ndarray) -> np.ndarray:
    """A 64-bit hash of every key: its 8-byte words times odd factors, summed, then mixed
    (a multiply-xorshift finaliser, so the low bits that pick a slot depend on every bit).

    A NUL word (padding) adds 0, so the hash does not depend on the width of the array
    holding the key. Vectorised over the keys: a handful of NumPy calls per batch.
    """
    words = -(-keys.dtype.itemsize // 8)
    data = keys.astype(f"S{8 * words}").view(np.uint64).reshape(len(keys), words)
    h = (data * _word_factors(words)).sum(axis=1, dtype=np.uint64)
    h ^= h >> np.uint64(32)
    h *= np.uint64(0xD6E8FEB86659FD93)
    return h ^ (h >> np.uint64(32))


def _tag(hashes: np.ndarray) -> np.ndarray:
    """A slot's tag: seven bits of the key's hash that do not pick its slot, never 0 (an empty slot's)."""
    return ((hashes >> np.uint64(56)) | np.uint64(1)).astype(np.uint8)


class SampleIndex:
    """Dense rows for sample keys: the row of a key is its position among the sorted keys.

    Sorted order makes a key's row depend only on the set of keys (every rank builds the
    same index from the manifest) and makes anything stored in row order canonical (the
    table digest). A batch's keys are found through an open-addressing hash table of rows
    (linear probing, at most half full) with a one-byte tag per slot, so that a lookup
    reads the keys of about one slot a key: a binary search over 10 million keys would
    read 24. No Python object per sample: at 10 million keys of 28 bytes the index holds
    280 MB of keys and 168 MB of slots and tags.
    """

    def __init__(self, keys: np.ndarray) -> None:
        self.keys = keys  # sorted, unique, dtype "S<width>"
        size = 1 << max(1, 2 * len(keys) - 1).bit_length()
        self._slots = np.full(size, -1, dtype=np.int32)  # a row, or -1: empty
        self._tags = np.zeros(size, dtype=np.uint8)  # `_tag` of that row's key hash; 0: empty
        self._mask = np.uint64(size - 1)
        hashes = np.concatenate([_hash(keys[s : s + _KEY_CHUNK]) for s in range(0, max(len(keys), 1), _KEY_CHUNK)])
        pending = np.arange(len(keys), dtype=np.int32)
        slot = hashes & self._mask
        while len(pending):
            # Pending keys take their slot where it is free (one of them when several want it);
            # the others move on to the next slot. A key's probe path so stays occupied.
            free = self._slots[slot] == -1
            self._slots[slot[free]] = pending[free]
            placed = self._slots[slot] == pending
            self._tags[slot[placed]] = _tag(hashes[pending[placed]])
            pending, slot = pending[~placed], (slot[~placed] + np.uint64(1)) & self._mask

    @classmethod
    def build(cls, keys: Iterable[str] | np.ndarray | pa.Array | pa.ChunkedArray) -> tuple[SampleIndex, np.ndarray]:
        """The index of `keys` and the row of each of them; ValueError naming a key that appears twice."""
        data = _key_bytes(keys)
        order = np.argsort(data, kind="stable")
        ordered = data[order]
        twice = np.flatnonzero(ordered[1:] == ordered[:-1])
        if twice.size:
            raise ValueError(f"sample key {ordered[twice[0]].decode()!r} appears more than once")
        rows = np.empty(len(data), dtype=np.int64)
        rows[order] = np.arange(len(data))
        return cls(ordered), rows

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, keys: Iterable[str] | np.ndarray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """(row of each key, whether the index holds it); the row of a key it does not hold is 0."""
        query = _key_bytes(keys)
        if not len(self.keys):
            return np.zeros(len(query), dtype=np.int64), np.zeros(len(query), dtype=bool)
        if len(query) > _KEY_CHUNK:  # bounds the [keys, window] temporaries
            parts = [self.find(query[s : s + _KEY_CHUNK]) for s in range(0, len(query), _KEY_CHUNK)]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        hashes = _hash(query)
        window = ((hashes & self._mask)[:, None] + _WINDOW) & self._mask
        tags = self._tags[window]
        i, j = np.nonzero(tags == _tag(hashes)[:, None])  # candidates: about one slot a key
        held = self._slots[window[i, j]]
        hit = self.keys[held] == query[i]
        rows = np.zeros(len(query), dtype=np.int64)
        found = np.zeros(len(query), dtype=bool)
        rows[i[hit]], found[i[hit]] = held[hit], True
        # A key is absent once its probe path meets an empty slot; without one in the window, walk on.
        for k in np.flatnonzero(~found & tags.all(axis=1)):
            slot = (int(window[k, -1]) + 1) & int(self._mask)
            while (row := int(self._slots[slot])) >= 0:
                if self.keys[row] == query[k]:
                    rows[k], found[k] = row, True
                    break
                slot = (slot + 1) & int(self._mask)
        return rows, found

    def lookup(self, keys: Iterable[str] | np.ndarray | pa.Array) -> np.ndarray:
        """The row of each key; UnknownKeyError naming the first key the index does not hold."""
        rows, found = self.find(keys)
        if not found.all():
            key = _key_bytes(keys)[np.argmin(found)].decode()
            raise UnknownKeyError(f"sample key {key!r} is not among the {len(self)} keys of the sample index (the training set's manifest)")
        return rows

    def keys_at(self, rows: np.ndarray | Tensor) -> pa.Array:
        """The keys of `rows`, as an Arrow string array (for parquet files)."""
        return _arrow_keys(self.keys[np.asarray(rows)])

    def union(self, keys: Iterable[str]) -> SampleIndex:
        return SampleIndex(np.union1d(self.keys, _key_bytes(keys)))


@dataclass(frozen=True)
class ManifestIndex:
    """A set's sample index, and the index row of each of its manifest rows.

    The shard reader gives every sample its manifest row (shards.reader), so the training
    step finds its samples' rows by one array lookup, without hashing their keys; a key
    is looked up only for a sample the reader could not place (a shard changed since it
    was written).
    """

    index: SampleIndex
    of_manifest_row: np.ndarray  # int64 [samples]: index row of manifest row i

    @classmethod
    def build(cls, keys: Iterable[str] | np.ndarray | pa.Array | pa.ChunkedArray) -> ManifestIndex:
        """From the manifest's key column, in manifest order."""
        return cls(*SampleIndex.build(keys))

    def rows(self, manifest_rows: Tensor | np.ndarray, keys: Sequence[str]) -> np.ndarray:
        """Index rows of a batch whose samples have these manifest rows (-1: not placed) and keys."""
        found = np.asarray(manifest_rows, dtype=np.int64)
        rows = self.of_manifest_row[np.maximum(found, 0)]
        lost = np.flatnonzero(found < 0)
        if lost.size:
            rows[lost] = self.index.lookup([keys[i] for i in lost])
        return rows


def _check_range(values: np.ndarray, dtype: torch.dtype, what: str) -> None:
    """ValueError unless the integers `values` fit `dtype` and are >= 0 (a cast would wrap them silently)."""
    top = torch.iinfo(dtype).max
    if len(values) and (values.min() < 0 or values.max() > top):
        raise ValueError(f"{what}: values must be in [0, {top}], got range [{values.min()}, {values.max()}]")


def _fit(values: np.ndarray, dtype: torch.dtype, what: str) -> Tensor:
    if not dtype.is_floating_point:
        _check_range(values, dtype, what)
    return torch.tensor(values, dtype=dtype)


def _arrow_keys(keys: np.ndarray) -> pa.Array:
    """The keys as an Arrow string array, made from their bytes (no Python object per key)."""
    keys = np.ascontiguousarray(keys)
    lengths = np.strings.str_len(keys)
    offsets = np.zeros(len(keys) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    data = keys.view(np.uint8).reshape(len(keys), keys.dtype.itemsize)
    chars = data[np.arange(keys.dtype.itemsize) < lengths[:, None]]
    return pa.LargeStringArray.from_buffers(len(keys), pa.py_buffer(offsets), pa.py_buffer(chars)).cast(pa.string())


class RelabelTable:
    def __init__(self, index: SampleIndex | None = None) -> None:
        """A table keyed by `index` (proposals for other keys are errors); without one, by its own keys."""
        self._bound = index is not None
        self._index = index if index is not None else SampleIndex(np.empty(0, dtype="S1"))
        self._cols = {name: torch.zeros(len(self._index), dtype=dtype) for name, dtype in _DTYPES.items()}
        self._views = {name: col.numpy() for name, col in self._cols.items()}  # the same memory, for `labels_at`

    @property
    def index(self) -> SampleIndex:
        return self._index

    def _present(self) -> Tensor:
        """Rows that have an entry, ascending (so in key order)."""
        return torch.nonzero(self._cols["epoch"] > 0).flatten()

    def __len__(self) -> int:
        return int((self._cols["epoch"] > 0).sum())

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def _entries(self) -> tuple[np.ndarray, list[Tensor]]:
        present = self._present()
        return self._index.keys[present.numpy()], [self._cols[name][present] for name in COLUMNS[1:]]

    def _pending(self) -> tuple[np.ndarray, list[Tensor]]:
        """Rows with confirmation state (a relabel entry or not), in key order, and those columns."""
        rows = torch.nonzero(self._cols["proposed_epoch"] > 0).flatten()
        return self._index.keys[rows.numpy()], [self._cols[name][rows] for name in PENDING_COLUMNS]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RelabelTable):
            return False
        for mine, theirs in ((self._entries(), other._entries()), (self._pending(), other._pending())):
            if not (np.array_equal(mine[0], theirs[0]) and all(torch.equal(a, b) for a, b in zip(mine[1], theirs[1]))):
                return False
        return True

    def get(self, key: str) -> int | None:
        rows, found = self._index.find([key])
        if not found[0] or self._cols["epoch"][rows[0]] == 0:
            return None
        return int(self._cols["current_label"][rows[0]])

    def relabeled(self) -> int:
        """How many samples' current label differs from their original one."""
        return int((self._cols["current_label"] != self._cols["original_label"]).sum())

    def merge(self, proposals: Iterable[Proposal]) -> int:
        """Merge proposals epoch by epoch (ascending); return how many keys' current label changed.

        Within an epoch each key's proposals reduce to one (`reduce_proposals`); it then
        wins against what that epoch already merged by the same order. A proposal whose
        new label equals the key's label at the start of its epoch changes nothing.
        Proposals older than their key's last merged epoch are ignored (see the module
        docstring). Raises ValueError, changing nothing, for a proposal with
        new_label == old_label, and UnknownKeyError for a key outside the table's index.
        """
        by_epoch: dict[int, list[Proposal]] = defaultdict(list)
        for p in proposals:
            if p.new_label == p.old_label:
                raise ValueError(f"proposal for {p.key!r} does not change its label ({p.old_label})")
            by_epoch[p.epoch].append(p)
        best = [p for ps in by_epoch.values() for p in reduce_proposals(ps).values()]
        every = ProposalRows.of(
            0, self._rows_for([p.key for p in best]), [p.old_label for p in best], [p.new_label for p in best], [p.margin for p in best]
        )
        epochs = torch.tensor([p.epoch for p in best], dtype=torch.int64)
        groups = [replace(every.select(epochs == epoch), epoch=epoch) for epoch in by_epoch]
        return self._merge(groups)

    def merge_rows(self, proposals: ProposalRows, confirm: int = 1) -> int:
        """Merge one epoch's proposals keyed by row of the table's index (any number per row): `merge`'s rule.

        With `confirm` = k > 1 a proposal is merged only once the same new label has been
        proposed for its row in k consecutive epochs (this one included); the others are
        remembered here until then. `confirm` = 1 is the released code's rule, and keeps no state.
        """
        if confirm < 1:
            raise ValueError(f"confirm must be >= 1, got {confirm}")
        if confirm > 1:
            proposals = self._confirmed(proposals.reduced(), confirm)
        return self._merge([proposals])

    def _confirmed(self, p: ProposalRows, confirm: int) -> ProposalRows:
        """Record one proposal per row of epoch `p.epoch`; return those proposed `confirm` epochs running."""
        self._check(p)
        c, rows, new = self._cols, p.rows, p.new_label.to(torch.int16)
        repeated = (c["proposed_epoch"][rows] == p.epoch - 1) & (c["proposed_label"][rows] == new)
        streak = torch.where(repeated, c["streak"][rows] + 1, 1).to(torch.int16)
        c["proposed_label"][rows], c["proposed_epoch"][rows], c["streak"][rows] = new, p.epoch, streak
        return p.select(streak >= confirm)

    def _rows_for(self, keys: Sequence[str]) -> np.ndarray:
        """Rows of `keys`; a table without an index of its own first grows it by the keys it lacks."""
        rows, found = self._index.find(keys)
        if found.all():
            return rows
        if self._bound:
            return self._index.lookup(keys)  # raises, naming the key
        self._reindex(self._index.union(keys))
        return self._index.lookup(keys)

    def _reindex(self, index: SampleIndex) -> None:
        """Key the table by `index`, which holds every key of the current index."""
        rows = torch.from_numpy(index.lookup(self._index.keys))
        cols = {name: torch.zeros(len(index), dtype=dtype) for name, dtype in _DTYPES.items()}
        for name, col in cols.items():
            col[rows] = self._cols[name]
        self._index, self._cols = index, cols
        self._views = {name: col.numpy() for name, col in cols.items()}

    def _check(self, p: ProposalRows) -> None:
        if len(p) and (p.rows.min() < 0 or p.rows.max() >= len(self._index)):
            raise ValueError(f"proposal rows must be in [0, {len(self._index)}), got range [{int(p.rows.min())}, {int(p.rows.max())}]")
        same = torch.nonzero(p.new_label == p.old_label).flatten()
        if len(same):
            i = int(same[0])
            key = self._index.keys[int(p.rows[i])].decode()
            raise ValueError(f"proposal for {key!r} does not change its label ({int(p.old_label[i])})")
        for labels in (p.old_label, p.new_label):
            _check_range(labels.numpy(), _DTYPES["current_label"], "proposal labels")

    def _merge(self, groups: list[ProposalRows]) -> int:
        for group in groups:
            self._check(group)
        if not any(len(g) for g in groups):
            return 0
        touched = torch.unique(torch.cat([g.rows for g in groups]))
        was_present = self._cols["epoch"][touched] > 0
        was_current = self._cols["current_label"][touched]
        outdated = sum(self._merge_epoch(g.reduced()) for g in sorted(groups, key=lambda g: g.epoch))
        if outdated:
            log.warning("ignored %d relabel proposals older than their key's last merged epoch", outdated)
        now = self._cols["current_label"][touched]
        before = torch.where(was_present, was_current, self._cols["original_label"][touched])
        return int((now != before).sum())

    def _merge_epoch(self, p: ProposalRows) -> int:
        """Merge one proposal per row, all of epoch `p.epoch`; return how many were outdated.

        Row by row: a new entry; a later epoch, which moves the entry on; or the same
        epoch, where the stronger proposal wins by reduce_proposals' order (the old label
        only matters for a key first seen this epoch, where it is the original label).
        """
        c, rows = self._cols, p.rows
        old, new, margin = p.old_label.to(torch.int16), p.new_label.to(torch.int16), p.margin
        epoch, cur, prev, orig, changes = (c[n][rows] for n in ("epoch", "current_label", "previous_label", "original_label", "changes"))
        absent = epoch == 0
        later = ~absent & (p.epoch > epoch)
        same = ~absent & (p.epoch == epoch)
        base = changes - (cur != prev).to(torch.int16)  # changes before this epoch
        first = base == 0  # first seen this epoch: an entry enters the table with one change
        wins = (margin > c["margin"][rows]) | (
            (margin == c["margin"][rows]) & ((new < cur) | ((new == cur) & first & (old < prev)))
        )
        restart = absent | (same & wins & first)  # the proposal's old label is the original one
        previous = torch.where(restart, old, torch.where(later, cur, prev))
        updates = {
            "original_label": torch.where(restart, old, orig),
            "previous_label": previous,
            "changes": torch.where(later, changes + (new != cur), base + (new != previous)).to(torch.int16),
            "current_label": new,
            "epoch": torch.full_like(epoch, p.epoch),
            "margin": margin,
        }
        take = absent | later | (same & wins)
        for name, values in updates.items():
            c[name][rows[take]] = values[take]
        return int((~absent & (p.epoch < epoch)).sum())

    def labels_at(self, rows: np.ndarray, labels: Tensor) -> Tensor:
        """The current labels of the samples at `rows`: the table's where it has an entry, `labels` (on the CPU) elsewhere.

        The trainer calls it every step: NumPy on the columns' memory, one torch operation.
        """
        present = torch.from_numpy(self._views["epoch"][rows] > 0)
        return torch.where(present, torch.from_numpy(self._views["current_label"][rows]), labels)

    def apply(self, keys: Sequence[str], labels: Tensor) -> Tensor:
        """The current labels of a batch: the table's where it has the key, the given ones elsewhere."""
        if len(keys) != labels.shape[0]:
            raise ValueError(f"{len(keys)} keys for {labels.shape[0]} labels")
        rows, found = self._index.find(keys)
        hit = torch.from_numpy(found)
        out = labels.clone()
        out[hit.to(labels.device)] = self.labels_at(rows[found], labels.cpu()[hit]).to(labels.device)
        return out

    def digest(self) -> str:
        """sha256 of the entries in key order: equal on two ranks exactly when their tables are equal,
        whichever index each is keyed by (the manifest's, or a saved table's own keys)."""
        h = hashlib.sha256()
        for part, (keys, cols) in enumerate((self._entries(), self._pending())):
            if part and not len(keys):
                break  # no confirmation state: the digest of a table saved before it existed
            width = int(np.strings.str_len(keys).max()) if len(keys) else 1  # keys hold no NUL: padding is unambiguous
            what = "pending rows" if part else "entries"
            h.update(f"relabel table v2: {len(keys)} {what}, keys of {width} bytes\n".encode())
            h.update(keys.astype(f"S{width}").tobytes())
            for col in cols:
                h.update(col.numpy().tobytes())
        return h.hexdigest()

    def to_pydict(self) -> dict[str, list]:
        keys, cols = self._entries()
        return {"key": [k.decode() for k in keys.tolist()], **{name: col.tolist() for name, col in zip(COLUMNS[1:], cols)}}

    def save(self, path: str) -> None:
        """Every row with an entry or confirmation state; a row with only the latter has epoch 0."""
        rows = torch.nonzero((self._cols["epoch"] > 0) | (self._cols["proposed_epoch"] > 0)).flatten()
        columns = [_arrow_keys(self._index.keys[rows.numpy()])]
        for name in SCHEMA.names[1:]:
            col = self._cols[name][rows]
            columns.append(pa.array(col.numpy().astype(np.float64 if col.is_floating_point() else np.int64)))
        write_parquet(path, pa.Table.from_arrays(columns, schema=SCHEMA))

    @classmethod
    def load(cls, path: str, index: SampleIndex | None = None) -> RelabelTable:
        """A saved table, keyed by `index` (UnknownKeyError naming a key it lacks) or by its own keys."""
        data = pq.read_table(path)
        missing = [c for c in COLUMNS if c not in data.column_names]
        if missing:
            raise ValueError(f"{path}: not a relabel table, missing columns {missing}")
        if index is None:
            table = cls()
            own, rows = SampleIndex.build(data.column("key"))
            table._reindex(own)
        else:
            table, rows = cls(index), index.lookup(data.column("key"))
        for name in SCHEMA.names[1:]:
            if name in data.column_names:  # a table saved before confirmation state has none
                table._cols[name][torch.from_numpy(rows)] = _fit(data.column(name).to_numpy(), _DTYPES[name], f"{path}: {name}")
        return table

    def audit(self, ground_truth: Mapping[str, int], given: Mapping[str, int], classes: Sequence[str]) -> dict:
        """How well relabeling undid the noise, over the samples in `given` (the training labels).

        precision: changed samples (current label != given) whose current label is the
        truth, over changed samples. recall: noisy samples (given != truth) whose current
        label is the truth, over noisy samples (a change to the truth is always a restored
        noisy sample, so both share the numerator `restored`). None where the denominator
        is 0. `corrupted` counts clean samples relabeled away from the truth. `per_class`
        groups by true class; `flow[i][j]` counts changed samples from given class i to
        current class j.
        """
        missing = [k for k in given if k not in ground_truth]
        if missing:
            raise ValueError(f"{len(missing)} keys have no ground truth, e.g. {missing[:3]}")
        keys = list(given)
        given_labels = torch.tensor([given[k] for k in keys], dtype=torch.int64)
        truth = np.array([ground_truth[k] for k in keys], dtype=np.int64)
        current = self.apply(keys, given_labels)
        return _audit(truth, given_labels.numpy(), current.numpy(), classes)

    def audit_rows(self, truth: Tensor, given: Tensor, classes: Sequence[str]) -> dict:
        """`audit` over every sample of the table's index, with `truth` and `given` labels by row."""
        if not truth.shape == given.shape == (len(self._index),):
            raise ValueError(f"truth {tuple(truth.shape)} and given {tuple(given.shape)} labels for an index of {len(self._index)} keys")
        current = self.labels_at(np.arange(len(self._index)), given)
        return _audit(truth.numpy().astype(np.int64), given.numpy().astype(np.int64), current.numpy().astype(np.int64), classes)


# restored: changed to the truth (only noisy samples can be); corrupted: clean samples changed.
_AUDIT_COUNTS = ("samples", "noisy", "changed", "restored", "corrupted")


def _audit(truth: np.ndarray, given: np.ndarray, current: np.ndarray, classes: Sequence[str]) -> dict:
    c = len(classes)
    for name, labels in (("truth", truth), ("given", given), ("current", current)):
        if labels.size and (labels.min() < 0 or labels.max() >= c):
            raise ValueError(f"{name} labels must be in [0, {c}), got range [{labels.min()}, {labels.max()}]")
    changed, noisy = current != given, given != truth
    flags = (np.ones_like(changed), noisy, changed, changed & (current == truth), changed & ~noisy)
    counts = np.stack([np.bincount(truth[f], minlength=c) for f in flags], axis=1)  # columns: _AUDIT_COUNTS
    flow = np.bincount(given[changed] * c + current[changed], minlength=c * c).reshape(c, c)
    result = _audit_counts(counts.sum(axis=0))
    result["per_class"] = {name: _audit_counts(counts[i]) for i, name in enumerate(classes)}
    result["flow"] = flow.tolist()
    result["classes"] = list(classes)
    return result


def _audit_counts(row: np.ndarray) -> dict:
    result = {name: int(v) for name, v in zip(_AUDIT_COUNTS, row)}
    result["precision"] = result["restored"] / result["changed"] if result["changed"] else None
    result["recall"] = result["restored"] / result["noisy"] if result["noisy"] else None
    # Wrong labels after the table: the noisy ones not restored, plus the clean ones it corrupted.
    result["wrong_after"] = result["noisy"] - result["restored"] + result["corrupted"]
    return result
