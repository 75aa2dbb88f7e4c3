"""Model outputs per sample, gathered by key so that every sample counts exactly once.

Equal batches per rank mean some samples are read twice (workers cycle their shards)
and ranks may overlap; metrics computed on raw batches would count those twice. Every
evaluation path (validation during training, `scn_scale.evaluate`) therefore collects
`Predictions`, merges them across ranks and de-duplicates by key before any metric.
"""

from __future__ import annotations

from dataclasses import dataclass
import json
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from scn_scale import metrics
from scn_scale.model import SCNModel
from shards.fs import join

#: A training run's validation predictions, one file per epoch: `run/predictions/epoch_NNNN.parquet`.
PREDICTIONS_DIR = "predictions"


@dataclass
class Predictions:
    keys: list[str]
    labels: np.ndarray  # [N] label the sample was evaluated against
    preds: np.ndarray  # [N] argmax class
    probs: np.ndarray  # [N, C] softmax of the unscaled logits
    alpha: np.ndarray  # [N] importance weight

    def __len__(self) -> int:
        return len(self.keys)

    @staticmethod
    def concat(parts: Iterable["Predictions"]) -> "Predictions":
        parts = [p for p in parts if len(p)]
        if not parts:
            return Predictions([], np.zeros(0, int), np.zeros(0, int), np.zeros((0, 0)), np.zeros(0))
        return Predictions(
            keys=[k for p in parts for k in p.keys],
            labels=np.concatenate([p.labels for p in parts]),
            preds=np.concatenate([p.preds for p in parts]),
            probs=np.concatenate([p.probs for p in parts]),
            alpha=np.concatenate([p.alpha for p in parts]),
        )

    def to_table(self, classes: Sequence[str]) -> pa.Table:
        """One row per sample (key, label, pred, alpha, probs), the class list in the schema's metadata."""
        table = pa.table(
            {
                "key": pa.array(self.keys, pa.string()),
                "label": pa.array(self.labels.astype(np.int64)),
                "pred": pa.array(self.preds.astype(np.int64)),
                "alpha": pa.array(self.alpha.astype(np.float64)),
                "probs": pa.array(self.probs.astype(np.float64).tolist(), pa.list_(pa.float64())),
            }
        )
        return table.replace_schema_metadata({"classes": json.dumps(list(classes))})

    def dedupe(self) -> "Predictions":
        """One row per key (the first seen), sorted by key so the result is order-independent."""
        first: dict[str, int] = {}
        for i, key in enumerate(self.keys):
            first.setdefault(key, i)
        order = [first[k] for k in sorted(first)]
        return Predictions(
            keys=[self.keys[i] for i in order],
            labels=self.labels[order],
            preds=self.preds[order],
            probs=self.probs[order],
            alpha=self.alpha[order],
        )


@torch.no_grad()
def collect(model: SCNModel, loader: Iterable[dict], device: torch.device | str = "cpu") -> Predictions:
    """Run the model in eval mode over a loader of shard batches."""
    was_training = model.training
    model.eval()
    parts = []
    for batch in loader:
        out = model(batch["image"].to(device, non_blocking=True))
        parts.append(
            Predictions(
                keys=list(batch["key"]),
                labels=np.asarray(batch["label"]),
                preds=out.logits.argmax(1).cpu().numpy(),
                probs=out.logits.float().softmax(1).cpu().numpy(),
                alpha=out.alpha.float().cpu().numpy(),
            )
        )
    model.train(was_training)
    return Predictions.concat(parts)


def summarize(pred: Predictions, classes: Sequence[str], noisy_keys: set[str] | None = None) -> dict:
    """Accuracy, mean class accuracy, per-class accuracy, confusion matrix and alpha statistics."""
    n = len(classes)
    confusion = metrics.confusion_matrix(pred.preds, pred.labels, n)
    noisy = None if noisy_keys is None else np.array([k in noisy_keys for k in pred.keys])
    return {
        "samples": len(pred),
        "accuracy": metrics.accuracy(pred.preds, pred.labels),
        "mean_class_accuracy": metrics.mean_class_accuracy(pred.preds, pred.labels, n),
        "per_class_accuracy": {
            c: None if np.isnan(v) else float(v)  # None: the class has no sample here
            for c, v in zip(classes, metrics.per_class_accuracy(pred.preds, pred.labels, n))
        },
        "confusion_matrix": confusion.tolist(),
        "classes": list(classes),
        "alpha": metrics.alpha_stats(pred.alpha, noisy),
    }


def epoch_predictions_url(run: str, epoch: int) -> str:
    """Where a training run keeps epoch `epoch`'s validation predictions (rank 0 writes them).

    Kept so that two runs scored on one validation set can be compared sample by sample
    (`metrics.paired_accuracy_gap`), which a pair of accuracies cannot.
    """
    return join(run.rstrip("/"), f"{PREDICTIONS_DIR}/epoch_{epoch:04d}.parquet")


def write_epoch_predictions(run: str, epoch: int, pred: Predictions, classes: Sequence[str]) -> str:
    url = epoch_predictions_url(run, epoch)
    metrics.write_run_table(url, pred.to_table(classes))
    return url


def paired_gap(a: str, b: str) -> tuple[float, float]:
    """Accuracy of predictions file `a` minus that of `b` (either `to_table`'s layout: an evaluation's
    predictions.parquet, a run's epoch predictions) on the same samples, and its paired 95% half-width
    (`metrics.paired_accuracy_gap`). ValueError when the two files scored different samples."""
    correct = []
    for url in (a, b):
        table = pq.read_table(url, columns=["key", "label", "pred"]).to_pydict()
        correct.append(dict(zip(table["key"], np.array(table["pred"]) == np.array(table["label"]))))
    if set(correct[0]) != set(correct[1]):
        raise ValueError(f"{a} and {b} scored different samples: no paired comparison")
    keys = sorted(correct[0])
    return metrics.paired_accuracy_gap([correct[0][k] for k in keys], [correct[1][k] for k in keys])
