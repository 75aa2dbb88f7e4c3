"""The face stage: an upright RGB photo in, aligned face crops out (one per kept face).

    stage = FaceStage(FaceConfig(mode="mtcnn", crop_size=112))
    faces = stage(image)            # list[Face(crop, box, landmarks, score)]
    result = stage.detect(image)    # FaceResult: faces plus why the others were dropped

Modes:
- `mtcnn` (default; the detector the FER literature uses): boxes, scores and five
  landmarks; each face is aligned by a similarity transform of its landmarks onto the
  template (`crawler.align`). Needs facenet-pytorch (its weights ship in the wheel).
- `haar` (light, OpenCV's frontal-face cascade): boxes only, no landmarks and no score
  (score 1.0). The face is aligned *by its box*: five points placed at fixed fractions
  of the box (measured against MTCNN landmarks on the sample photos, symmetrised) go
  through the same transform, so the crop has the same scale and placement as an
  MTCNN crop but no roll correction. `Face.landmarks` is None.
- `none`: for sources that are already aligned; the image's centre square, resized to
  the crop size, is the one face.

The photo is downscaled so its longer side is at most `detect_max_side` before
detection (MTCNN's cost grows with the pixel count); boxes and landmarks are mapped
back to the original image, and crops are cut from the original, so nothing is lost
but detection time. Boxes, landmarks and `min_face_size` are in original-image pixels.

This stage is also the inference command's (`scn_scale.predict`) way to align raw
photos, so it is a plain library API with no crawler state.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
from PIL import Image

from crawler.align import align, similarity_transform, template, warp

log = logging.getLogger(__name__)

Mode = Literal["mtcnn", "haar", "none"]
MODES = ("mtcnn", "haar", "none")

MTCNN_INSTALL = "pip install --no-deps facenet-pytorch==2.6.0"
HAAR_INSTALL = "pip install 'opencv-python-headless<5'"

#: Where the five template points sit inside an OpenCV frontal-face box, as fractions of its side.
HAAR_POINTS = np.array([(0.30, 0.37), (0.70, 0.37), (0.50, 0.60), (0.33, 0.80), (0.67, 0.80)])


@dataclass(frozen=True)
class FaceConfig:
    mode: Mode = "mtcnn"
    crop_size: int = 112
    #: The photo's longer side is brought down to this before detection.
    detect_max_side: int = 640
    #: Smallest kept face: the shorter side of its box, in original-image pixels.
    min_face_size: int = 40
    #: Smallest kept detector score (MTCNN's face probability; Haar faces score 1.0).
    min_score: float = 0.9
    #: At most this many faces per photo, highest score first (0: no limit).
    max_faces: int = 5
    #: Variance of the Laplacian of the grey crop below which a face is dropped as blurred (0: off).
    min_sharpness: float = 0.0
    mtcnn_thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    mtcnn_factor: float = 0.709
    haar_cascade: str = "haarcascade_frontalface_default.xml"
    haar_min_neighbors: int = 5

    def validate(self) -> "FaceConfig":
        if self.mode not in MODES:
            raise ValueError(f"face mode {self.mode!r}: choose one of {MODES}")
        if self.crop_size < 16:
            raise ValueError(f"crop_size must be at least 16, got {self.crop_size}")
        if self.detect_max_side < 64:
            raise ValueError(f"detect_max_side must be at least 64, got {self.detect_max_side}")
        if self.min_face_size < 0 or self.max_faces < 0 or self.min_sharpness < 0:
            raise ValueError("min_face_size, max_faces and min_sharpness must be >= 0")
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"min_score must be within [0, 1], got {self.min_score}")
        return self


@dataclass
class Face:
    crop: Image.Image
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in the original image
    landmarks: list[tuple[float, float]] | None  # five (x, y) in the original image; None for haar/none
    score: float
    sharpness: float | None = None
    #: The 2x3 matrix mapping original-image coordinates into the crop.
    matrix: list[list[float]] | None = None


@dataclass
class FaceResult:
    status: str  # "ok", "no_face" (nothing detected) or "face_filtered" (all detections dropped)
    faces: list[Face] = field(default_factory=list)
    found: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count: too_small, low_score, blurred, over_max


class FaceDetector(Protocol):
    def __call__(self, image: Image.Image) -> list[tuple[np.ndarray, np.ndarray | None, float]]:
        """(box x1y1x2y2, five landmarks or None, score) per detection, in `image` coordinates."""


class _MTCNN:
    """facenet-pytorch's MTCNN networks, weights loaded with `weights_only=True` by us."""

    def __init__(self, cfg: FaceConfig) -> None:
        try:
            import facenet_pytorch
            import torch
            from facenet_pytorch.models.mtcnn import ONet, PNet, RNet
            from facenet_pytorch.models.utils.detect_face import detect_face
        except ImportError as exc:
            raise ImportError(f"face mode 'mtcnn' needs facenet-pytorch: {MTCNN_INSTALL} ({exc})") from exc
        data = os.path.join(os.path.dirname(facenet_pytorch.__file__), "data")
        nets = []
        for cls, name in ((PNet, "pnet"), (RNet, "rnet"), (ONet, "onet")):
            net = cls(pretrained=False)  # its own loader calls torch.load without weights_only
            net.load_state_dict(torch.load(os.path.join(data, f"{name}.pt"), map_location="cpu", weights_only=True))
            net.eval()
            nets.append(net)
        self._nets = nets
        self._detect_face = detect_face
        self._torch = torch
        self.cfg = cfg

    def __call__(self, image: Image.Image, min_size: float):
        min_size = max(12.0, min_size)
        if min(image.size) < min_size:  # no pyramid level fits: nothing to find (and detect_face would fail)
            return []
        with self._torch.inference_mode():
            boxes, points = self._detect_face(
                image, min_size, *self._nets, list(self.cfg.mtcnn_thresholds), self.cfg.mtcnn_factor,
                self._torch.device("cpu"),
            )
        # facenet-pytorch returns object-dtype arrays under numpy 2: cast them.
        boxes = np.asarray(boxes[0], dtype=np.float64).reshape(-1, 5)
        points = np.asarray(points[0], dtype=np.float64).reshape(-1, 5, 2)
        return [(b[:4], p, float(b[4])) for b, p in zip(boxes, points)]


