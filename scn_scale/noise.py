"""Synthetic label noise, the literature's protocol, as a label-override table for a shard set.

Pick round(rate * N) training samples at random and give each a label drawn uniformly
from the other classes; the table (key, label, true_label) is frozen for the run and
applied by the shard reader (`TrainConfig.label_overrides`), so the shards stay clean
and the ground truth stays at hand for the relabel audit.

Symmetric noise is drawn independently of the image, so no model of the image (SCN's
importance weight is one) can tell a mislabeled sample from it. Web search mislabels the
ambiguous images most; `make_noise(weights=...)` draws the mislabeled samples in
proportion to a weight instead (an image's ambiguity, 1 - its expression intensity for
the synthetic faces), the second protocol of bench/noise_robustness.py.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np
import pyarrow as pa

from shards.atomic import write_parquet
from shards.cli import ArgumentParser, add_log_level, bad_input, configure_logging
from shards.fs import is_dir, join, read_json, read_parquet
from shards.manifest import read_manifest
from shards.writer import STATS_NAME

def make_noise(keys: Sequence[str], labels: Sequence[int], num_classes: int, rate: float, seed: int,
               weights: Sequence[float] | None = None) -> pa.Table:
    """The override table for one draw. Samples are ordered by key first, so the draw depends
    on the set of samples and the seed, not on the order the manifest lists them in.

    With `weights` (>= 0, one per sample) the round(rate * N) samples are drawn without
    replacement in proportion to them (Efraimidis-Spirakis keys u ** (1 / w), as the embedded
    web picks its ambiguous faces): a weight-0 sample is chosen only once no other is left.
    """
    if len(keys) != len(labels):
        raise ValueError(f"{len(keys)} keys for {len(labels)} labels")
    if len(set(keys)) != len(keys):
        raise ValueError("sample keys are not unique")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    if num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got {num_classes}")
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    keys = [keys[i] for i in order]
    true = np.asarray([labels[i] for i in order], dtype=np.int64)
    if true.size and (true.min() < 0 or true.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got range [{true.min()}, {true.max()}]")
    rng = np.random.default_rng(seed)
    k = round(rate * len(keys))
    if weights is None:
        chosen = np.sort(rng.choice(len(keys), size=k, replace=False))
    else:
        w = np.asarray([weights[i] for i in order], dtype=np.float64) if len(weights) == len(order) else None
        if w is None or not np.all(np.isfinite(w)) or (w < 0).any():
            raise ValueError(f"weights must be {len(order)} finite values >= 0, one per sample")
        u = rng.uniform(size=len(keys))
        # log(u ** (1 / w)), largest first; the weight-0 samples last, in random order among themselves.
        priority = np.full(len(keys), -np.inf)
        priority[w > 0] = np.log(u[w > 0]) / w[w > 0]
        chosen = np.sort(np.lexsort((-u, -priority))[:k])
    # An offset in [1, C-1] added modulo C is uniform over the C-1 other classes.
    noisy = (true[chosen] + rng.integers(1, num_classes, size=chosen.size)) % num_classes
    return pa.table(
        {
            "key": pa.array([keys[i] for i in chosen], pa.string()),
            "label": pa.array(noisy, pa.int64()),
            "true_label": pa.array(true[chosen], pa.int64()),
        }
    )


def save_overrides(table: pa.Table, path: str) -> None:
    write_parquet(path, table)


def load_overrides(path: str) -> dict[str, int]:
    """key -> the label to train on, for the overridden samples only."""
    data = read_parquet(path, columns=["key", "label"]).to_pydict()
    return dict(zip(data["key"], data["label"]))


def load_ground_truth(path: str) -> dict[str, int]:
    """key -> the true label, for the overridden samples only (the others' truth is their manifest label)."""
    data = read_parquet(path, columns=["key", "true_label"]).to_pydict()
    return dict(zip(data["key"], data["true_label"]))


def _read_classes(shards: str) -> list[str]:
    stats = read_json(join(shards.rstrip("/"), STATS_NAME))
    if not isinstance(stats, dict) or not isinstance(stats.get("classes"), list):
        raise ValueError(f"{join(shards.rstrip('/'), STATS_NAME)}: holds no class list")
    return list(stats["classes"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m scn_scale.noise", description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True, help="shard set directory or URL (its manifest is read)")
    parser.add_argument("--rate", type=float, required=True, help="share of samples to corrupt, e.g. 0.3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="override table to write (parquet; a path or an object-store URL)")
    add_log_level(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_level, "%(levelname)s %(name)s: %(message)s")
    try:
        if not 0.0 <= args.rate <= 1.0:
            raise ValueError(f"--rate must be in [0, 1], got {args.rate}")
        if is_dir(args.out):
            raise ValueError(f"--out {args.out} is a directory; name the parquet file to write")
        classes = _read_classes(args.shards)
        manifest = read_manifest(args.shards, columns=["key", "label"]).to_pydict()
        table = make_noise(manifest["key"], manifest["label"], len(classes), args.rate, args.seed)
        save_overrides(table, args.out)
    except (ValueError, OSError) as exc:  # each names the flag or the file
        return bad_input(exc)

    per_class = Counter(table.column("true_label").to_pylist())
    print(f"{table.num_rows} of {len(manifest['key'])} labels changed (rate {args.rate}, seed {args.seed}) -> {args.out}")
    print("changed per true class:")
    for i, name in enumerate(classes):
        print(f"  {name}: {per_class.get(i, 0)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
