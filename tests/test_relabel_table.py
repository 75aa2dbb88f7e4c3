import functools
import importlib.util
import itertools
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scn_scale.relabel import Proposal, ProposalRows
from scn_scale.relabel_table import COLUMNS, PENDING_COLUMNS, RelabelTable, SampleIndex, UnknownKeyError

REPO = Path(__file__).resolve().parents[1]


def table_of(*proposals):
    t = RelabelTable()
    t.merge(proposals)
    return t


def test_merge_get_and_apply():
    t = RelabelTable()
    assert t.merge([Proposal("a", 0, 2, 0.5, 10), Proposal("b", 1, 0, 0.3, 10)]) == 2
    assert len(t) == 2 and t.get("a") == 2 and t.get("b") == 0 and t.get("z") is None
    labels = torch.tensor([5, 1, 0], dtype=torch.int32)
    applied = t.apply(["z", "b", "a"], labels)
    assert applied.tolist() == [5, 0, 2] and applied.dtype == torch.int32
    assert labels.tolist() == [5, 1, 0]  # the input is not modified


def test_history_of_one_key():
    t = table_of(Proposal("k", 0, 1, 0.5, 10))
    assert t.merge([Proposal("k", 1, 2, 0.4, 11)]) == 1
    assert t.merge([Proposal("k", 2, 0, 0.6, 12)]) == 1
    assert t.to_pydict() == {
        "key": ["k"],
        "original_label": [0],
        "current_label": [0],
        "epoch": [12],
        "margin": [0.6],
        "changes": [3],
        "previous_label": [2],
    }


def test_proposal_restating_the_current_label_changes_nothing():
    t = table_of(Proposal("k", 0, 1, 0.5, 10))
    # A stale reader still sees 0 and proposes 1 again in epoch 11.
    assert t.merge([Proposal("k", 0, 1, 0.9, 11)]) == 0
    assert t.get("k") == 1 and t.to_pydict()["changes"] == [1]


def test_same_epoch_stronger_proposal_replaces_without_counting_twice():
    t = table_of(Proposal("k", 0, 1, 0.5, 10))
    assert t.merge([Proposal("k", 0, 2, 0.8, 10)]) == 1
    assert t.get("k") == 2 and t.to_pydict()["changes"] == [1]
    assert t.merge([Proposal("k", 0, 1, 0.1, 10)]) == 0  # weaker: loses


def test_outdated_proposals_are_ignored():
    t = table_of(Proposal("k", 0, 1, 0.5, 11))
    before = t.digest()
    assert t.merge([Proposal("k", 1, 2, 0.9, 10)]) == 0
    assert t.digest() == before


def test_a_proposal_that_changes_nothing_is_an_error():
    t = table_of(Proposal("k", 0, 1, 0.5, 11))
    before = t.digest()
    with pytest.raises(ValueError, match="does not change"):
        t.merge([Proposal("j", 0, 1, 0.5, 12), Proposal("j", 3, 3, 0.5, 12)])
    assert t.digest() == before and t.get("j") is None


def test_save_load_round_trip_and_digest(tmp_path):
    t = table_of(Proposal("a", 0, 2, 0.5, 10), Proposal("b", 1, 0, 0.123456789012345, 10))
    t.merge([Proposal("a", 2, 1, 0.7, 11)])
    path = tmp_path / "ckpt" / "relabel.parquet"
    t.save(str(path))
    assert pq.read_table(path).column_names == [*COLUMNS, *PENDING_COLUMNS]
    loaded = RelabelTable.load(str(path))
    assert loaded == t and loaded.digest() == t.digest()
    assert len(t.digest()) == 64
    assert RelabelTable().digest() != t.digest()
    other = table_of(Proposal("a", 0, 2, 0.5, 10), Proposal("b", 1, 0, 0.123456789012346, 10))
    other.merge([Proposal("a", 2, 1, 0.7, 11)])
    assert other != t and other.digest() != t.digest()  # the last digit of a margin counts


def rows_of(index: SampleIndex, epoch: int, *proposals: tuple[str, int, int]) -> ProposalRows:
    """One epoch's proposals (key, old label, new label), margin 0.5 each."""
    keys = [k for k, _, _ in proposals]
    return ProposalRows.of(epoch, index.lookup(keys), [o for _, o, _ in proposals], [n for _, _, n in proposals],
                           [0.5] * len(keys))


