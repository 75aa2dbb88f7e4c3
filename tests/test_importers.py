"""Benchmark importers on fixture trees in the official layouts: exact per-class counts, keys, errors."""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from scn_scale.importers import (
    ImporterError,
    ImportOptions,
    import_affectnet,
    import_csv,
    import_ferplus,
    import_imagefolder,
    import_rafdb,
)
from scn_scale.importers.__main__ import main
from scn_scale.noise import load_ground_truth, load_overrides
from shards import BASIC7, CANONICAL, key_from_source, open_shard_set
from shards import verify as verify_mod
from tests.fixtures_benchmarks import (
    make_affectnet,
    make_affectnet_folders,
    make_csvlist,
    make_ferplus_csv,
    make_ferplus_png,
    make_imagefolder,
    make_rafdb,
    write_rafdb_noise,
)


def set_counts(path: Path) -> Counter:
    """Per-class counts of a written set, read back from its manifest."""
    return Counter(pq.read_table(path / "manifest.parquet", columns=["label_name"]).column("label_name").to_pylist())


def manifest_rows(path: Path) -> list[dict]:
    return pq.read_table(path / "manifest.parquet").to_pylist()


def check_sets(out: Path, expected: dict[str, Counter], classes: list[str], per_split: bool = True) -> None:
    for split, counts in expected.items():
        path = out / split if per_split else out
        assert set_counts(path) == counts, split
        shard_set = open_shard_set(str(path))
        assert list(shard_set.classes) == classes
        report = verify_mod.verify(path)
        assert not report.faults, report.faults
        for row in manifest_rows(path):
            assert row["split"] == split
            assert classes[row["label"]] == row["label_name"]


def test_rafdb_counts_keys_and_bytes(tmp_path: Path) -> None:
    fx = make_rafdb(tmp_path / "RAF-DB", per_class=(3, 2))
    summary = import_rafdb(fx.root, tmp_path / "out", options=ImportOptions(shard_size=7))
    assert summary.classes == list(BASIC7)
    check_sets(tmp_path / "out", fx.counts, list(BASIC7))
    assert {s: Counter({k: v for k, v in c.items() if v}) for s, c in summary.counts.items()} == fx.counts
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == ["test", "train"]
    rows = {r["source_id"]: r for split in ("train", "test") for r in manifest_rows(tmp_path / "out" / split)}
    assert set(rows) == set(fx.labels)
    for name, label in fx.labels.items():
        row = rows[name]
        assert row["key"] == key_from_source("rafdb", name)
        assert row["label_name"] == label
        aligned = fx.root / "Image" / "aligned" / f"{Path(name).stem}_aligned.jpg"
        assert row["sha256"] == hashlib.sha256(aligned.read_bytes()).hexdigest()  # stored as is
        assert (row["width"], row["height"]) == (100, 100)
    saved = json.loads((tmp_path / "out" / "import_summary.json").read_text())
    assert saved["counts"]["train"] == {c: fx.counts["train"][c] for c in BASIC7}


def test_rafdb_noisy_labels_become_an_override_table(tmp_path: Path) -> None:
    fx = make_rafdb(tmp_path / "RAF-DB", per_class=(4, 1), size=32)
    noise_file = tmp_path / "list_patition_label_noise30.txt"
    changed = write_rafdb_noise(fx, noise_file, rate=0.3)
    assert changed
    summary = import_rafdb(fx.root, tmp_path / "out", noisy_labels=[noise_file])
    table = tmp_path / "out" / "train_overrides_list_patition_label_noise30.parquet"
    overrides, truth = load_overrides(str(table)), load_ground_truth(str(table))
    expected_keys = {key_from_source("rafdb", name) for name in changed}
    assert set(overrides) == expected_keys == set(truth)
    for name, (noisy, true) in changed.items():
        key = key_from_source("rafdb", name)
        assert BASIC7[overrides[key]] == noisy and BASIC7[truth[key]] == true
    # The shards keep the ground truth.
    rows = {r["key"]: r["label_name"] for r in manifest_rows(tmp_path / "out" / "train")}
    assert all(rows[key_from_source("rafdb", n)] == true for n, (_, true) in changed.items())
    assert any(str(table) in note for note in summary.notes)


