"""Training throughput: `scn_scale.train` (one worker) against a plain PyTorch loop, same model, batch and images.

The plain loop is the ceiling: the images are decoded and augmented once, up front, and held
as tensors; a bare SCNModel, the same torch optimizer and the SCN loss, nothing else. The
trainer reads the same images from shards, decodes and augments them in loader workers,
looks labels up in the relabel table, runs the step through Ray Train and DeepSpeed and
keeps its metrics. Both are timed over a full epoch after a warm-up epoch; the trainer's
figure is its own `images_per_s` (training steps only, not validation or checkpoints).
Target: ratio >= 0.85.

    python bench/train_throughput.py                                   # CPU: 112 px, batch 32, 1 thread
    python bench/train_throughput.py --gpu --cpus 16 --image-size 224 --batch-size 256 --precision bf16 \
        --channels-last --loader-workers 12 --samples 65536 --deepspeed cluster/deepspeed/zero1-bf16.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from pathlib import Path

import numpy as np
import ray
import torch
from PIL import Image

from scn_scale.config import SCNConfig, TrainConfig
from scn_scale.data import train_transform
from scn_scale.loop import make_optimizer
from scn_scale.loss import scn_loss
from scn_scale.model import SCNModel
from scn_scale.train import LOCAL_NODE_IP, train
from shards import CANONICAL, Sample, ShardWriter, key_from_bytes

SHARD_SIZE = 64


def write_images(out: Path, n: int, size: int, seed: int) -> list[tuple[bytes, int]]:
    """A shard set of n random tinted JPEGs at the training size; returns (jpeg, label) pairs for the plain loop."""
    rng = np.random.default_rng(seed)
    items = []
    with ShardWriter(out, CANONICAL, max_samples=SHARD_SIZE) as writer:
        for _ in range(n):
            label = int(rng.integers(len(CANONICAL)))
            pixels = rng.integers(0, 64, (size, size, 3)) + np.array([label * 23, 255 - label * 29, label * 11]) // 2
            buf = io.BytesIO()
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
            data = buf.getvalue()
            writer.write(Sample(key=key_from_bytes(data), image=data, label=label, meta={"provider": "bench"}))
            items.append((data, label))
    return items


def trainer_throughput(args: argparse.Namespace, out: Path, run_name: str) -> dict:
    cfg = TrainConfig(
        train_shards=str(out / "train"),
        val_shards=str(out / "val"),
        epochs=args.epochs,
        batch_size=args.batch_size,
        image_size=args.image_size,
        num_workers=1,
        loader_workers=args.loader_workers,
        cpus_per_worker=args.cpus,
        use_gpu=args.gpu,
        precision=args.precision,
        channels_last=args.channels_last,
        deepspeed=args.deepspeed,
        out_dir=str(out / "runs"),
        run_name=run_name,
        max_failures=0,
    )
    ray.init(address="local", num_cpus=args.cpus, num_gpus=1 if args.gpu else 0, include_dashboard=False,
             _node_ip_address=LOCAL_NODE_IP, log_to_driver=False)
    try:
        result = train(cfg)
    finally:
        ray.shutdown()
    last = result.metrics[-1]
    return {
        "images_per_s": last["images_per_s"],
        "images_per_s_by_epoch": [m["images_per_s"] for m in result.metrics],
        "data_time_s": last["data_time_s"][0],
        "compute_time_s": last["compute_time_s"][0],
        "samples": last["train_samples"],
    }


class PlainLoop:
    """The ceiling: the same model, optimizer, loss and batch on images decoded and augmented before the
    clock starts, held on the training device (a pool of at most --plain-pool images, cycled)."""

    def __init__(self, args: argparse.Namespace, items: list[tuple[bytes, int]]) -> None:
        self.args = args
        self.device = torch.device("cuda" if args.gpu else "cpu")
        self.memory_format = torch.channels_last if args.channels_last else torch.preserve_format
        transform = train_transform(args.image_size)
        pool = items[: args.plain_pool]
        images = torch.stack([transform(Image.open(io.BytesIO(data)).convert("RGB")) for data, _ in pool])
        self.images = images.to(self.device, memory_format=self.memory_format)
        self.labels = torch.tensor([label for _, label in pool], device=self.device)
        self.model = SCNModel(len(CANONICAL)).to(self.device, memory_format=self.memory_format)
        self.optimizer = make_optimizer(TrainConfig(), self.model)

    def epoch(self, steps: int) -> float:
        """Images/s over `steps` steps."""
        args, scn = self.args, SCNConfig()
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()
        start = time.perf_counter()
        for step in range(steps):
            idx = torch.arange(step * args.batch_size, (step + 1) * args.batch_size, device=self.device) % len(self.labels)
            with autocast:
                out = self.model(self.images[idx])
            y = self.labels[idx]
            self.optimizer.zero_grad(set_to_none=True)
            scn_loss(out, y, scn).total.backward()
            self.optimizer.step()
        if args.gpu:
            torch.cuda.synchronize()
        return steps * args.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512, help="training images (one epoch)")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2, help="the last one is timed")
    parser.add_argument("--loader-workers", type=int, default=1)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--gpu", action="store_true", help="one GPU worker (use_gpu=true)")
    parser.add_argument("--deepspeed", default="", help="DeepSpeed config file for the trainer (default: ZeRO stage 0, fp32)")
    # One compute thread by default: on a small CPU box the loader worker needs a core of its own,
    # and OpenMP threads that spin-wait slow down several-fold when another process shares their core.
    parser.add_argument("--cpus", type=int, default=1, help="CPUs reserved for the worker = torch threads in both loops")
    parser.add_argument("--plain-pool", type=int, default=1024, help="decoded images the plain loop cycles through")
    parser.add_argument("--out", default="bench/out/train_throughput")
    args = parser.parse_args()

    out = Path(args.out).resolve()
    run_name = f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    items = write_images(out / run_name / "train", args.samples, args.image_size, seed=0)
    write_images(out / run_name / "val", args.batch_size, args.image_size, seed=1)
    torch.set_num_threads(args.cpus)

    # The plain loop runs before and after the trainer: on a shared machine the load changes
    # over minutes, and the two figures show by how much.
    steps = -(-args.samples // args.batch_size)
    plain = PlainLoop(args, items)
    for _ in range(args.epochs - 1):
        plain.epoch(steps)  # warm-up, as the trainer's first epoch
    before = plain.epoch(steps)
    trainer = trainer_throughput(args, out / run_name, run_name)
    after = plain.epoch(steps)
    reference = (before + after) / 2
    ratio = trainer["images_per_s"] / reference
    device = torch.cuda.get_device_name() if args.gpu else f"CPU, {args.cpus} threads"
    report = {"device": device, "settings": vars(args), "trainer": trainer,
              "plain": {"before": before, "after": after, "mean": reference}, "ratio": ratio}
    (out / f"{run_name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"device: {device}; {args.image_size} px, batch {args.batch_size}, one epoch timed after {args.epochs - 1} warm-up epoch(s)")
    print(f"scn_scale.train: {trainer['images_per_s']:8.1f} images/s  (data wait {trainer['data_time_s']:.1f} s, compute {trainer['compute_time_s']:.1f} s)")
    print(f"plain PyTorch:   {reference:8.1f} images/s  (before the trainer {before:.1f}, after {after:.1f})")
    print(f"ratio:           {ratio:8.3f}  (target >= 0.85)")


if __name__ == "__main__":
    main()
