"""Training reads compared: the shard reader, loose files (torchvision ImageFolder) and webdataset's `wids`.

The three read the same 112x112 JPEG faces into the same augmented tensors (the
training transform), with the same batch size and loader workers, in one process run,
so ratios are independent of the machine. The shard set is written class by class, the
hard case for any reader of shards. For each reader: images/s, how well its batches mix
the classes (distinct classes per batch, top-class share), its peak Python memory over
one epoch read in-process (tracemalloc: the shuffle buffer and open shards, not the
decoded batch), and how many sample reads an epoch makes per sample.

- ImageFolder: one file per image, an exact global shuffle (RandomSampler): the reference.
- scn-scale's reader (`scn_scale.data.shard_loader`): pieces of shards dealt stratified,
  interleaved, through a buffer of undecoded samples; streams tars, so it reads object stores.
- wids (`wids.ShardListDataset`): random access into memory-mapped local tars by index, an
  exact global shuffle; remote shards are first copied whole into a local cache.

    python bench/shard_read.py [--images 3000] [--batch 64] [--workers 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from crawler.synthetic import CorpusConfig, generate_corpus
from scn_scale.data import decode_rgb, shard_loader, train_transform
from shards import CANONICAL, Sample, ShardWriter, key_from_bytes, open_shard_set

SIZE = 112


def build_inputs(root: Path, images: int) -> tuple[Path, Path]:
    """A loose-file class-folder tree and a shard set of the same images, written class by class."""
    folder = root / "folder"
    generate_corpus(CorpusConfig(out=str(folder), per_class=images // len(CANONICAL), seed=0))
    with open(folder / "corpus.csv") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: CANONICAL.index(r["class"]))
    shard_dir = root / "shards"
    with ShardWriter(shard_dir, CANONICAL, max_samples=1000) as writer:
        for row in rows:
            data = (folder / row["file"]).read_bytes()
            writer.write(Sample(key=key_from_bytes(data), image=data, label=CANONICAL.index(row["class"])))
    return folder, shard_dir


class WidsSamples(torch.utils.data.Dataset):
    """wids' random-access dataset over the set's tars, decoded and augmented as the trainer does."""

    def __init__(self, shard_dir: Path) -> None:
        import wids

        shard_set = open_shard_set(str(shard_dir))
        shards = [{"url": str(shard_dir / Path(u).name), "nsamples": n} for u, n in zip(shard_set.shards, shard_set.sizes)]
        self.data = wids.ShardListDataset(shards, localname=lambda url: url, transformations=[])
        self.transform = train_transform(SIZE)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.data[index]
        return self.transform(decode_rgb(sample[".jpg"].getvalue())), int(sample[".cls"].getvalue())


def _images_and_labels(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return (batch["image"], batch["label"]) if isinstance(batch, dict) else (batch[0], batch[1])


def run_epoch(loader: Iterable, name: str) -> tuple[float, float, float, int]:
    """(images/s, distinct classes per batch, top-class share per batch, samples read) over one epoch."""
    count, distinct, top, start = 0, [], [], time.perf_counter()
    for batch in tqdm(loader, desc=name, unit="batch", leave=False):
        images, labels = _images_and_labels(batch)
        count += images.shape[0]
        classes = Counter(labels.tolist())
        distinct.append(len(classes))
        top.append(max(classes.values()) / images.shape[0])
    return count / (time.perf_counter() - start), sum(distinct) / len(distinct), sum(top) / len(top), count


def peak_memory(make_loader: Callable[[int], Iterable]) -> int:
    """Peak bytes Python allocated while reading one epoch in the calling process (no loader workers)."""
    tracemalloc.start()
    for _ in make_loader(0):
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="best of N epochs for each reader")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder, shard_dir = build_inputs(Path(tmp), args.images)
        shard_set = open_shard_set(str(shard_dir))
        files = ImageFolder(str(folder), transform=train_transform(SIZE))
        widsset = WidsSamples(shard_dir)

        def loose(workers: int) -> Iterable:
            return torch.utils.data.DataLoader(files, batch_size=args.batch, shuffle=True, num_workers=workers)

        def shards(workers: int) -> Iterable:
            return shard_loader(shard_set, train=True, image_size=SIZE, batch_size=args.batch, loader_workers=workers)

        def indexed(workers: int) -> Iterable:
            return torch.utils.data.DataLoader(widsset, batch_size=args.batch, shuffle=True, num_workers=workers)

        readers = {"ImageFolder": loose, "scn-scale shards": shards, "wids": indexed}
        runs: dict[str, list[tuple[float, float, float, int]]] = {name: [] for name in readers}
        for _ in range(args.repeats):  # interleaved, so a busy moment hurts every reader alike
            for name, make in readers.items():
                runs[name].append(run_epoch(make(args.workers), name))
        memory = {name: peak_memory(make) for name, make in readers.items()}
    samples = len(files)
    print(f"images: {samples} (class-sorted shards of 1000)  batch: {args.batch}  loader workers: {args.workers}")
    print(f"{'reader':<18}{'images/s':>10}{'ratio':>8}{'classes/batch':>15}{'top class':>11}{'peak MiB':>10}{'reads/sample':>14}")
    reference = max(r[0] for r in runs["ImageFolder"])
    for name, results in runs.items():
        rate = max(r[0] for r in results)
        _, distinct, top, count = results[0]
        print(f"{name:<18}{rate:>10.1f}{rate / reference:>8.2f}{distinct:>15.2f}{top:>11.2f}"
              f"{memory[name] / 2**20:>10.1f}{count / samples:>14.2f}")
    print(f"ratio {max(r[0] for r in runs['scn-scale shards']) / reference:.2f} "
          "(scn-scale shards / ImageFolder, images/s; target >= 1.0)")


if __name__ == "__main__":
    main()
