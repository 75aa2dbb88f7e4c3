"""Face detection and alignment on real photos that ship inside packages.

scikit-image's `astronaut` (Eileen Collins, smiling) and `lfw_subset` (100 LFW faces and
100 non-faces, 25x25), matplotlib's `grace_hopper.jpg` (neutral).
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from crawler.align import TEMPLATE_112, apply, similarity_transform, template
from crawler.faces import FaceConfig, FaceStage

pytest.importorskip("facenet_pytorch")


def astronaut() -> Image.Image:
    import skimage.data

    return Image.fromarray(skimage.data.astronaut())


def grace_hopper() -> Image.Image:
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return Image.open(f).convert("RGB")


def lfw(kind: str) -> list[Image.Image]:
    import skimage.data

    images = skimage.data.lfw_subset()  # first 100 faces, then 100 non-faces
    chosen = images[:100] if kind == "faces" else images[100:]
    return [Image.fromarray((im * 255).astype(np.uint8)).convert("RGB").resize((100, 100), Image.Resampling.BICUBIC)
            for im in chosen]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One math thread, as each crawl worker uses: on 2 shared cores more threads only contend."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mtcnn() -> FaceStage:
    return FaceStage(FaceConfig(mode="mtcnn")).load()


def inside(points, width: float, height: float, margin: float = 0.0) -> bool:
    pts = np.asarray(points, dtype=float)
    return bool((pts[:, 0] >= -margin).all() and (pts[:, 0] <= width + margin).all()
                and (pts[:, 1] >= -margin).all() and (pts[:, 1] <= height + margin).all())


@pytest.mark.parametrize("photo", [astronaut, grace_hopper])
def test_mtcnn_finds_and_aligns_the_face(mtcnn: FaceStage, photo, tmp_path) -> None:
    image = photo()
    result = mtcnn.detect(image)
    assert result.status == "ok" and len(result.faces) == 1, result
    face = result.faces[0]
    assert face.score > 0.99
    x1, y1, x2, y2 = face.box
    assert 0 <= x1 < x2 <= image.width and 0 <= y1 < y2 <= image.height
    assert x2 - x1 > 60  # a real face, not a speck
    # The five landmarks lie inside the box (original-image coordinates) ...
    assert inside(face.landmarks, image.width, image.height)
    assert all(x1 - 5 <= x <= x2 + 5 and y1 - 5 <= y <= y2 + 5 for x, y in face.landmarks)
    left_eye, right_eye, nose, left_mouth, right_mouth = face.landmarks
    assert left_eye[0] < right_eye[0] and left_mouth[0] < right_mouth[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])
    # ... and, carried into the crop by the alignment, inside the crop and near the template.
    in_crop = apply(np.array(face.matrix), np.array(face.landmarks))
    assert inside(in_crop, 112, 112)
    assert np.abs(in_crop - TEMPLATE_112).max() < 8.0
    # The aligned crop is written and reads back.
    assert face.crop.size == (112, 112) and face.crop.mode == "RGB"
    path = tmp_path / "crop.jpg"
    face.crop.save(path, quality=95)
    with Image.open(path) as back:
        assert back.size == (112, 112)
    assert np.asarray(face.crop).std() > 20  # a picture, not a blank


def test_crop_224_doubles_the_template(mtcnn: FaceStage) -> None:
    (face,) = FaceStage(FaceConfig(mode="mtcnn", crop_size=224))(astronaut())
    assert face.crop.size == (224, 224)
    in_crop = apply(np.array(face.matrix), np.array(face.landmarks))
    assert np.abs(in_crop - template(224)).max() < 16.0


def test_downscaled_detection_reports_original_coordinates(mtcnn: FaceStage) -> None:
    small = astronaut()
    big = small.resize((2048, 2048), Image.Resampling.BICUBIC)  # detected at 640 px, reported at 2048
    (a,) = mtcnn(small)
    (b,) = mtcnn(big)
    assert np.allclose(np.array(b.box) / 4, a.box, atol=6)
    assert np.allclose(np.array(b.landmarks) / 4, a.landmarks, atol=4)
    assert b.crop.size == (112, 112)


def test_lfw_faces_and_non_faces(mtcnn: FaceStage) -> None:
    stage = FaceStage(FaceConfig(mode="mtcnn", min_face_size=20))
    found = sum(bool(stage(im)) for im in lfw("faces"))
    false = sum(bool(stage(im)) for im in lfw("non-faces"))
    assert found >= 80, found
    assert false <= 10, false


def test_thresholds_filter_and_say_why(mtcnn: FaceStage) -> None:
    image = astronaut()
    too_big = FaceStage(FaceConfig(mode="mtcnn", min_face_size=400)).detect(image)
    assert too_big.status in ("no_face", "face_filtered") and not too_big.faces
    strict = FaceStage(FaceConfig(mode="mtcnn", min_score=1.0)).detect(image)
    assert strict.status == "face_filtered" and strict.rejected.get("low_score", 0) >= 1
    blank = FaceStage(FaceConfig(mode="mtcnn")).detect(Image.new("RGB", (300, 300), (128, 128, 128)))
    assert blank.status == "no_face" and blank.found == 0
    for size in ((1, 1), (10, 30), (39, 400)):  # smaller than the smallest face sought
        assert FaceStage(FaceConfig(mode="mtcnn")).detect(Image.new("RGB", size)).status == "no_face"
    grey = FaceStage(FaceConfig(mode="mtcnn")).detect(astronaut().convert("L"))
    assert grey.status == "ok"


def test_haar_aligns_by_the_box() -> None:
    pytest.importorskip("cv2")
    result = FaceStage(FaceConfig(mode="haar")).detect(astronaut())
    assert result.status == "ok" and len(result.faces) == 1
    face = result.faces[0]
    assert face.landmarks is None and face.score == 1.0
    assert face.crop.size == (112, 112)
    # The box-aligned crop puts the face where MTCNN's landmark-aligned crop puts it.
    (reference,) = FaceStage(FaceConfig(mode="mtcnn"))(astronaut())
    in_crop = apply(np.array(face.matrix), np.array(reference.landmarks))
    assert np.abs(in_crop - TEMPLATE_112).max() < 14.0


def test_none_passes_the_image_through() -> None:
    stage = FaceStage(FaceConfig(mode="none", crop_size=112))
    (face,) = stage(grace_hopper())
    assert face.crop.size == (112, 112) and face.landmarks is None
    assert face.box == (0.0, 44.0, 512.0, 556.0)  # the centre square of 512x600


def test_stage_pickles_without_its_detector(mtcnn: FaceStage) -> None:
    copy = pickle.loads(pickle.dumps(mtcnn))
    assert copy.config == mtcnn.config and copy._detector is None
    assert len(copy(astronaut())) == 1
    assert len(pickle.dumps(mtcnn)) < 2000


def test_config_is_validated() -> None:
    for bad in ({"mode": "yunet"}, {"crop_size": 8}, {"min_score": 1.5}, {"detect_max_side": 10}):
        with pytest.raises(ValueError):
            FaceConfig(**bad).validate()


@settings(max_examples=50, deadline=None)
@given(
    angle=st.floats(-np.pi, np.pi),
    scale=st.floats(0.1, 10.0),
    tx=st.floats(-500, 500),
    ty=st.floats(-500, 500),
)
def test_similarity_transform_recovers_a_known_one(angle, scale, tx, ty) -> None:
    a, b = scale * np.cos(angle), scale * np.sin(angle)
    truth = np.array([[a, -b, tx], [b, a, ty]])
    src = TEMPLATE_112 * 3 + 17
    dst = apply(truth, src)
    assert np.allclose(similarity_transform(src, dst), truth, atol=1e-6 * max(1.0, scale, abs(tx), abs(ty)))
