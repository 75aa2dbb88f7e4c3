"""The relabel table: the current label of every sample SCN ever relabeled, identical on every rank.

The released code kept new labels in memory; here they survive restarts (parquet in the
checkpoint) and are checked across ranks (`digest`). Merging is a join: within one
epoch the result depends only on the set of proposals, not on how ranks split them or
in which order they arrive. A proposal older than a key's last merged epoch is outdated
(the key has been relabeled since) and is ignored, so merging any set of proposals
twice changes nothing and the current labels never depend on the order of epochs; the
history columns (original label, changes) assume epochs arrive in order, as they do
when the trainer merges at each epoch end.

When a relabel takes effect is the caller's business: the trainer merges at an epoch
end and looks labels up by key in the training process, so a change made from epoch e's
proposals is first trained on in epoch e + 1.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from scn_scale.relabel import Proposal, reduce_proposals
from shards.atomic import write_parquet

log = logging.getLogger(__name__)

COLUMNS = ("key", "original_label", "current_label", "epoch", "margin", "changes", "previous_label")


@dataclass(frozen=True)
class _Entry:
    original_label: int  # the label before SCN ever changed it
    current_label: int
    epoch: int  # 1-based epoch of the last merged proposal (the last change, unless it restated the label)
    margin: float  # that proposal's margin
    changes: int  # epochs in which the label changed
    # The label when `epoch` began. Kept so that later proposals of the same epoch can
    # still win (any split, any order) and `changes` stays exact.
    previous_label: int

    def first_seen_this_epoch(self) -> bool:
        # A key enters the table with one change; later epochs start from >= 1 change.
        return self.changes - (self.current_label != self.previous_label) == 0


class RelabelTable:
    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RelabelTable) and self._entries == other._entries

    def get(self, key: str) -> int | None:
        entry = self._entries.get(key)
        return None if entry is None else entry.current_label

    def merge(self, proposals: Iterable[Proposal]) -> int:
        """Merge proposals epoch by epoch (ascending); return how many keys' current label changed.

        Within an epoch each key's proposals reduce to one (`reduce_proposals`); it then
        wins against what that epoch already merged by the same order. A proposal whose
        new label equals the key's label at the start of its epoch changes nothing.
        Proposals older than their key's last merged epoch are ignored (see the module
        docstring). Raises ValueError, changing nothing, for a proposal with
        new_label == old_label.
        """
        by_epoch: dict[int, list[Proposal]] = defaultdict(list)
        for p in proposals:
            if p.new_label == p.old_label:
                raise ValueError(f"proposal for {p.key!r} does not change its label ({p.old_label})")
            by_epoch[p.epoch].append(p)
        entries = dict(self._entries)
        outdated = 0
        for epoch in sorted(by_epoch):
            for key, p in sorted(reduce_proposals(by_epoch[epoch]).items()):
                if key in entries and p.epoch < entries[key].epoch:
                    outdated += 1
                else:
                    entries[key] = _merge_one(entries.get(key), p)
        if outdated:
            log.warning("ignored %d relabel proposals older than their key's last merged epoch", outdated)
        changed = sum(
            1
            for key, entry in entries.items()
            if entry.current_label != (self._entries[key].current_label if key in self._entries else entry.original_label)
        )
        self._entries = entries
        return changed

    def apply(self, keys: Sequence[str], labels: Tensor) -> Tensor:
        """The current labels of a batch: the table's where it has the key, the given ones elsewhere."""
        if len(keys) != labels.shape[0]:
            raise ValueError(f"{len(keys)} keys for {labels.shape[0]} labels")
        values = labels.tolist()
        for i, key in enumerate(keys):
            entry = self._entries.get(key)
            if entry is not None:
                values[i] = entry.current_label
        return torch.tensor(values, dtype=labels.dtype, device=labels.device)

    def digest(self) -> str:
        """sha256 of a canonical text form: equal on two ranks exactly when their tables are equal."""
        h = hashlib.sha256()
        for key in sorted(self._entries):
            e = self._entries[key]
            fields = (key, e.original_label, e.current_label, e.epoch, e.margin.hex(), e.changes, e.previous_label)
            h.update(("\t".join(map(str, fields)) + "\n").encode())
        return h.hexdigest()

    def to_pydict(self) -> dict[str, list]:
        keys = sorted(self._entries)
        columns: dict[str, list] = {"key": keys}
        for name in COLUMNS[1:]:
            columns[name] = [getattr(self._entries[k], name) for k in keys]
        return columns

    def save(self, path: str) -> None:
        columns = self.to_pydict()
        schema = pa.schema(
            [("key", pa.string()), *[(n, pa.float64() if n == "margin" else pa.int64()) for n in COLUMNS[1:]]]
        )
        write_parquet(path, pa.Table.from_pydict(columns, schema=schema))

    @classmethod
    def load(cls, path: str) -> RelabelTable:
        data = pq.read_table(path).to_pydict()
        missing = [c for c in COLUMNS if c not in data]
        if missing:
            raise ValueError(f"{path}: not a relabel table, missing columns {missing}")
        table = cls()
        for i, key in enumerate(data["key"]):
            table._entries[key] = _Entry(
                original_label=int(data["original_label"][i]),
                current_label=int(data["current_label"][i]),
                epoch=int(data["epoch"][i]),
                margin=float(data["margin"][i]),
                changes=int(data["changes"][i]),
                previous_label=int(data["previous_label"][i]),
            )
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
        c = len(classes)
        flow = np.zeros((c, c), dtype=np.int64)
        counts = np.zeros((c, 5), dtype=np.int64)  # columns: _AUDIT_COUNTS
        for key, label in given.items():
            truth = ground_truth[key]
            current = self.get(key)
            current = label if current is None else current
            changed, noisy = current != label, label != truth
            counts[truth] += (1, noisy, changed, changed and current == truth, changed and not noisy)
            if changed:
                flow[label, current] += 1
        result = _audit_counts(counts.sum(axis=0))
        result["per_class"] = {name: _audit_counts(counts[i]) for i, name in enumerate(classes)}
        result["flow"] = flow.tolist()
        result["classes"] = list(classes)
        return result