def test_confirm_applies_a_relabel_only_after_consecutive_epochs_agree():
    index, _ = SampleIndex.build(["a", "b", "c", "d"])
    t = RelabelTable(index)
    assert t.merge_rows(rows_of(index, 3, ("a", 0, 2), ("b", 1, 3), ("c", 0, 1)), confirm=2) == 0
    assert len(t) == 0 and t.labels_at(index.lookup(["a"]), torch.tensor([0])).tolist() == [0]
    # a: the same again (applied); b: another new label (waits again); c: not proposed (its streak ends).
    assert t.merge_rows(rows_of(index, 4, ("a", 0, 2), ("b", 1, 2)), confirm=2) == 1
    assert t.get("a") == 2 and t.get("b") is None
    assert t.merge_rows(rows_of(index, 5, ("b", 1, 2), ("c", 0, 1)), confirm=2) == 1
    assert t.get("b") == 2 and t.get("c") is None  # c: epochs 3 and 5 are not consecutive
    assert t.merge_rows(rows_of(index, 7, ("c", 0, 1)), confirm=3) == 0  # a gap restarts the count
    assert t.merge_rows(rows_of(index, 8, ("c", 0, 1)), confirm=3) == 0
    assert t.merge_rows(rows_of(index, 9, ("c", 0, 1)), confirm=3) == 1 and t.get("c") == 1
    with pytest.raises(ValueError, match="confirm must be >= 1"):
        t.merge_rows(rows_of(index, 10, ("d", 0, 1)), confirm=0)


def test_confirm_one_is_the_released_rule_and_keeps_no_state():
    index, _ = SampleIndex.build(["a", "b"])
    released, confirmed = RelabelTable(index), RelabelTable(index)
    assert released.merge_rows(rows_of(index, 3, ("a", 0, 2))) == 1
    assert confirmed.merge_rows(rows_of(index, 3, ("a", 0, 2)), confirm=1) == 1
    assert released == confirmed and released.digest() == confirmed.digest()
    assert released.digest() == table_of(Proposal("a", 0, 2, 0.5, 3)).digest()


def test_waiting_proposals_survive_save_and_load(tmp_path):
    index, _ = SampleIndex.build(["a", "b", "c"])
    t = RelabelTable(index)
    t.merge_rows(rows_of(index, 3, ("a", 0, 2), ("b", 1, 0)), confirm=2)
    t.merge_rows(rows_of(index, 4, ("a", 0, 2), ("c", 2, 1)), confirm=2)
    path = tmp_path / "relabel.parquet"
    t.save(str(path))
    loaded = RelabelTable.load(str(path), index)
    assert loaded == t and loaded.digest() == t.digest() and len(loaded) == 1
    unconfirmed = RelabelTable(index)
    unconfirmed.merge_rows(rows_of(index, 4, ("a", 0, 2)))  # the same entry, without waiting proposals
    assert unconfirmed.get("a") == loaded.get("a") and unconfirmed.digest() != loaded.digest()
    # Resumed, the waiting proposal for c is confirmed exactly as in the table that never stopped.
    for table in (t, loaded):
        assert table.merge_rows(rows_of(index, 5, ("c", 2, 1)), confirm=2) == 1
    assert loaded == t and loaded.get("c") == 1


def test_a_table_saved_before_confirmation_loads_with_its_digest(tmp_path):
    t = table_of(Proposal("a", 0, 2, 0.5, 10), Proposal("b", 1, 0, 0.25, 10))
    path = tmp_path / "old.parquet"
    t.save(str(path))
    old = pq.read_table(path).select(list(COLUMNS))  # the columns a table had before
    pq.write_table(old, path)
    loaded = RelabelTable.load(str(path))
    assert loaded == t and loaded.digest() == t.digest()


def test_load_rejects_other_tables(tmp_path):
    import pyarrow as pa

    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"key": ["a"], "label": [1]}), path)
    with pytest.raises(ValueError, match="missing columns"):
        RelabelTable.load(str(path))


proposal = st.builds(
    lambda key, old, delta, margin, epoch: Proposal(key, old, (old + delta) % 4, margin, epoch),
    key=st.sampled_from("abcd"),
    old=st.integers(0, 3),
    delta=st.integers(1, 3),
    margin=st.sampled_from([0.25, 0.5]),  # few values: ties happen
    epoch=st.integers(10, 12),
)


