import math

import numpy as np
import pytest
import torch

from scn_scale.metrics import accuracy, alpha_stats, confusion_matrix, mean_class_accuracy, per_class_accuracy

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
