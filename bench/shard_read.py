"""Read-and-decode throughput: the shard reader against loose files through torchvision's ImageFolder.

Both paths decode the same 112x112 JPEG faces to the same normalised tensors, with the
same batch size and one loader worker, in one process run, so the ratio is independent
of the machine. Each side uses its production decoder: the reader libjpeg-turbo through
torchvision.io, ImageFolder Pillow.

    python bench/shard_read.py [--images 3000] [--batch 64] [--workers 1]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import torch
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from crawler.synthetic import CorpusConfig, generate_corpus
from scn_scale.data import eval_transform, shard_loader
from shards import CANONICAL, Sample, ShardWriter, key_from_bytes, open_shard_set


def build_inputs(root: Path, images: int) -> tuple[Path, Path]:
    """A loose-file class-folder tree and a shard set holding the same images."""
    folder = root / "folder"
    generate_corpus(CorpusConfig(out=str(folder), per_class=images // len(CANONICAL), seed=0))
    shard_dir = root / "shards"
    with ShardWriter(shard_dir, CANONICAL, max_samples=500) as writer, open(folder / "corpus.csv") as f:
        for row in csv.DictReader(f):
            data = (folder / row["file"]).read_bytes()
            writer.write(Sample(key=key_from_bytes(data), image=data, label=CANONICAL.index(row["class"])))
    return folder, shard_dir


def images_per_second(loader: torch.utils.data.DataLoader, name: str) -> float:
    count, start = 0, time.perf_counter()
    for batch in tqdm(loader, desc=name, unit="batch", leave=False):
        images = batch["image"] if isinstance(batch, dict) else batch[0]
        count += images.shape[0]
    return count / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="best of N passes for each path")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    transform = eval_transform(112)
    with tempfile.TemporaryDirectory() as tmp:
        folder, shard_dir = build_inputs(Path(tmp), args.images)
        files = ImageFolder(str(folder), transform=transform)
        shard_set = open_shard_set(str(shard_dir))
        loose = torch.utils.data.DataLoader(files, batch_size=args.batch, num_workers=args.workers)
        reader_rates, folder_rates = [], []
        for _ in range(args.repeats):  # interleaved, so a busy moment hurts both sides alike
            reader = shard_loader(shard_set, train=False, image_size=112, batch_size=args.batch,
                                  loader_workers=args.workers)
            reader_rates.append(images_per_second(reader, "shards"))
            folder_rates.append(images_per_second(loose, "ImageFolder"))
        reader_rate, folder_rate = max(reader_rates), max(folder_rates)
    print(f"images: {len(files)}  batch: {args.batch}  loader workers: {args.workers}")
    print(f"shard reader   {reader_rate:8.1f} images/s")
    print(f"ImageFolder    {folder_rate:8.1f} images/s")
    print(f"ratio          {reader_rate / folder_rate:8.2f}  (target >= 1.0)")


if __name__ == "__main__":
    main()