def test_rafdb_errors_name_the_file_and_line(tmp_path: Path) -> None:
    fx = make_rafdb(tmp_path / "RAF-DB", per_class=(1, 1), size=24)
    label_file = fx.extra["label_file"]
    with pytest.raises(ImporterError, match="list_patition_label.txt: missing"):
        import_rafdb(tmp_path / "elsewhere", tmp_path / "o1")

    lines = label_file.read_text().splitlines()
    label_file.write_text("\n".join(lines[:2] + ["train_09999.jpg nine"] + lines[2:]) + "\n")
    with pytest.raises(ImporterError, match=r"list_patition_label\.txt:3: expected"):
        import_rafdb(fx.root, tmp_path / "o2")

    label_file.write_text("\n".join(lines) + "\n")
    first = lines[0].split()[0]
    (fx.root / "Image" / "aligned" / f"{Path(first).stem}_aligned.jpg").unlink()
    missing = rf"{Path(first).stem}_aligned\.jpg: image missing \(listed at .*list_patition_label\.txt:1\)"
    with pytest.raises(ImporterError, match=missing):
        import_rafdb(fx.root, tmp_path / "o3")
    assert not (tmp_path / "o3" / "import_summary.json").exists()

    summary = import_rafdb(fx.root, tmp_path / "o4", options=ImportOptions(allow_missing=True))
    split = first.split("_")[0]
    assert summary.dropped[split]["image missing or unreadable"] == 1
    assert sum(set_counts(tmp_path / "o4" / split).values()) == sum(fx.counts[split].values()) - 1

    with pytest.raises(ImporterError, match="already holds a shard set"):
        import_rafdb(fx.root, tmp_path / "o4", options=ImportOptions(allow_missing=True))

    noise = tmp_path / "noise.txt"
    noise.write_text("train_00001.jpg 1\ntrain_77777.jpg 2\n")
    with pytest.raises(ImporterError, match=r"noise\.txt:2: train_77777\.jpg is not an imported training image"):
        import_rafdb(fx.root, tmp_path / "o5", noisy_labels=[noise], options=ImportOptions(allow_missing=True))


@pytest.mark.parametrize("layout", ["csv", "png"])
def test_ferplus_majority_counts(tmp_path: Path, layout: str) -> None:
    fx = (make_ferplus_csv if layout == "csv" else make_ferplus_png)(tmp_path / "ferplus")
    summary = import_ferplus(fx.root, tmp_path / "out", options=ImportOptions(shard_size=10))
    check_sets(tmp_path / "out", fx.counts, list(CANONICAL))
    assert sorted(summary.outputs) == ["test", "train", "val"]
    for split in ("train", "val", "test"):
        assert sum(summary.dropped[split].values()) == fx.dropped[split], split
    rows = [r for s in ("train", "val", "test") for r in manifest_rows(tmp_path / "out" / s)]
    assert {r["source_id"]: r["label_name"] for r in rows} == fx.labels
    meta = json.loads(rows[0]["meta"])
    assert set(meta["votes"]) >= {"neutral", "contempt", "unknown", "NF"}
    assert sum(meta["soft_label"].values()) == pytest.approx(1.0)
    assert (rows[0]["width"], rows[0]["height"]) == (48, 48)


def test_ferplus_layouts_give_the_same_keys(tmp_path: Path) -> None:
    a = make_ferplus_csv(tmp_path / "a", empty_names=0)
    b = make_ferplus_png(tmp_path / "b")
    import_ferplus(a.root, tmp_path / "oa")
    import_ferplus(b.root, tmp_path / "ob")
    for split in ("train", "val", "test"):
        ka = {r["key"]: r["label_name"] for r in manifest_rows(tmp_path / "oa" / split)}
        kb = {r["key"]: r["label_name"] for r in manifest_rows(tmp_path / "ob" / split)}
        assert ka == kb


def test_ferplus_errors(tmp_path: Path) -> None:
    fx = make_ferplus_csv(tmp_path / "ferplus")
    new = fx.root / "fer2013new.csv"
    lines = new.read_text().splitlines()
    new.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ImporterError, match="different numbers of rows"):
        import_ferplus(fx.root, tmp_path / "o1")
    fields = lines[4].split(",")
    fields[3] = "x"
    new.write_text("\n".join(lines[:4] + [",".join(fields)] + lines[5:]) + "\n")
    with pytest.raises(ImporterError, match=r"fer2013new\.csv:5: expected 10 vote counts"):
        import_ferplus(fx.root, tmp_path / "o2")
    (fx.root / "fer2013.csv").unlink()
    with pytest.raises(ImporterError, match=r"fer2013\.csv: missing"):
        import_ferplus(fx.root, tmp_path / "o3")
    with pytest.raises(ImporterError, match="neither fer2013new.csv"):
        import_ferplus(tmp_path / "nothing", tmp_path / "o4")