@settings(max_examples=60, deadline=None)
@given(proposals=st.lists(proposal, max_size=25), data=st.data())
def test_merge_is_order_independent_and_idempotent(proposals, data):
    epochs = sorted({p.epoch for p in proposals})
    reference = RelabelTable()
    for epoch in epochs:
        reference.merge(p for p in proposals if p.epoch == epoch)

    assert table_of(*proposals) == reference  # one call with every epoch

    split = RelabelTable()  # each epoch shuffled and cut into chunks, as ranks and steps would
    for epoch in epochs:
        batch = data.draw(st.permutations([p for p in proposals if p.epoch == epoch]))
        cuts = sorted(data.draw(st.lists(st.integers(0, len(batch)), max_size=4)))
        for lo, hi in zip([0, *cuts], [*cuts, len(batch)]):
            split.merge(batch[lo:hi])
    assert split == reference and split.digest() == reference.digest()

    assert reference.merge(proposals) == 0  # idempotent
    assert reference == split
    last = [p for p in proposals if epochs and p.epoch == epochs[-1]]
    assert reference.merge(last) == 0 and reference == split

    backwards = RelabelTable()  # epochs out of order: the current labels still agree
    for epoch in reversed(epochs):
        backwards.merge(p for p in proposals if p.epoch == epoch)
    assert {k: backwards.get(k) for k in "abcde"} == {k: reference.get(k) for k in "abcde"}


def test_full_ties_resolve_the_same_in_every_order():
    # Same key, epoch, margin and new label, read with three different old labels.
    tied = [Proposal("k", old, 0, 0.5, 10) for old in (3, 1, 2)]
    expected = table_of(*tied).to_pydict()
    assert expected["original_label"] == [1]
    for order in itertools.permutations(tied):
        one_by_one = RelabelTable()
        for p in order:
            one_by_one.merge([p])
        assert one_by_one.to_pydict() == expected


