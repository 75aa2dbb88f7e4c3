"""Classification metrics and the alpha distribution, on arrays or tensors of already de-duplicated samples.

Benchmarks with skewed classes (AffectNet, FERPlus) are compared by mean per-class
accuracy as well as accuracy; alpha statistics are logged every epoch because alpha can
collapse (all values near 1) when training from scratch under heavy noise.
"""

from __future__ import annotations

from typing import Any

import numpy as np

QUANTILES = (5, 25, 50, 75, 95)
COLLAPSE_THRESHOLD = 0.99


def _array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def confusion_matrix(preds: Any, targets: Any, num_classes: int) -> np.ndarray:
    """[C, C] counts; rows are true classes, columns predicted classes."""
    preds, targets = _array(preds).astype(np.int64).ravel(), _array(targets).astype(np.int64).ravel()
    if preds.shape != targets.shape:
        raise ValueError(f"{preds.size} predictions for {targets.size} targets")
    for name, a in (("predictions", preds), ("targets", targets)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} must be in [0, {num_classes}), got range [{a.min()}, {a.max()}]")
    return np.bincount(targets * num_classes + preds, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy(preds: Any, targets: Any) -> float:
    preds, targets = _array(preds).ravel(), _array(targets).ravel()
    if preds.shape != targets.shape:
        raise ValueError(f"{preds.size} predictions for {targets.size} targets")
    return float((preds == targets).mean()) if preds.size else float("nan")


def per_class_accuracy(preds: Any, targets: Any, num_classes: int) -> np.ndarray:
    """Recall of each true class; NaN for a class with no sample."""
    cm = confusion_matrix(preds, targets, num_classes)
    totals = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(cm) / totals, np.nan)


def mean_class_accuracy(preds: Any, targets: Any, num_classes: int) -> float:
    """Mean of per-class accuracies over the classes that have samples: a class absent from
    the evaluated set has no accuracy, and counting it as 0 would punish the model for the data.
    """
    per_class = per_class_accuracy(preds, targets, num_classes)
    present = per_class[~np.isnan(per_class)]
    return float(present.mean()) if present.size else float("nan")


def alpha_stats(alpha: Any, noisy: Any | None = None) -> dict:
    """Distribution of alpha: mean, std, min, max, quantiles q05..q95 and `above_0_99` (the
    share of samples above 0.99, the collapse check); with a noisy-label mask, the same
    for `noisy` and `clean` samples (SCN should give noisy samples lower alpha).
    """
    alpha = _array(alpha).astype(np.float64).ravel()
    stats = _describe(alpha)
    if noisy is not None:
        mask = _array(noisy).astype(bool).ravel()
        if mask.shape != alpha.shape:
            raise ValueError(f"noisy mask of {mask.size} for {alpha.size} alpha values")
        stats["noisy"] = _describe(alpha[mask])
        stats["clean"] = _describe(alpha[~mask])
    return stats


def _describe(values: np.ndarray) -> dict:
    if not values.size:
        return {"n": 0}
    stats = {
        "n": int(values.size),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
    }
    for q, v in zip(QUANTILES, np.percentile(values, QUANTILES)):
        stats[f"q{q:02d}"] = float(v)
    stats["above_0_99"] = float((values > COLLAPSE_THRESHOLD).mean())
    return stats
