"""SCN's relabel rule in a bare single-process loop: the released rule against `scn.relabel_confirm`.

The trainer's reference, outside Ray and DeepSpeed: a plain PyTorch loop over in-memory
images, with the project's SCN model, loss and relabel proposals (scn_scale.model, .loss,
.relabel), the trainer's augmentation (scn_scale.data) and the synthetic-noise protocol
(scn_scale.noise), relabels applied at each epoch end as the trainer applies them. For each
rule it runs the same seed, so both are the same run until relabeling starts, and prints per
epoch the labels restored (wrong -> true), broken (true -> wrong) and moved (wrong -> other
wrong), the wrong labels left, the test accuracy and alpha's AUC for telling the mislabeled
samples; then the last epoch side by side, the accuracy gap paired on the test samples.

    python bench/relabel_rule.py                  # held-out real photographs, 30% noise, seed 0
    python bench/relabel_rule.py --rate 0 --rules 1,2

The data are the `real` preset of bench/noise_robustness.py (crops of scikit-image's sample
photographs, test crops from a band of each photograph no training crop touches). The last
line starts with `ratio`: wrong training labels left at the end under the released rule over
those under the first other rule.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from noise_robustness import PRESETS, real_image_sets
from scn_scale import sync
from scn_scale.config import SCNConfig
from scn_scale.data import decode_rgb, eval_transform, train_transform
from scn_scale.loss import scn_loss
from scn_scale.metrics import alpha_auc, paired_accuracy_gap
from scn_scale.model import SCNModel
from scn_scale.noise import make_noise
from scn_scale.relabel import propose_relabels
from scn_scale.relabel_table import RelabelTable, SampleIndex
from shards import open_shard_set
from shards.sample import IMAGE_EXTENSIONS


def load_set(url: str) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Keys, uint8 images [N, 3, H, W] and labels of a (small) shard set, in shard order."""
    keys, images, labels = [], [], []
    for shard in open_shard_set(url).shards:
        for sample in wds.WebDataset(shard, shardshuffle=False, empty_check=False):
            keys.append(sample["__key__"])
            images.append(decode_rgb(next(sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample)))
            labels.append(int(sample["cls"]))
    return keys, torch.stack(images), torch.tensor(labels)


def run(rule: int, args: argparse.Namespace, train: tuple, test: tuple, given: torch.Tensor) -> dict:
    """One training run under `scn.relabel_confirm = rule`; per-epoch flow and the last epoch's test correctness."""
    keys, images, truth = train
    test_images, test_labels = test
    index, _ = SampleIndex.build(keys)
    rows = torch.from_numpy(index.lookup(keys))
    cfg = SCNConfig(delta1=args.delta1, delta2=args.delta2, relabel_epoch=args.relabel_epoch, relabel_confirm=rule)
    torch.manual_seed(args.seed)
    model = SCNModel(len(set(truth.tolist())) if args.classes == 0 else args.classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.9)
    augment, plain = train_transform(args.image_size), eval_transform(args.image_size)
    test_inputs = torch.stack([plain(x) for x in test_images])
    table, order = RelabelTable(index), torch.Generator().manual_seed(args.seed)
    noisy_by_row = torch.zeros(len(keys), dtype=torch.bool)
    noisy_by_row[rows] = given != truth
    history = []
    for epoch in range(1, args.epochs + 1):
        started = time.monotonic()
        model.train()
        before = table.labels_at(rows.numpy(), given)  # the labels this epoch trains on
        samples, perm = sync.EpochSamples(epoch), torch.randperm(len(keys), generator=order)
        for start in range(0, len(keys) - args.batch_size + 1, args.batch_size):
            batch = perm[start:start + args.batch_size]
            out = model(torch.stack([augment(images[i]) for i in batch]))
            loss = scn_loss(out, before[batch], cfg).total
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            proposals = propose_relabels([keys[i] for i in batch], before[batch], out, epoch, cfg)
            samples.add(rows[batch].numpy(), out.alpha, proposals)
        schedule.step()
        end = sync.end_epoch(table, samples, noisy_by_row, rule)  # the trainer's epoch end, one process
        after = table.labels_at(rows.numpy(), given)
        changed = before != after
        model.eval()
        with torch.no_grad():
            preds = torch.cat([model.predict(test_inputs[i:i + 256]).argmax(1) for i in range(0, len(test_inputs), 256)])
        auc = alpha_auc(end.sample_alpha, noisy_by_row[end.rows].numpy()) if noisy_by_row.any() else None
        line = {
            "rule": rule, "epoch": epoch, "test_accuracy": float((preds == test_labels).float().mean()),
            "restored": int((changed & (after == truth)).sum()),
            "broken": int((changed & (before == truth)).sum()),
            "moved": int((changed & (before != truth) & (after != truth)).sum()),
            "wrong_left": int((after != truth).sum()),
            "alpha_auc": None if auc is None else round(auc[0], 4), "seconds": round(time.monotonic() - started, 1),
        }
        print(json.dumps(line), flush=True)
        history.append(line)
    return {"history": history, "correct": (preds == test_labels).numpy()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=0.3, help="symmetric noise rate (scn_scale.noise)")
    parser.add_argument("--rules", default="1,2", help="relabel_confirm values to compare; 1 (the released rule) first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--relabel-epoch", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--delta1", type=float, default=0.07)
    parser.add_argument("--delta2", type=float, default=0.2)
    parser.add_argument("--classes", type=int, default=0, help="number of classes (default: those in the set)")
    parser.add_argument("--per-class", default=",".join(map(str, PRESETS["real"].real_per_class)),
                        help="training and test crops per class (TRAIN,TEST)")
    parser.add_argument("--out", default="bench-out/relabel_rule", help="where the image sets and results.json go")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    train_n, test_n = (int(n) for n in args.per_class.split(","))
    sets = real_image_sets(out, (train_n, test_n))
    keys, images, truth = load_set(sets["train"])
    _, test_images, test_labels = load_set(sets["test"])
    noise = make_noise(keys, truth.tolist(), int(truth.max()) + 1, rate=args.rate, seed=args.seed).to_pydict()
    given = truth.clone()
    position = {k: i for i, k in enumerate(keys)}
    for key, label in zip(noise["key"], noise["label"]):
        given[position[key]] = label
    rules = [int(r) for r in args.rules.split(",")]
    results = {rule: run(rule, args, (keys, images, truth), (test_images, test_labels), given) for rule in rules}
    print(f"\n{args.rate:.0%} symmetric noise, seed {args.seed}, {len(keys)} training and {len(test_labels)} test images")
    print("| relabel_confirm | last-epoch test accuracy | - rule 1 (paired 95%) | restored | broken | moved | wrong left |")
    print("|---|---|---|---|---|---|---|")
    for rule, result in results.items():
        h = result["history"]
        gap = paired_accuracy_gap(result["correct"], results[rules[0]]["correct"])
        print(f"| {rule} | {h[-1]['test_accuracy']:.1%} | {100 * gap[0]:+.1f} (±{100 * gap[1]:.1f}) | "
              f"{sum(x['restored'] for x in h)} | {sum(x['broken'] for x in h)} | {sum(x['moved'] for x in h)} | {h[-1]['wrong_left']} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({str(r): v["history"] for r, v in results.items()}, indent=1))
    first, other = results[rules[0]]["history"][-1], results[rules[-1]]["history"][-1]
    print(f"ratio {first['wrong_left'] / max(other['wrong_left'], 1):.2f} (wrong training labels left at the end: "
          f"relabel_confirm={rules[0]} / relabel_confirm={rules[-1]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