def test_audit_hand_built():
    classes = ["neutral", "happiness", "sadness", "surprise"]
    truth = {"a": 0, "b": 1, "d": 0, "e": 1, "f": 2, "g": 1, "h": 2}
    given_ = {"a": 1, "b": 2, "d": 0, "e": 1, "f": 1, "g": 0, "h": 2}
    t = table_of(
        Proposal("a", 1, 0, 0.5, 10),  # noisy, restored
        Proposal("b", 2, 0, 0.5, 10),  # noisy, changed to another wrong label
        Proposal("d", 0, 2, 0.5, 10),  # clean, corrupted
        Proposal("f", 1, 2, 0.5, 10),  # noisy, restored
        Proposal("g", 0, 1, 0.5, 10),  # noisy, restored
        Proposal("h", 2, 0, 0.5, 10),  # clean, changed ...
    )
    t.merge([Proposal("h", 0, 2, 0.5, 11)])  # ... and changed back: not a change any more
    report = t.audit(truth, given_, classes)
    assert {k: report[k] for k in ("samples", "noisy", "changed", "restored", "corrupted")} == {
        "samples": 7,
        "noisy": 4,
        "changed": 5,
        "restored": 3,
        "corrupted": 1,
    }
    assert report["precision"] == pytest.approx(3 / 5)
    assert report["recall"] == pytest.approx(3 / 4)
    assert report["wrong_after"] == 2  # b still wrong, d corrupted: 4 wrong labels before the table, 2 after
    neutral, happiness, sadness, surprise = (report["per_class"][c] for c in classes)
    assert (neutral["precision"], neutral["recall"], neutral["corrupted"]) == (0.5, 1.0, 1)
    assert (happiness["samples"], happiness["precision"], happiness["recall"]) == (3, 0.5, 0.5)
    assert (sadness["samples"], sadness["precision"], sadness["recall"]) == (2, 1.0, 1.0)
    assert surprise == {"samples": 0, "noisy": 0, "changed": 0, "restored": 0, "corrupted": 0, "precision": None,
                        "recall": None, "wrong_after": 0}
    assert report["flow"] == [[0, 1, 1, 0], [1, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]


def test_audit_needs_ground_truth_for_every_sample():
    with pytest.raises(ValueError, match="no ground truth"):
        RelabelTable().audit({"a": 0}, {"a": 0, "b": 1}, ["neutral", "happiness"])


def test_sample_index_rows_are_sorted_positions():
    keys = ["web-b", "web-a", "c-longer-key", "web-aa"]
    index, rows = SampleIndex.build(pa.chunked_array([keys[:2], keys[2:]]))
    assert index.keys.tolist() == sorted(k.encode() for k in keys)
    assert [index.keys[r].decode() for r in rows] == keys
    assert index.lookup(["web-aa", "web-b"]).tolist() == [rows[3], rows[0]]
    found_rows, found = index.find(["web-a", "web-", "web-bb", "c-longer-key-and-more"])
    assert found.tolist() == [True, False, False, False] and found_rows[0] == rows[1]
    with pytest.raises(UnknownKeyError, match="'web-c' is not among the 4 keys"):
        index.lookup(["web-a", "web-c"])
    assert index.keys_at(np.array([rows[2], rows[1]])).to_pylist() == ["c-longer-key", "web-a"]
    with pytest.raises(ValueError, match="'web-a' appears more than once"):
        SampleIndex.build(["web-a", "web-b", "web-a"])


def test_sample_index_finds_every_key_of_a_crowded_table():
    keys = [f"k{i:07d}" for i in range(50_000)]
    index, rows = SampleIndex.build(keys)
    assert (index.lookup(keys) == rows).all()  # many keys lie beyond their home window
    assert not index.find([f"x{i:07d}" for i in range(50_000)])[1].any()


def test_a_table_bound_to_an_index_refuses_other_keys_and_agrees_with_an_unbound_one(tmp_path):
    index, _ = SampleIndex.build(["a", "b", "c", "d"])
    bound = RelabelTable(index)
    bound.merge([Proposal("b", 0, 2, 0.5, 10), Proposal("d", 1, 0, 0.3, 10)])
    before = bound.digest()
    with pytest.raises(UnknownKeyError, match="'z'"):
        bound.merge([Proposal("a", 0, 1, 0.5, 11), Proposal("z", 0, 1, 0.5, 11)])
    assert bound.digest() == before and bound.get("a") is None
    unbound = table_of(Proposal("d", 1, 0, 0.3, 10), Proposal("b", 0, 2, 0.5, 10))
    assert bound == unbound and bound.digest() == unbound.digest()  # whichever index keys them
    path = str(tmp_path / "t.parquet")
    bound.save(path)
    assert RelabelTable.load(path, index) == bound and RelabelTable.load(path, index).index is index
    with pytest.raises(UnknownKeyError, match="'b'"):
        RelabelTable.load(path, SampleIndex.build(["a", "c", "d"])[0])
    rows = index.lookup(["a", "a", "c"])
    assert bound.merge_rows(ProposalRows.of(11, rows, [0, 0, 3], [1, 2, 1], [0.4, 0.4, 0.9])) == 2
    assert (bound.get("a"), bound.get("c")) == (1, 1)  # a tie in margin: the smaller new label


def test_audit_by_rows_equals_audit_by_keys():
    classes = ["neutral", "happiness", "sadness"]
    keys = ["a", "b", "c", "d", "e"]
    index, rows = SampleIndex.build(keys)
    truth, given_ = [0, 1, 2, 1, 0], [0, 2, 2, 0, 1]
    t = RelabelTable(index)
    t.merge([Proposal("b", 2, 1, 0.5, 10), Proposal("d", 0, 2, 0.5, 10), Proposal("a", 0, 1, 0.5, 10)])
    by_row = lambda labels: torch.zeros(len(keys), dtype=torch.int16).index_put_((torch.from_numpy(rows),), torch.tensor(labels, dtype=torch.int16))
    assert t.audit_rows(by_row(truth), by_row(given_), classes) == t.audit(dict(zip(keys, truth)), dict(zip(keys, given_)), classes)


@functools.cache
def _object_table() -> type:
    """The dict-based table this one replaced, kept as the reference in bench/state_scale.py."""
    spec = importlib.util.spec_from_file_location("state_scale", REPO / "bench" / "state_scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module.ObjectTable


@settings(max_examples=100, deadline=None)
@given(merges=st.lists(st.lists(proposal, max_size=12), max_size=4))
def test_same_tables_as_the_dict_implementation_it_replaced(merges):
    """Any sequence of merges, epochs mixed within and across them (outdated, tied, restated)."""
    reference, table = _object_table()(), RelabelTable()
    for proposals in merges:
        assert table.merge(proposals) == reference.merge(proposals)
        assert table.to_pydict() == reference.to_pydict()
