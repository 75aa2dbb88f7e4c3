"""Inference on images and photos, and the ONNX export checked against PyTorch with onnxruntime."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from scn_scale import export, predict
from scn_scale.data import eval_transform
from scn_scale.model import SCNModel
from scn_scale.weights import save_model_file
from shards import BASIC7

SIZE = 32
PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SCNModel]:
    directory = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = SCNModel(len(BASIC7))
    save_model_file(str(directory / "model.pt"), model, BASIC7, {"epoch": 1, "image_size": SIZE})
    return directory, model.eval()


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory, checkpoint) -> Path:
    """One export through the CLI, shared: the dynamo exporter takes seconds."""
    pytest.importorskip("onnxruntime")
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert export.main(["--checkpoint", str(checkpoint[0]), "--out", str(path)]) == 0
    return path


def test_onnx_outputs_match_pytorch(onnx_file: Path, checkpoint) -> None:
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    _, model = checkpoint
    path = onnx_file
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["classes"]) == list(BASIC7) and meta["image_size"] == str(SIZE)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["logits", "alpha"]
    rng = np.random.default_rng(1)
    for n in (1, 5):  # a batch size other than the export example's: the batch is dynamic
        x = rng.standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)
        logits, alpha = session.run(None, {"image": x})
        with torch.no_grad():
            out = model(torch.from_numpy(x))
        assert logits.shape == (n, 7) and alpha.shape == (n,)
        assert np.abs(logits - out.logits.numpy()).max() < 1e-4
        assert np.abs(alpha - out.alpha.numpy()).max() < 1e-4


def test_the_check_catches_a_file_that_disagrees(onnx_file: Path, checkpoint) -> None:
    assert export.check_onnx(checkpoint[1], onnx_file, SIZE) <= export.TOLERANCE
    other = SCNModel(len(BASIC7)).eval()
    with pytest.raises(ValueError, match="differs from PyTorch"):
        export.check_onnx(other, onnx_file, SIZE)


def test_predict_aligned_crops_go_straight_in(tmp_path: Path, checkpoint, capsys: pytest.CaptureFixture) -> None:
    directory, model = checkpoint
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        path = tmp_path / f"crop{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    assert predict.main(["--checkpoint", str(directory), "--faces", "none", "--json", *map(str, paths)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    for row, path in zip(rows, paths):
        with torch.no_grad():
            out = model(eval_transform(SIZE)(Image.open(path).convert("RGB"))[None])
        probs = out.logits.softmax(1)[0]
        assert row["face"] is None and row["label"] == BASIC7[int(probs.argmax())]
        assert [row["probs"][c] for c in BASIC7] == pytest.approx(probs.tolist(), abs=1e-6)
        assert row["alpha"] == pytest.approx(float(out.alpha[0]), abs=1e-6)


def test_predict_shows_its_bar_on_stderr_and_on_a_terminal_only(
    tmp_path: Path, checkpoint, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, _ = checkpoint
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for path in paths:
        Image.new("RGB", (40, 40), (90, 60, 30)).save(path)
    argv = ["--checkpoint", str(directory), "--faces", "none", "--json", *map(str, paths)]
    assert predict.main(argv) == 0
    assert capsys.readouterr().err == ""  # stderr is no terminal here: no bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert predict.main(argv) == 0
    out, err = capsys.readouterr()
    assert [json.loads(line)["path"] for line in out.splitlines()] == list(map(str, paths))
    assert "2/2" in err


def test_predict_searches_directories_and_skips_an_unreadable_file(
    tmp_path: Path, checkpoint, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    directory, _ = checkpoint
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    good = [photos / "a.png", photos / "sub" / "b.jpg"]
    for i, path in enumerate(good):
        Image.new("RGB", (40, 40), (60 * i, 90, 30)).save(path)
    (photos / "sub" / "broken.jpg").write_bytes(b"not an image")
    (photos / "notes.txt").write_text("not looked at: no image suffix")
    missing = tmp_path / "missing.png"
    code = predict.main(["--checkpoint", str(directory), "--faces", "none", "--json", str(photos), str(missing)])
    assert code == 1  # some files skipped
    assert [json.loads(line)["path"] for line in capsys.readouterr().out.splitlines()] == list(map(str, good))
    assert f"{photos / 'sub' / 'broken.jpg'}: skipped, not a readable image" in caplog.text
    assert f"{missing}: skipped, not a readable image" in caplog.text
    assert "2 of 4 files skipped" in caplog.text


def test_predict_raw_photo_goes_through_the_face_stage(
    tmp_path: Path, checkpoint, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("facenet_pytorch")
    directory, model = checkpoint
    blank = tmp_path / "blank.png"
    Image.new("RGB", (200, 160), (128, 128, 128)).save(blank)
    assert predict.main(["--checkpoint", str(directory), str(PHOTO), str(blank)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.startswith(f"{PHOTO} face ") for line in lines)  # none for the blank photo
    results = predict.predict_paths(model, BASIC7, [PHOTO], SIZE, faces="mtcnn")
    width, height = Image.open(PHOTO).size
    for r in results:
        x1, y1, x2, y2 = r.box
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        assert sum(r.probs.values()) == pytest.approx(1.0, abs=1e-5) and 0 < r.alpha < 1


def test_predict_skips_a_pixel_bomb_before_decoding_it(tmp_path: Path, checkpoint, capsys: pytest.CaptureFixture,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    from test_hostile_server import bomb_png

    directory, _ = checkpoint
    good, bomb = tmp_path / "good.png", tmp_path / "bomb.png"
    Image.new("RGB", (40, 40), (120, 90, 30)).save(good)
    bomb.write_bytes(bomb_png(12_000, 12_000))  # 17 KB declaring 144 M pixels
    code = predict.main(["--checkpoint", str(directory), "--faces", "none", "--json", str(good), str(bomb)])
    assert code == 1
    assert [json.loads(line)["path"] for line in capsys.readouterr().out.splitlines()] == [str(good)]
    assert f"{bomb}: skipped, not a readable image (12000x12000 is 144000000 pixels, over the cap" in caplog.text