# restored: changed to the truth (only noisy samples can be); corrupted: clean samples changed.
_AUDIT_COUNTS = ("samples", "noisy", "changed", "restored", "corrupted")


def _audit_counts(row: np.ndarray) -> dict:
    result = {name: int(v) for name, v in zip(_AUDIT_COUNTS, row)}
    result["precision"] = result["restored"] / result["changed"] if result["changed"] else None
    result["recall"] = result["restored"] / result["noisy"] if result["noisy"] else None
    return result


def _merge_one(entry: _Entry | None, p: Proposal) -> _Entry:
    """The entry after proposal `p`, which is from the entry's epoch or a later one."""
    old, new, margin, epoch = int(p.old_label), int(p.new_label), float(p.margin), int(p.epoch)
    if entry is None:
        return _Entry(old, new, epoch, margin, 1, old)
    if epoch > entry.epoch:
        changes = entry.changes + (new != entry.current_label)
        return _Entry(entry.original_label, new, epoch, margin, changes, entry.current_label)
    # Same epoch: the stronger proposal wins (the order of reduce_proposals); the old label
    # only matters for a key first seen this epoch, where it is the original label.
    first = entry.first_seen_this_epoch()
    held = (entry.margin, -entry.current_label, -entry.previous_label if first else 0)
    if (margin, -new, -old if first else 0) <= held:
        return entry
    base = entry.changes - (entry.current_label != entry.previous_label)
    previous = old if first else entry.previous_label
    original = old if first else entry.original_label
    return _Entry(original, new, epoch, margin, base + (new != previous), previous)
