"""Five-point face alignment: a least-squares similarity transform onto the standard template.

The template is the one the face-recognition and FER literature crops to (ArcFace's
112x112: left eye, right eye, nose tip, left and right mouth corner); a crop of
another size uses the template scaled by size/112 (224 = x2). A similarity transform
(rotation, uniform scale, translation; no shear, no reflection) keeps the face's shape.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

#: (x, y) of left eye, right eye, nose, left mouth corner, right mouth corner in a 112x112 crop.
TEMPLATE_112 = np.array(
    [
        (38.2946, 51.6963),
        (73.5318, 51.5014),
        (56.0252, 71.7366),
        (41.5493, 92.3655),
        (70.7299, 92.2041),
    ],
    dtype=np.float64,
)


def template(size: int) -> np.ndarray:
    """The five template points for a `size` x `size` crop."""
    return TEMPLATE_112 * (size / 112.0)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 matrix M minimising sum |M [src;1] - dst|^2 over similarity transforms.

    Written as x' = a x - b y + tx, y' = b x + a y + ty (a = s cos t, b = s sin t), the
    problem is linear in (a, b, tx, ty) and solved directly.
    """
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    if len(src) != len(dst) or len(src) < 2:
        raise ValueError(f"need at least two matching point pairs, got {len(src)} and {len(dst)}")
    x, y = src[:, 0], src[:, 1]
    ones, zeros = np.ones_like(x), np.zeros_like(x)
    rows = np.concatenate([np.stack([x, -y, ones, zeros], 1), np.stack([y, x, zeros, ones], 1)])
    rhs = np.concatenate([dst[:, 0], dst[:, 1]])
    (a, b, tx, ty), *_ = np.linalg.lstsq(rows, rhs, rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return points @ matrix[:, :2].T + matrix[:, 2]


def invert(matrix: np.ndarray) -> np.ndarray:
    full = np.vstack([matrix, [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


def warp(image: Image.Image, matrix: np.ndarray, size: int) -> Image.Image:
    """The `size` x `size` image of `image` under `matrix` (source -> crop coordinates).

    A large face shrunk onto a small crop would alias under plain bilinear sampling, so
    the source region is first cut out and box-reduced by an integer factor.
    """
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    factor = int(1.0 / scale) if scale > 0 else 1
    if factor >= 2:
        corners = apply(invert(matrix), np.array([[0, 0], [size, 0], [0, size], [size, size]]))
        left, top = np.floor(corners.min(0)).astype(int) - factor
        right, bottom = np.ceil(corners.max(0)).astype(int) + factor
        left, top = max(0, left), max(0, top)
        right, bottom = min(image.width, right), min(image.height, bottom)
        if right > left and bottom > top:
            image = image.crop((left, top, right, bottom)).reduce(factor)
            shift = np.array([[factor, 0.0, left], [0.0, factor, top], [0.0, 0.0, 1.0]])  # reduced -> original
            matrix = (np.vstack([matrix, [0.0, 0.0, 1.0]]) @ shift)[:2]
    inverse = invert(matrix)  # PIL asks, for each output pixel, where to sample the input
    return image.transform(
        (size, size), Image.Transform.AFFINE, data=tuple(inverse.reshape(-1)), resample=Image.Resampling.BILINEAR
    )


def align(image: Image.Image, landmarks: np.ndarray, size: int) -> tuple[Image.Image, np.ndarray]:
    """Aligned crop, and the matrix that maps `image` coordinates into it."""
    matrix = similarity_transform(landmarks, template(size))
    return warp(image, matrix, size), matrix
