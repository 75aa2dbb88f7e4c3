"""The training augmentation against the released SCN code's (src/image_utils.py, src/train.py)."""

from __future__ import annotations

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from scn_scale.data import NOISE_VARIANCE, pixel_noise, train_transform


def _released_add_gaussian_noise(image_array: np.ndarray, rng: np.random.Generator, mean: float = 0.0, var: float = 30) -> np.ndarray:
    """image_utils.add_gaussian_noise as released, with its NumPy draw given a generator."""
    std = var**0.5
    noisy_img = image_array + rng.normal(mean, std, image_array.shape)
    return np.clip(noisy_img, 0, 255).astype(np.uint8)


def test_pixel_noise_is_the_released_codes_on_the_0_255_scale() -> None:
    torch.manual_seed(0)
    image = torch.randint(20, 236, (3, 100, 100), dtype=torch.uint8)  # a RAF-DB-sized crop, away from the clip
    ours = torch.stack([pixel_noise(tv_tensors.Image(image)) for _ in range(20)]).float() - image.float()
    theirs = np.stack([_released_add_gaussian_noise(image.permute(1, 2, 0).numpy(), np.random.default_rng(i))
                       for i in range(20)]).astype(float) - image.permute(1, 2, 0).numpy()
    for diff in (ours.numpy(), theirs):
        # Truncation to uint8 moves the mean half a grey level down and adds 1/12 to the variance.
        assert abs(diff.mean() + 0.5) < 0.05 and abs(diff.var() - (NOISE_VARIANCE + 1 / 12)) < 0.5
    assert abs(ours.std().item() / 255 - 0.0215) < 0.0005  # sigma on [0, 1]
    edge = pixel_noise(torch.tensor([[[0, 255]]], dtype=torch.uint8).expand(3, 400, 2).contiguous())
    assert edge.dtype == torch.uint8 and int(edge[..., 0].max()) > 0 and int(edge[..., 1].min()) < 255  # clipped, not wrapped


def test_noise_and_flip_come_before_the_resize_as_in_the_released_code() -> None:
    steps = train_transform(64).transforms
    choice = next(i for i, t in enumerate(steps) if isinstance(t, v2.RandomApply))
    resize = next(i for i, t in enumerate(steps) if isinstance(t, v2.Resize))
    assert choice < resize
    (options,) = steps[choice].transforms
    assert isinstance(options.transforms[0], v2.RandomHorizontalFlip) and options.transforms[1] is pixel_noise
    out = train_transform(64)(torch.randint(0, 256, (3, 100, 100), dtype=torch.uint8))
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
