import math

import numpy as np
import pytest
import torch

from scn_scale.metrics import (
    ALPHA_BINS,
    QUANTILES,
    AlphaHistogram,
    RunningSums,
    accuracy,
    alpha_auc,
    alpha_gap,
    alpha_stats,
    confusion_matrix,
    mean_class_accuracy,
    paired_accuracy_gap,
    per_class_accuracy,
)

# true:  0 0 0 1 1 2 2 2 2 ; class 3 has no sample
# pred:  0 0 1 1 3 2 2 0 2
TARGETS = [0, 0, 0, 1, 1, 2, 2, 2, 2]
PREDS = [0, 0, 1, 1, 3, 2, 2, 0, 2]


def test_confusion_matrix_rows_are_true_classes():
    cm = confusion_matrix(torch.tensor(PREDS), torch.tensor(TARGETS), 4)
    assert cm.tolist() == [[2, 1, 0, 0], [0, 1, 0, 1], [1, 0, 3, 0], [0, 0, 0, 0]]
    with pytest.raises(ValueError, match="targets must be in"):
        confusion_matrix([0], [4], 4)


def test_accuracies():
    assert accuracy(PREDS, TARGETS) == pytest.approx(6 / 9)
    per_class = per_class_accuracy(np.array(PREDS), np.array(TARGETS), 4)
    assert per_class[:3].tolist() == pytest.approx([2 / 3, 1 / 2, 3 / 4])
    assert math.isnan(per_class[3])
    # Class 3 has no sample: it is left out, not counted as 0.
    assert mean_class_accuracy(PREDS, TARGETS, 4) == pytest.approx((2 / 3 + 1 / 2 + 3 / 4) / 3)


def test_paired_gap_counts_only_the_discordant_samples():
    # 1,000 samples: both right on 500, both wrong on 300, a only 120, b only 80.
    a = np.array([1] * 500 + [0] * 300 + [1] * 120 + [0] * 80, bool)
    b = np.array([1] * 500 + [0] * 300 + [0] * 120 + [1] * 80, bool)
    diff, half = paired_accuracy_gap(a, b)
    assert diff == pytest.approx(0.04)
    assert half == pytest.approx(1.96 * math.sqrt((0.2 - 0.04**2) / 1000))
    # Far tighter than treating the two accuracies (0.62, 0.58) as independent binomials.
    assert half < 1.96 * math.hypot(math.sqrt(0.62 * 0.38 / 1000), math.sqrt(0.58 * 0.42 / 1000)) * 0.8
    assert paired_accuracy_gap(b, a) == pytest.approx((-0.04, half))
    assert paired_accuracy_gap(a, a) == (0.0, 0.0)
    with pytest.raises(ValueError, match="paired samples"):
        paired_accuracy_gap(a, b[:-1])


def test_alpha_auc_against_counted_pairs():
    rng = np.random.default_rng(0)
    alpha = np.round(rng.uniform(size=300), 2)  # rounded: ties occur
    noisy = rng.uniform(size=300) < 0.3
    alpha[noisy] -= 0.1
    auc, half = alpha_auc(alpha, noisy)
    lo, hi = alpha[noisy][:, None], alpha[~noisy][None, :]
    assert auc == pytest.approx(((lo < hi).sum() + 0.5 * (lo == hi).sum()) / lo.size / hi.size)
    assert 0.5 < auc < 1.0 and 0.0 < half < 0.1
    assert alpha_auc(-alpha, noisy)[0] == pytest.approx(1 - auc)
    assert alpha_auc(np.full(10, 0.7), np.arange(10) < 3)[0] == 0.5  # alpha that tells nothing
    assert alpha_auc(alpha, np.zeros(300, bool)) is None


def test_alpha_stats_split_by_noise():
    alpha = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.995, 0.999])
    noisy = torch.tensor([True, True, False, False, False, False])
    stats = alpha_stats(alpha, noisy)
    assert stats["n"] == 6
    assert stats["mean"] == pytest.approx(alpha.double().mean().item())
    assert stats["std"] == pytest.approx(float(np.std(alpha.double().numpy())))
    assert (stats["min"], stats["max"]) == pytest.approx((0.1, 0.999))
    assert stats["q50"] == pytest.approx(0.35)
    assert stats["q05"] == pytest.approx(0.125) and stats["q95"] == pytest.approx(0.998)
    assert stats["above_0_99"] == pytest.approx(2 / 6)
    assert stats["noisy"]["n"] == 2 and stats["noisy"]["mean"] == pytest.approx(0.15)
    assert stats["clean"]["n"] == 4 and stats["clean"]["above_0_99"] == pytest.approx(0.5)
    assert "noisy" not in alpha_stats(alpha)
    assert alpha_stats(alpha, [False] * 6)["noisy"] == {"n": 0}