@pytest.mark.parametrize("protocol", [7, 8])
def test_affectnet_protocols(tmp_path: Path, protocol: int) -> None:
    fx = make_affectnet(tmp_path / "AffectNet")
    summary = import_affectnet(fx.root, tmp_path / "out", protocol=protocol)
    expected = fx.counts if protocol == 8 else fx.extra["counts7"]
    classes = list(CANONICAL if protocol == 8 else BASIC7)
    check_sets(tmp_path / "out", expected, classes)
    assert sorted(summary.outputs) == ["train", "val"]
    for split in ("train", "val"):
        dropped = summary.dropped[split]
        contempt = fx.counts[split]["contempt"] if protocol == 7 else 0
        assert sum(dropped.values()) == fx.dropped[split] + contempt
    crops = fx.extra["crops"]
    for split in ("train", "val"):
        for row in manifest_rows(tmp_path / "out" / split):
            assert (row["width"], row["height"]) == crops[row["source_id"]]
            assert row["label_name"] == fx.labels[row["source_id"]]
            assert len(row["landmarks"]) == 136 and len(row["face_box"]) == 4


def test_affectnet_malformed_validation_row(tmp_path: Path) -> None:
    fx = make_affectnet(tmp_path / "AffectNet")
    val = fx.root / "Manually_Annotated_file_lists" / "validation.csv"
    rows = list(csv.reader(val.open()))
    rows[2][6] = "12"
    with open(val, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(ImporterError, match=r"validation\.csv:3: expression code 12"):
        import_affectnet(fx.root, tmp_path / "out")
    (fx.root / "Manually_Annotated_file_lists" / "training.csv").unlink()
    with pytest.raises(ImporterError, match=r"training\.csv: missing"):
        import_affectnet(fx.root, tmp_path / "out2")


def test_affectnet_imagefolder_copy_maps_names_not_indices(tmp_path: Path) -> None:
    fx = make_affectnet_folders(tmp_path / "affectnet_folders")
    import_affectnet(fx.root, tmp_path / "out8", protocol=8)
    check_sets(tmp_path / "out8", fx.counts, list(CANONICAL))
    summary = import_affectnet(fx.root, tmp_path / "out7", protocol=7)
    expected7 = {s: Counter({k: v for k, v in c.items() if k != "contempt"}) for s, c in fx.counts.items()}
    check_sets(tmp_path / "out7", expected7, list(BASIC7))
    assert summary.dropped["train"]["class contempt not in the class list"] == fx.counts["train"]["contempt"]


def test_imagefolder_synonyms_and_unknown_names(tmp_path: Path) -> None:
    fx = make_imagefolder(tmp_path / "tree")
    summary = import_imagefolder(fx.root, tmp_path / "set", split="test")
    assert summary.classes == ["neutral", "happiness", "sadness", "surprise", "anger"]
    check_sets(tmp_path / "set", {"test": fx.counts["train"]}, summary.classes, per_split=False)
    assert summary.dropped["test"]["not an image in a class folder"] == fx.dropped["train"]
    ids = {r["source_id"]: r["label_name"] for r in manifest_rows(tmp_path / "set")}
    assert ids == fx.labels

    summary = import_imagefolder(fx.root, tmp_path / "set7", classes=list(BASIC7))
    assert open_shard_set(str(tmp_path / "set7")).classes == BASIC7

    (fx.root / "4").mkdir()
    (fx.root / "Joyful").mkdir()
    with pytest.raises(ImporterError, match=r"folder names \['4', 'Joyful'\] are not expression classes"):
        import_imagefolder(fx.root, tmp_path / "set2")


def test_csv_list(tmp_path: Path) -> None:
    fx = make_csvlist(tmp_path / "data")
    summary = import_csv(fx.extra["list"], tmp_path / "set")
    assert summary.classes == ["happiness", "fear", "disgust", "contempt"]
    check_sets(tmp_path / "set", fx.counts, summary.classes, per_split=False)
    with open(fx.extra["list"], "a") as f:
        f.write("images/000.jpg,bored\n")
    with pytest.raises(ImporterError, match=r"list\.csv:8: unknown class name 'bored'"):
        import_csv(fx.extra["list"], tmp_path / "set2")


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fx = make_rafdb(tmp_path / "RAF-DB", per_class=(1, 1), size=24)
    assert main(["rafdb", "--root", str(fx.root), "--out", str(tmp_path / "out"), "--shard-size", "3"]) == 0
    printed = capsys.readouterr().out
    for name in BASIC7:
        assert name in printed
    assert set_counts(tmp_path / "out" / "train") == fx.counts["train"]

    tree = make_imagefolder(tmp_path / "tree")
    assert main(["imagefolder", "--root", str(tree.root), "--out", str(tmp_path / "if"), "--classes", "basic7",
                 "--split", "val", "--dataset", "mine"]) == 0
    rows = manifest_rows(tmp_path / "if")
    assert {r["split"] for r in rows} == {"val"} and {r["provider"] for r in rows} == {"mine"}

    assert main(["affectnet", "--root", str(tmp_path / "none"), "--out", str(tmp_path / "a")]) == 2
    assert "none: no such directory" in capsys.readouterr().err
