"""Classification metrics and the alpha distribution, on arrays or tensors of already de-duplicated samples.

Benchmarks with skewed classes (AffectNet, FERPlus) are compared by mean per-class
accuracy as well as accuracy; alpha statistics are logged every epoch because alpha can
collapse (all values near 1) when training from scratch under heavy noise.

Training at web scale never brings every alpha to one process: each rank summarises its
own samples in an `AlphaHistogram` (fixed bins, exact moments), the ranks add them up,
and each rank writes its per-sample alpha to its own parquet part (`write_alpha_part`).
The step loop's sums stay on the device (`RunningSums`) until the trainer reads them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from shards.atomic import atomic_path
from shards.fs import join

QUANTILES = (5, 25, 50, 75, 95)
COLLAPSE_THRESHOLD = 0.99
#: Histogram bins on [0, 1]: quantiles from the histogram are exact to one bin (0.001).
ALPHA_BINS = 1000
ALPHA_DIR = "alpha"


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


def paired_accuracy_gap(correct_a: Any, correct_b: Any) -> tuple[float, float]:
    """Accuracy of a minus that of b, scored on the same samples, and the half-width of its 95% interval.

    Two models scored on one test set get most samples right or wrong together, so the
    error of their difference comes only from the discordant samples (McNemar's counts:
    right for a only, right for b only). This interval (Wald's, for paired proportions) is
    far tighter than treating the two accuracies as independent, and the one to judge a gain by.
    """
    a, b = _array(correct_a).astype(bool), _array(correct_b).astype(bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired samples need two 1-D arrays of one length, got {a.shape} and {b.shape}")
    n = a.shape[0]
    if not n:
        return math.nan, math.nan
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    diff = (only_a - only_b) / n
    var = max((only_a + only_b) / n - diff**2, 0.0) / n
    return diff, 1.96 * math.sqrt(var)


def alpha_auc(alpha: Any, noisy: Any) -> tuple[float, float] | None:
    """How well a low alpha tells a mislabeled sample: P(alpha_noisy < alpha_clean), ties counting
    half (the ROC AUC of -alpha), and the half-width of its 95% interval (Hanley and McNeil, 1982).

    0.5 is chance. None without both groups. A mean gap says whether alpha moves; the AUC says
    whether it singles out the right samples, whatever alpha's spread.
    """
    alpha, noisy = _array(alpha).astype(np.float64), _array(noisy).astype(bool)
    n1, n0 = int(noisy.sum()), int((~noisy).sum())
    if not (n1 and n0):
        return None
    # Ranks of -alpha, ties averaged: the Mann-Whitney statistic of the noisy group.
    order = np.argsort(-alpha, kind="stable")
    ranks = np.empty(len(alpha))
    ranks[order] = np.arange(1, len(alpha) + 1)
    _, inverse, counts = np.unique(-alpha, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    ranks = (sums / counts)[inverse]
    auc = float((ranks[noisy].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (n1 - 1) * (q1 - auc**2) + (n0 - 1) * (q2 - auc**2)) / (n1 * n0)
    return auc, 1.96 * math.sqrt(max(var, 0.0))


def alpha_gap(stats: dict) -> tuple[float, float] | None:
    """Mean alpha of clean minus noisy samples in `alpha_stats`' output, and twice its standard
    error; None without both groups. Positive is what SCN intends: the mislabeled samples
    weigh less. The error is that of a difference of two independent means.
    """
    noisy, clean = stats.get("noisy", {}), stats.get("clean", {})
    if not (noisy.get("n") and clean.get("n")):
        return None
    se = math.hypot(noisy["std"] / math.sqrt(noisy["n"]), clean["std"] / math.sqrt(clean["n"]))
    return clean["mean"] - noisy["mean"], 2 * se


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


@dataclass
class AlphaHistogram:
    """One or more ranks' alpha distribution: `alpha_stats`' fields without holding the values.

    Row 0 is every sample, rows 1 and 2 the noisy and clean ones when the truth is known.
    n, mean, std, min, max and `above_0_99` are exact; quantiles are read off the
    histogram, exact to within one bin (1 / ALPHA_BINS). Ranks combine by summing
    `counts` and `moments` and taking the min of `low` and the max of `high`.
    """

    counts: Tensor  # float64 [groups, ALPHA_BINS]; float64 so that one sum carries counts and moments
    moments: Tensor  # float64 [groups, 4]: n, sum, sum of squares, how many above COLLAPSE_THRESHOLD
    low: Tensor  # float64 [groups]: min (+inf when empty)
    high: Tensor  # float64 [groups]: max (-inf when empty)

    @classmethod
    def of(cls, alpha: Tensor, noisy: Tensor | None = None) -> AlphaHistogram:
        """The histogram of `alpha` ([n], any float dtype), split by the boolean `noisy` mask when given."""
        alpha = alpha.detach().double().flatten()
        groups = [alpha] if noisy is None else [alpha, alpha[noisy], alpha[~noisy]]
        counts = torch.stack([torch.histc(g, bins=ALPHA_BINS, min=0.0, max=1.0) for g in groups]).double()
        moments = torch.tensor([[len(g), g.sum(), (g * g).sum(), (g > COLLAPSE_THRESHOLD).sum()] for g in groups], dtype=torch.float64)
        low = torch.tensor([g.min() if len(g) else float("inf") for g in groups], dtype=torch.float64)
        high = torch.tensor([g.max() if len(g) else float("-inf") for g in groups], dtype=torch.float64)
        return cls(counts, moments, low, high)

    def stats(self) -> dict:
        """The metrics line's `alpha`: the keys of `alpha_stats`."""
        described = [self._describe(g) for g in range(len(self.moments))]
        stats = described[0]
        if len(described) == 3:
            stats["noisy"], stats["clean"] = described[1], described[2]
        return stats

    def _describe(self, g: int) -> dict:
        n, total, squares, above = self.moments[g].tolist()
        if not n:
            return {"n": 0}
        mean = total / n
        low, high = float(self.low[g]), float(self.high[g])
        stats = {"n": int(n), "mean": mean, "std": max(squares / n - mean * mean, 0.0) ** 0.5, "min": low, "max": high}
        # Quantiles: numpy's linear interpolation between order statistics, each order
        # statistic placed within its bin as if the bin's samples were evenly spread.
        cumulative = torch.cumsum(self.counts[g], 0)
        for q in QUANTILES:
            rank = (n - 1) * q / 100
            values = [self._order_statistic(cumulative, k) for k in (int(rank), min(int(rank) + 1, int(n) - 1))]
            value = values[0] + (rank - int(rank)) * (values[1] - values[0])
            stats[f"q{q:02d}"] = min(max(value, low), high)
        stats["above_0_99"] = above / n
        return stats

    @staticmethod
    def _order_statistic(cumulative: Tensor, k: int) -> float:
        """The k-th smallest sample (0-based), estimated from the cumulative bin counts."""
        b = int(torch.searchsorted(cumulative, torch.tensor(k + 0.5, dtype=cumulative.dtype)))
        before = float(cumulative[b - 1]) if b else 0.0
        inside = float(cumulative[b]) - before
        return (b + (k - before + 0.5) / inside) / ALPHA_BINS


class RunningSums:
    """The training step's per-sample sums (loss, wce, rr, correct, alpha and its square, for the
    per-step alpha std that tracking logs), kept on the device.

    Adding is a device operation, so a step never waits for the host; `read` copies the
    sums back (one synchronisation), which the trainer does once per logging interval.
    """

    FIELDS = ("loss", "wce", "rr", "correct", "alpha", "alpha_sq")

    def __init__(self, device: torch.device) -> None:
        self.total = torch.zeros(len(self.FIELDS), dtype=torch.float64, device=device)

    def add(self, n: int, loss: Tensor, wce: Tensor, rr: Tensor, correct: Tensor, alpha: Tensor) -> None:
        """One batch of `n` samples: batch means loss, wce and rr; the count of correct predictions; alpha per sample."""
        means = torch.stack([loss.detach(), wce.detach(), rr.detach()]).double() * n
        alpha = alpha.detach().double()
        self.total += torch.cat([means, correct.double().reshape(1), alpha.sum().reshape(1), (alpha * alpha).sum().reshape(1)])

    def read(self) -> dict[str, float]:
        return dict(zip(self.FIELDS, self.total.tolist()))


def alpha_epoch_url(run: str, epoch: int) -> str:
    """The directory of epoch `epoch`'s per-sample alpha parts, `run/alpha/epoch_NNNN`: one parquet table to a reader."""
    return join(run.rstrip("/"), f"{ALPHA_DIR}/epoch_{epoch:04d}")


def alpha_part_url(run: str, epoch: int, rank: int) -> str:
    """Where rank `rank` writes epoch `epoch`'s per-sample alpha: `run/alpha/epoch_NNNN/rank_RRRR.parquet`.

    One directory per epoch, one part per rank: `pyarrow.parquet.read_table` reads the
    directory as one table (it skips the dot-named temporary files of unfinished writes).
    """
    return join(alpha_epoch_url(run, epoch), f"rank_{rank:04d}.parquet")


def write_alpha_part(run: str, epoch: int, rank: int, keys: pa.Array, alpha: Tensor | np.ndarray) -> str:
    """Write one rank's per-sample alpha of one epoch (columns key, alpha) into the run directory; return its URL.

    Atomic on a local file system; object stores publish whole objects anyway.
    """
    url = alpha_part_url(run, epoch, rank)
    write_run_table(url, pa.table({"key": keys, "alpha": pa.array(np.asarray(alpha, dtype=np.float32))}))
    return url


def write_run_table(url: str, table: pa.Table) -> None:
    """Write a per-sample table into a run directory, local or in object storage.

    Atomic on a local file system; object stores publish whole objects anyway. No
    dictionary encoding: the key column is unique, where a dictionary only costs time.
    """
    with atomic_path(url) as tmp:  # on an object store: staged locally, uploaded whole
        pq.write_table(table, tmp, use_dictionary=False)