def test_alpha_gap_is_clean_minus_noisy_with_twice_the_standard_error_of_a_difference_of_means():
    alpha = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.8])
    noisy = np.array([True, True, False, False, False, False])
    gap, two_se = alpha_gap(alpha_stats(alpha, noisy))
    assert gap == pytest.approx(0.525 - 0.15)
    assert two_se == pytest.approx(2 * math.sqrt(np.var(alpha[noisy]) / 2 + np.var(alpha[~noisy]) / 4))
    assert alpha_gap(alpha_stats(alpha)) is None and alpha_gap(alpha_stats(alpha, [False] * 6)) is None


def _added(parts: list[AlphaHistogram]) -> AlphaHistogram:
    """Ranks' histograms combined as scn_scale.sync.all_reduce_alpha does."""
    return AlphaHistogram(
        sum(p.counts for p in parts), sum(p.moments for p in parts),
        torch.stack([p.low for p in parts]).amin(0), torch.stack([p.high for p in parts]).amax(0),
    )


def test_alpha_histogram_gives_alpha_stats_fields_from_ranks_parts():
    rng = np.random.default_rng(0)
    alpha = torch.from_numpy(np.concatenate([rng.beta(5, 2, 5000), rng.uniform(0.99, 1.0, 300)])).float()
    noisy = torch.from_numpy(rng.random(alpha.shape[0]) < 0.3)
    exact = alpha_stats(alpha, noisy)
    stats = _added([AlphaHistogram.of(alpha[:2000], noisy[:2000]), AlphaHistogram.of(alpha[2000:], noisy[2000:])]).stats()
    for got, want in ((stats, exact), (stats["noisy"], exact["noisy"]), (stats["clean"], exact["clean"])):
        assert set(got) == set(want) and got["n"] == want["n"]
        for key in ("mean", "std", "min", "max", "above_0_99"):  # exact
            assert got[key] == pytest.approx(want[key], rel=1e-9), key
        for q in QUANTILES:  # from the histogram: within one bin
            assert abs(got[f"q{q:02d}"] - want[f"q{q:02d}"]) <= 1 / ALPHA_BINS, q
    assert "noisy" not in AlphaHistogram.of(alpha).stats()
    assert AlphaHistogram.of(alpha, torch.zeros(alpha.shape[0], dtype=torch.bool)).stats()["noisy"] == {"n": 0}
    same = AlphaHistogram.of(torch.full((7,), 0.4321)).stats()  # quantiles stay within [min, max]
    assert all(same[f"q{q:02d}"] == pytest.approx(0.4321) for q in QUANTILES)


def test_running_sums_are_per_sample_sums():
    sums = RunningSums(torch.device("cpu"))
    sums.add(4, torch.tensor(2.0), torch.tensor(1.5), torch.tensor(0.5), torch.tensor(3), torch.tensor([0.1, 0.2, 0.3, 0.4]))
    sums.add(2, torch.tensor(1.0), torch.tensor(1.0), torch.tensor(0.0), torch.tensor(1), torch.tensor([0.5, 0.5]))
    assert sums.read() == pytest.approx({"loss": 10.0, "wce": 8.0, "rr": 2.0, "correct": 4.0, "alpha": 2.0,
                                   "alpha_sq": 0.8})


def test_paired_gap_of_two_prediction_files_pairs_by_key(tmp_path):
    from scn_scale.predictions import Predictions, paired_gap
    from shards.atomic import write_parquet

    def saved(name, keys, labels, preds):
        pred = Predictions(keys, np.array(labels), np.array(preds), np.zeros((len(keys), 3)), np.zeros(len(keys)))
        write_parquet(tmp_path / name, pred.to_table(["a", "b", "c"]))
        return str(tmp_path / name)

    # The same four samples in another order: a is right on k0, k1, k2; b on k0 only.
    a = saved("a.parquet", ["k0", "k1", "k2", "k3"], [0, 1, 2, 0], [0, 1, 2, 1])
    b = saved("b.parquet", ["k3", "k2", "k1", "k0"], [0, 2, 1, 0], [1, 0, 0, 0])
    assert paired_gap(a, b) == pytest.approx(paired_accuracy_gap([1, 1, 1, 0], [1, 0, 0, 0]))
    other = saved("c.parquet", ["k0", "k1", "k2", "k9"], [0, 1, 2, 0], [0, 1, 2, 1])
    with pytest.raises(ValueError, match="scored different samples"):
        paired_gap(a, other)
