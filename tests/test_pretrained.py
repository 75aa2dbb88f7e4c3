"""Named pretrained starts (torchvision's weights API, offline from the torch hub cache) and safetensors in and out."""

from __future__ import annotations

import json
import re
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from scn_scale import export
from scn_scale.config import BACKBONES, TrainConfig, save_config
from scn_scale.model import SCNModel
from scn_scale.weights import WeightLoadError, load_model_file, load_weights, save_model_file
from shards.classes import BASIC7, CANONICAL


def imagenet_like(backbone: str) -> dict[str, torch.Tensor]:
    """A torchvision state dict of random weights with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    state = getattr(torchvision.models, backbone)(weights=None).state_dict()
    for name, tensor in state.items():
        if "running" in name:
            tensor.uniform_(0.5, 1.5)
        elif name.endswith("num_batches_tracked"):
            tensor.fill_(7)
    return state


def cache_file(backbone: str) -> str:
    """The name torchvision's default weights have in the hub cache: the last part of their URL."""
    return torchvision.models.get_model_weights(backbone).DEFAULT.url.rsplit("/", 1)[-1]


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list]:
    """An empty torch hub cache under TORCH_HOME, and no network: every download attempt is recorded and fails."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    attempts: list = []

    def no_network(url, dst, hash_prefix=None, progress=True):
        attempts.append((url, hash_prefix))
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    return checkpoints, attempts


@pytest.mark.parametrize("backbone", BACKBONES)
def test_named_start_loads_every_backbone_tensor_from_the_cache(hub, backbone: str) -> None:
    checkpoints, attempts = hub
    # torch.hub checks the sha256 prefix in the file name only when it downloads (check_hash); a file
    # already in the cache is loaded as it is, which is what lets this generated file stand in.
    planted = imagenet_like(backbone)
    assert re.fullmatch(rf"{backbone}-[0-9a-f]{{8}}\.pth", cache_file(backbone))
    torch.save(planted, checkpoints / cache_file(backbone))
    model = SCNModel(len(BASIC7), backbone=backbone)
    report = load_weights(model, f"torchvision:{backbone}", BASIC7)
    assert attempts == []  # offline: nothing was downloaded
    trunk = [f"backbone.{k}" for k in planted if not k.startswith("fc.")]
    assert report.layout == "torchvision"
    assert sorted(trunk) == [n for n in report.loaded if n.startswith("backbone.")]
    assert report.loaded == sorted(trunk)
    assert report.unexpected == ["fc.bias", "fc.weight"]  # the ImageNet head is not the expression classifier
    assert report.missing == ["classifier.bias", "classifier.weight", "importance.bias", "importance.weight"]
    own = model.state_dict()
    assert all(torch.equal(own[f"backbone.{k}"], planted[k]) for k in planted if not k.startswith("fc."))


def test_named_start_without_cache_or_network_names_the_cache_file(hub) -> None:
    checkpoints, attempts = hub
    with pytest.raises(WeightLoadError, match=re.escape(str(checkpoints / cache_file("resnet18")))):
        load_weights(SCNModel(7), "torchvision:resnet18")
    # torchvision asked for its own URL, with the file name's hash prefix to check the download against.
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    assert attempts == [(weights.url, cache_file("resnet18").split("-")[1].split(".")[0])]


def test_named_start_must_match_the_backbone(hub) -> None:
    with pytest.raises(WeightLoadError, match="torchvision:resnet50 is for backbone 'resnet50'.*model.backbone"):
        load_weights(SCNModel(7, backbone="resnet18"), "torchvision:resnet50")
    with pytest.raises(WeightLoadError, match="offered for torchvision:resnet18, torchvision:resnet34"):
        load_weights(SCNModel(7), "torchvision:vgg16")


@pytest.fixture
def run_checkpoint(tmp_path: Path) -> tuple[Path, SCNModel]:
    """A run directory as training leaves it: metrics.jsonl, and a checkpoint with model.pt and config.yaml."""
    torch.manual_seed(3)
    model = SCNModel(len(BASIC7))
    for name, tensor in model.state_dict().items():
        if "running" in name:
            tensor.uniform_(0.5, 1.5)
    run = tmp_path / "runs" / "rafdb"
    checkpoint = run / "checkpoint_epoch_0002"
    checkpoint.mkdir(parents=True)
    save_model_file(str(checkpoint / "model.pt"), model, BASIC7, {"epoch": 2, "image_size": 32, "method": "scn"})
    save_config(TrainConfig(run_name="rafdb", epochs=2), checkpoint / "config.yaml")
    lines = [{"epoch": 1, "val_accuracy": 0.61, "val_mean_class_accuracy": 0.52, "train_accuracy": 0.55},
             {"epoch": 2, "val_accuracy": 0.58, "val_mean_class_accuracy": 0.50, "train_accuracy": 0.66}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return checkpoint, model.eval()


def test_safetensors_export_round_trip_gives_identical_logits(run_checkpoint, tmp_path: Path, capsys) -> None:
    checkpoint, model = run_checkpoint
    out = tmp_path / "hub-model"
    assert export.main(["--checkpoint", str(checkpoint), "--format", "safetensors", "--out", str(out)]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    path = out / "model.safetensors"
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)

        fresh = SCNModel(len(BASIC7))
        report = load_weights(fresh, str(path), BASIC7)  # what init=<file>.safetensors does
        assert report.layout == "scn-scale" and report.missing == [] and report.unexpected == []
        assert torch.equal(fresh.eval()(images).logits, expected.logits)
        assert torch.equal(fresh(images).alpha, expected.alpha)

        loaded, classes, extra = load_model_file(str(path))
        assert classes == list(BASIC7) and extra["epoch"] == 2
        assert torch.equal(loaded.eval()(images).logits, expected.logits)

        pretrained = SCNModel(len(CANONICAL))  # fine-tuning onto another class list: rows by name
        report = load_weights(pretrained, str(path), CANONICAL)
        assert set(report.classifier_rows) == set(BASIC7)


def test_model_card_holds_classes_config_metrics_and_a_working_recipe(run_checkpoint, tmp_path: Path, monkeypatch) -> None:
    checkpoint, model = run_checkpoint
    out = tmp_path / "hub-model"
    assert export.main(["--checkpoint", str(checkpoint), "--format", "safetensors", "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    header = card.split("---\n")[1]
    assert "pipeline_tag: image-classification" in header and "library_name: pytorch" in header
    for i, name in enumerate(BASIC7):
        assert f"| {i} | {name} |" in card
    assert "run_name: rafdb" in card and "delta1: 0.07" in card  # the checkpoint's config.yaml
    assert "| 2 | last | 0.5800 |" in card and "| 1 | best (selected on the validation set) | 0.6100 |" in card
    assert "32x32" in card

    recipe = card.split("## Load without scn-scale")[1].split("```python\n")[1].split("```")[0]
    images = torch.randn(2, 3, 32, 32)
    scope = {"images": images}
    monkeypatch.chdir(out)  # the recipe runs where the files are, as after a download from the Hub
    with torch.no_grad():
        exec(compile(recipe, "model card recipe", "exec"), scope, scope)
        expected = model(images).logits
    assert torch.equal(scope["logits"], expected)
    assert scope["labels"] == [BASIC7[i] for i in expected.argmax(1).tolist()]


def test_export_of_a_missing_checkpoint_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    assert export.main(["--checkpoint", str(tmp_path / "nothing"), "--format", "safetensors",
                        "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --checkpoint") and len(err.strip().splitlines()) == 1


def test_safetensors_of_plain_torchvision_names_load_in_the_torchvision_layout(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    planted = imagenet_like("resnet18")
    path = tmp_path / "resnet18.safetensors"
    save_file(planted, str(path))
    report = load_weights(SCNModel(7), str(path))
    assert report.layout == "torchvision" and len(report.loaded) == len(planted) - 2


def test_safetensors_extra_must_be_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keeps extra as JSON"):
        save_model_file(str(tmp_path / "m.safetensors"), SCNModel(7), BASIC7, {"t": torch.zeros(1)})
    assert list(tmp_path.iterdir()) == []
