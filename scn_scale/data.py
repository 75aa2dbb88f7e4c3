"""From shard sets to batches: the recipe's transforms and the per-rank stream.

The augmentation is the released SCN code's RAF-DB recipe (kaiwang960112/Self-Cure-Network,
src/train.py and src/image_utils.py): with probability 0.5 either a horizontal flip or
Gaussian pixel noise, on the stored image before it is resized; then the resize to the input
size, ImageNet normalisation and RandomErasing (scale 0.02-0.25). Decoding and augmentation run in the
loader workers; labels that change during training (the relabel table) are applied
later, in the training process, because workers hold a stale copy of anything captured
when they started.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from shards import ShardSet, ShardStream, make_loader
from shards.reader import DEFAULT_INTERLEAVE, DEFAULT_SHUFFLE_BUFFER

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The released code's pixel noise, `add_gaussian_noise(image, mean=0, var=30)`: variance 30 on the 0-255
#: scale (sigma 5.48 grey levels, 0.0215 on [0, 1]).
NOISE_VARIANCE = 30.0


def decode_rgb(data: bytes) -> torch.Tensor:
    """JPEG/PNG/WebP bytes to a uint8 CHW tensor with libjpeg-turbo: no PIL round trip.

    The decoder returns a channels-last view; made contiguous here, because the transforms
    after it run several times slower on strided tensors (Gaussian noise: 1.9 vs 0.29 ms
    for a 112 px face, measured).
    """
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB).contiguous()


def pixel_noise(image: torch.Tensor) -> torch.Tensor:
    """The released code's noise on a uint8 image: N(0, 30) added on the 0-255 scale, clipped to [0, 255] and
    cast back to uint8, which truncates as its NumPy `astype(np.uint8)` does (a mean shift of -0.5 grey levels).

    It runs on the stored image, before the resize, as there: upsampling (RAF-DB's 100 px crops to 224)
    spreads each pixel's noise over its neighbours, so the same noise after the resize would be finer
    grained (the previous version here drew sigma 0.04 on [0, 1] after the resize, unclipped to uint8).
    """
    noisy = image.float() + torch.randn(image.shape) * NOISE_VARIANCE**0.5
    out = noisy.clamp_(0, 255).to(torch.uint8)
    return tv_tensors.wrap(out, like=image) if isinstance(image, tv_tensors.Image) else out


def train_transform(image_size: int) -> v2.Compose:
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomApply([v2.RandomChoice([v2.RandomHorizontalFlip(p=1.0), pixel_noise])], p=0.5),
            v2.Resize((image_size, image_size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            v2.RandomErasing(scale=(0.02, 0.25)),
        ]
    )


def eval_transform(image_size: int) -> v2.Compose:
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((image_size, image_size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def shard_loader(
    shard_set: ShardSet,
    *,
    train: bool,
    image_size: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    loader_workers: int = 2,
    seed: int = 0,
    epoch: int = 1,
    overrides: Mapping[str, int] | None = None,
    balanced: bool = False,
    labels: np.ndarray | None = None,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    interleave: int = DEFAULT_INTERLEAVE,
    start_batch: int = 0,
) -> torch.utils.data.DataLoader:
    """A loader over this rank's part of the set for one epoch (1-based).

    Training mixes: `interleave` pieces of shards read at once into a buffer of
    `shuffle_buffer` samples (shards.reader); evaluation reads in order and ignores both.
    `balanced` draws every class equally often by the label training uses: `labels`, the
    current label of each manifest row (the trainer's relabel table applied), else the manifest's
    with `overrides` (shards.reader.ShardStream). Either way
    every rank gets the same number of batches, and the caller de-duplicates by key
    where each sample must count once. `start_batch`: the epoch resumed after that many of
    this rank's batches (a mid-epoch checkpoint), the rest exactly as an uninterrupted epoch's.
    """
    stream = ShardStream(
        shard_set,
        rank=rank,
        world_size=world_size,
        loader_workers=loader_workers,
        batch_size=batch_size,
        transform=train_transform(image_size) if train else eval_transform(image_size),
        decode=decode_rgb,
        seed=seed,
        overrides=overrides,
        shuffle_buffer=shuffle_buffer if train else 0,
        interleave=interleave if train else 1,
        balanced=balanced,
        labels=labels,
        start_batch=start_batch,
    )
    stream.set_epoch(epoch)
    return make_loader(stream, pin_memory=torch.cuda.is_available())
