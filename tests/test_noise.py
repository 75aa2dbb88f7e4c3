import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scn_scale.noise import load_ground_truth, load_overrides, main, make_noise

CLASSES = ["neutral", "happiness", "sadness", "surprise"]


def make_set(root, n=200, reverse=False):
    keys = [f"s{i:04d}" for i in range(n)]
    labels = [i % len(CLASSES) for i in range(n)]
    if reverse:
        keys, labels = keys[::-1], labels[::-1]
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table({"key": keys, "label": pa.array(labels, pa.int32()), "label_name": [CLASSES[i] for i in labels]}),
        root / "manifest.parquet",
    )
    (root / "stats.json").write_text(json.dumps({"classes": CLASSES}))
    return dict(zip(keys, labels))


def run(tmp_path, shards, seed, name, rate="0.3"):
    out = tmp_path / name
    assert main(["--shards", str(shards), "--rate", rate, "--seed", str(seed), "--out", str(out)]) == 0
    return out


def test_cli_exact_count_all_labels_changed(tmp_path, capsys):
    truth = make_set(tmp_path / "set")
    out = run(tmp_path, tmp_path / "set", 0, "noise.parquet")
    assert "60 of 200 labels changed" in capsys.readouterr().out
    noisy, true = load_overrides(str(out)), load_ground_truth(str(out))
    assert len(noisy) == 60 == round(0.3 * 200)
    assert noisy.keys() == true.keys()
    assert all(true[k] == truth[k] for k in true)
    assert all(noisy[k] != truth[k] and 0 <= noisy[k] < len(CLASSES) for k in noisy)


def test_cli_is_seeded(tmp_path):
    make_set(tmp_path / "set")
    make_set(tmp_path / "reversed", reverse=True)
    first = pq.read_table(run(tmp_path, tmp_path / "set", 7, "a.parquet"))
    again = pq.read_table(run(tmp_path, tmp_path / "set", 7, "b.parquet"))
    reordered = pq.read_table(run(tmp_path, tmp_path / "reversed", 7, "c.parquet"))
    other = pq.read_table(run(tmp_path, tmp_path / "set", 8, "d.parquet"))
    assert first.equals(again)
    assert first.equals(reordered)  # the manifest's row order does not matter
    assert not first.equals(other)


def test_noise_reaches_every_other_class():
    keys = [f"k{i}" for i in range(2000)]
    table = make_noise(keys, [0] * 2000, 4, 0.5, seed=3)
    counts = Counter(table.column("label").to_pylist())
    assert table.num_rows == 1000 and set(counts) == {1, 2, 3}
    assert min(counts.values()) > 250  # about 333 each


@pytest.mark.parametrize("rate, expected", [(0.0, 0), (1.0, 10), (0.25, 2), (0.35, 4)])
def test_count_is_round_rate_n(rate, expected):
    table = make_noise([f"k{i}" for i in range(10)], [1] * 10, 3, rate, seed=0)
    assert table.num_rows == expected


def test_bad_inputs():
    with pytest.raises(ValueError, match="rate"):
        make_noise(["a"], [0], 3, 1.5, 0)
    with pytest.raises(ValueError, match="labels must be in"):
        make_noise(["a"], [3], 3, 0.5, 0)
    with pytest.raises(ValueError, match="not unique"):
        make_noise(["a", "a"], [0, 1], 3, 0.5, 0)


def test_weighted_noise_picks_in_proportion_to_the_weights():
    keys = [f"k{i:04d}" for i in range(3000)]
    weights = [0.0] * 1000 + [1.0] * 1000 + [3.0] * 1000  # by key order
    table = make_noise(keys, [0] * 3000, 4, 0.2, seed=5, weights=weights)
    picked = np.array([int(k[1:]) for k in table.column("key").to_pylist()])
    counts = np.bincount(picked // 1000, minlength=3)
    assert counts.sum() == 600 and counts[0] == 0  # weight 0: never while others are left
    assert 2.2 < counts[2] / counts[1] < 4.5  # about 3 to 1 (drawn without replacement)
    assert (table.column("label").to_numpy() != 0).all()  # still another class than the true one
    again = make_noise(list(reversed(keys)), [0] * 3000, 4, 0.2, seed=5, weights=list(reversed(weights)))
    assert again.equals(table)  # the draw follows the keys, not the input order
    everything = make_noise(keys, [0] * 3000, 4, 1.0, seed=5, weights=weights)
    assert everything.num_rows == 3000  # the weight-0 samples come last, not never
    with pytest.raises(ValueError, match="weights must be"):
        make_noise(keys, [0] * 3000, 4, 0.2, seed=5, weights=[1.0] * 10)
    with pytest.raises(ValueError, match="weights must be"):
        make_noise(keys, [0] * 3000, 4, 0.2, seed=5, weights=[-1.0] * 3000)