class _Haar:
    def __init__(self, cfg: FaceConfig) -> None:
        try:
            import cv2
        except ImportError as exc:
            raise ImportError(f"face mode 'haar' needs OpenCV 4.x: {HAAR_INSTALL} ({exc})") from exc
        if not hasattr(cv2, "CascadeClassifier") or not hasattr(cv2, "data"):
            raise ImportError(f"this OpenCV ({cv2.__version__}) has no Haar cascades (5.x dropped them): {HAAR_INSTALL}")
        path = os.path.join(cv2.data.haarcascades, cfg.haar_cascade)
        self._cascade = cv2.CascadeClassifier(path)
        if self._cascade.empty():
            raise FileNotFoundError(f"cannot load the Haar cascade {path}")
        self._cv2 = cv2
        self.cfg = cfg

    def __call__(self, image: Image.Image, min_size: float):
        grey = np.asarray(image.convert("L"))
        side = max(1, int(min_size))
        rects = self._cascade.detectMultiScale(grey, 1.1, self.cfg.haar_min_neighbors, minSize=(side, side))
        return [(np.array([x, y, x + w, y + h], dtype=np.float64), None, 1.0) for x, y, w, h in rects]


def sharpness(crop: Image.Image) -> float:
    """Variance of the 4-neighbour Laplacian of the grey crop: low for blurred faces."""
    g = np.asarray(crop.convert("L"), dtype=np.float32)
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4 * g[1:-1, 1:-1]
    return float(lap.var())


class FaceStage:
    """Detect, filter and align faces; the detector is built on first use (the stage pickles small)."""

    def __init__(self, config: FaceConfig | None = None) -> None:
        self.config = (config or FaceConfig()).validate()
        self._detector = None

    def __getstate__(self) -> dict:
        return {"config": self.config, "_detector": None}

    def load(self) -> "FaceStage":
        """Build the detector now (it is otherwise built on the first image)."""
        if self._detector is None and self.config.mode != "none":
            self._detector = _MTCNN(self.config) if self.config.mode == "mtcnn" else _Haar(self.config)
        return self

    def __call__(self, image: Image.Image) -> list[Face]:
        return self.detect(image).faces

    def detect(self, image: Image.Image) -> FaceResult:
        cfg = self.config
        if image.mode != "RGB":
            image = image.convert("RGB")
        if cfg.mode == "none":
            return FaceResult("ok", [self._center_face(image)], found=1)
        self.load()
        scale = min(1.0, cfg.detect_max_side / max(image.size))
        small = image
        if scale < 1.0:
            small = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.Resampling.BILINEAR, reducing_gap=2.0)
            scale_x, scale_y = small.width / image.width, small.height / image.height
        else:
            scale_x = scale_y = 1.0
        detections = self._detector(small, cfg.min_face_size * min(scale_x, scale_y))  # type: ignore[misc]
        rejected: Counter = Counter()
        kept = []
        for box, points, score in detections:
            box = box / [scale_x, scale_y, scale_x, scale_y]
            if points is not None:
                points = points / [scale_x, scale_y]
            if min(box[2] - box[0], box[3] - box[1]) < cfg.min_face_size:
                rejected["too_small"] += 1
            elif score < cfg.min_score:
                rejected["low_score"] += 1
            else:
                kept.append((box, points, score))
        # Highest score first, then left to right, then top to bottom: a stable face order.
        kept.sort(key=lambda d: (-round(d[2], 6), round(d[0][0], 1), round(d[0][1], 1)))
        if cfg.max_faces and len(kept) > cfg.max_faces:
            rejected["over_max"] += len(kept) - cfg.max_faces
            kept = kept[: cfg.max_faces]
        faces = []
        for box, points, score in kept:
            face = self._aligned(image, box, points, score)
            if cfg.min_sharpness and face.sharpness is not None and face.sharpness < cfg.min_sharpness:
                rejected["blurred"] += 1
                continue
            faces.append(face)
        status = "ok" if faces else ("no_face" if not detections else "face_filtered")
        return FaceResult(status, faces, found=len(detections), rejected=dict(rejected))

    def _aligned(self, image: Image.Image, box: np.ndarray, points: np.ndarray | None, score: float) -> Face:
        size = self.config.crop_size
        if points is not None:
            crop, matrix = align(image, points, size)
        else:
            side = np.array([box[2] - box[0], box[3] - box[1]])
            pseudo = box[:2] + HAAR_POINTS * side
            matrix = similarity_transform(pseudo, template(size))
            crop = warp(image, matrix, size)
        return Face(
            crop=crop,
            box=tuple(round(float(v), 2) for v in box),  # type: ignore[arg-type]
            landmarks=None if points is None else [(round(float(x), 2), round(float(y), 2)) for x, y in points],
            score=round(float(score), 6),
            sharpness=round(sharpness(crop), 3),
            matrix=[[round(float(v), 6) for v in row] for row in matrix],
        )

    def _center_face(self, image: Image.Image) -> Face:
        size = self.config.crop_size
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        crop = image.crop((left, top, left + side, top + side))
        if side != size:
            crop = crop.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
        box = (float(left), float(top), float(left + side), float(top + side))
        return Face(crop=crop, box=box, landmarks=None, score=1.0, sharpness=None)
