"""The synthetic corpus: reproducible, laid out exactly, and learnable in the way real FER data is."""

from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crawler.synthetic import RAFDB_LABELS, CorpusConfig, generate_corpus, generate_face, main
from crawler.synthetic_draw import sample_identity
from shards.classes import BASIC7, CANONICAL


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    def run(name: str, seed: int) -> dict[str, bytes]:
        cfg = CorpusConfig(out=str(tmp_path / name), per_class=3, classes=["happiness", "anger"], size=48,
                           seed=seed, identities=5)
        generate_corpus(cfg)
        files = _files(tmp_path / name)
        files.pop("corpus.json")  # records the output path, which differs by construction
        return files

    first, again, other = run("a", 0), run("b", 0), run("c", 1)
    assert first == again
    images = [k for k in first if k.endswith(".jpg")]
    assert len(images) == 6 and images == [k for k in other if k.endswith(".jpg")]
    assert all(first[k] != other[k] for k in images)


def test_folder_layout_counts_and_csv(tmp_path: Path) -> None:
    summary = generate_corpus(CorpusConfig(out=str(tmp_path), per_class=4, size=48, identities=6))
    assert summary["images"] == 32 and summary["per_class"] == {c: 4 for c in CANONICAL}
    on_disk = Counter(p.parent.name for p in tmp_path.glob("*/*.jpg"))
    assert on_disk == {c: 4 for c in CANONICAL}
    rows = _rows(tmp_path / "corpus.csv")
    assert list(rows[0]) == ["file", "class", "intensity", "identity", "seed"]
    assert Counter(r["class"] for r in rows) == on_disk
    for r in rows:
        assert re.fullmatch(rf"{r['class']}/{r['class']}-\d{{6}}\.jpg", r["file"])
        assert (tmp_path / r["file"]).is_file()
        assert 0.0 <= float(r["intensity"]) <= 1.0
        assert 0 <= int(r["identity"]) < 6 and r["seed"] == "0"
    with Image.open(tmp_path / rows[0]["file"]) as im:
        assert im.size == (48, 48)
    assert len({int(r["identity"]) for r in rows}) > 1


def test_rafdb_layout(tmp_path: Path) -> None:
    summary = generate_corpus(CorpusConfig(out=str(tmp_path), layout="rafdb", per_class=10, identities=20))
    assert summary["splits"] == {"train": 56, "test": 14}
    lines = (tmp_path / "EmoLabel" / "list_patition_label.txt").read_text().splitlines()
    assert len(lines) == 70
    labels = {}
    for line in lines:
        m = re.fullmatch(r"(train_\d{5}|test_\d{4})\.jpg ([1-7])", line)
        assert m, line
        labels[m[1]] = int(m[2])
        with Image.open(tmp_path / "Image" / "aligned" / f"{m[1]}_aligned.jpg") as im:
            assert im.size == (100, 100)
    assert sorted(n for n in labels if n.startswith("train")) == [f"train_{i:05d}" for i in range(1, 57)]
    assert sorted(n for n in labels if n.startswith("test")) == [f"test_{i:04d}" for i in range(1, 15)]
    rows = _rows(tmp_path / "corpus.csv")
    by_class = Counter()
    people = {"train": set(), "test": set()}
    for r in rows:
        name = Path(r["file"]).stem.removesuffix("_aligned")
        assert labels[name] == RAFDB_LABELS[r["class"]]
        assert name.startswith(r["split"])
        by_class[r["class"]] += 1
        people[r["split"]].add(r["identity"])
    assert RAFDB_LABELS == {"surprise": 1, "fear": 2, "disgust": 3, "happiness": 4, "sadness": 5, "anger": 6,
                            "neutral": 7}
    assert all(labels[Path(r["file"]).stem[:-8]] == 4 for r in rows if r["class"] == "happiness")
    assert by_class == {c: 10 for c in BASIC7}
    assert people["train"] and people["test"] and not people["train"] & people["test"]


@pytest.mark.parametrize("kwargs", [
    {"classes": ["happy"]},
    {"classes": ["anger", "neutral"]},
    {"layout": "rafdb", "classes": ["neutral", "contempt"]},
    {"intensity_range": (0.5, 1.5)},
    {"layout": "rafdb", "test_fraction": 1.0},
])
def test_bad_config_fails_before_writing(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        generate_corpus(CorpusConfig(out=str(tmp_path / "out"), per_class=1, **kwargs))
    assert not (tmp_path / "out").exists()


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--out", str(tmp_path), "--per-class", "2", "--classes", "neutral,contempt", "--image-size", "40",
                 "--identities", "3", "--seed", "4"]) == 0
    assert len(list(tmp_path.glob("contempt/*.jpg"))) == 2
    assert "4 images" in capsys.readouterr().out


def test_cli_takes_the_old_size_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--size, the spelling before the commands agreed on --image-size, still works."""
    assert main(["--out", str(tmp_path), "--per-class", "1", "--classes", "neutral", "--size", "24",
                 "--identities", "1"]) == 0
    assert "(folder, 24 px)" in capsys.readouterr().out


def test_generate_face_contract() -> None:
    image, info = generate_face(np.random.default_rng(0), "surprise", size=64)
    assert image.size == (64, 64) and image.mode == "RGB"
    assert info["class"] == "surprise" and 0.0 <= info["intensity"] <= 1.0
    assert generate_face(np.random.default_rng(0), "neutral", intensity=0.9)[1]["intensity"] == 0.0
    with pytest.raises(ValueError):
        generate_face(np.random.default_rng(0), "joy")


def _features(people: list, pids: range, per_class: int, low: float, high: float, seed: int):
    """Grey pixels of the aligned inner face (brows to chin), where expressions live."""
    x, y = [], []
    for c, cls in enumerate(CANONICAL):
        for j in range(per_class):
            rng = np.random.default_rng([seed, c, j])
            person = people[pids[rng.integers(len(pids))]]
            image, _ = generate_face(rng, cls, size=48, intensity=rng.uniform(low, high), identity=person)
            x.append(np.asarray(image.convert("L").crop((8, 12, 40, 46)).resize((24, 24)), np.float32).ravel())
            y.append(c)
    x = np.array(x)
    return (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-6), np.array(y)


def test_learnable_and_low_intensity_is_harder() -> None:
    people = [sample_identity(np.random.default_rng([5, i])) for i in range(40)]
    x_train, y_train = _features(people, range(30), 48, 0.6, 1.0, seed=1)  # persons 30..39 never trained on
    x_high, y_high = _features(people, range(30, 40), 20, 0.6, 1.0, seed=2)
    x_low, y_low = _features(people, range(30, 40), 20, 0.0, 0.15, seed=3)

    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    a = (x_train - mean) / std
    w, b, onehot = np.zeros((a.shape[1], 8)), np.zeros(8), np.eye(8)[y_train]
    for _ in range(300):  # softmax regression, plain gradient descent
        z = a @ w + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / len(a)
        w -= 0.5 * (a.T @ g + 1e-2 * w)
        b -= 0.5 * g.sum(0)

    def accuracy(x: np.ndarray, y: np.ndarray) -> float:
        expressive = y != 0  # neutral has no intensity: compare the other classes only
        return float((np.argmax((x - mean) / std @ w + b, 1) == y)[expressive].mean())

    high, low = accuracy(x_high, y_high), accuracy(x_low, y_low)
    assert high > 3 / 8, (high, low)
    assert low < high - 0.2, (high, low)
