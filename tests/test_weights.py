import argparse

import pytest
import torch
import torchvision

from scn_scale.model import SCNModel
from scn_scale.weights import WeightLoadError, load_model_file, load_weights, save_model_file
from shards.classes import BASIC7, CANONICAL


@pytest.fixture(scope="module")
def imagenet():
    """A torchvision resnet18 state dict with random weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    state = net.state_dict()
    for name, tensor in state.items():
        if "running" in name:
            tensor.uniform_(0.5, 1.5)
        elif name.endswith("num_batches_tracked"):
            tensor.fill_(123)
    return {k: v.clone() for k, v in state.items()}


def backbone_equals(model, source, prefix=""):
    own = model.backbone.state_dict()
    names = [k for k in own if not k.startswith("fc.")]
    assert len(names) == 120  # resnet18: every tensor of the trunk is checked
    return all(torch.equal(own[k], source[prefix + k]) for k in names)


def test_torchvision_layout(tmp_path, imagenet):
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(imagenet, path)
    model = SCNModel(7)
    report = load_weights(model, str(path))
    assert report.layout == "torchvision"
    assert backbone_equals(model, imagenet)
    assert report.unexpected == ["fc.bias", "fc.weight"]  # the ImageNet head is not the classifier
    assert report.missing == ["classifier.bias", "classifier.weight", "importance.bias", "importance.weight"]
    assert report.mismatched == [] and len(report.loaded) == 120
    assert "120 tensors loaded" in report.summary()


def test_msceleb_layout(tmp_path, imagenet):
    state = {f"module.{k}": v for k, v in imagenet.items() if not k.startswith("fc.")}
    state["module.feature.weight"] = torch.randn(256, 512)
    state["module.feature.bias"] = torch.randn(256)
    state["module.fc.weight"] = torch.randn(8631, 256)
    state["module.fc.bias"] = torch.randn(8631)
    path = tmp_path / "ijba_res18_naive.pth.tar"
    torch.save({"epoch": 30, "arch": "resnet18", "best_prec1": 0.9, "state_dict": state}, path)
    model = SCNModel(7)
    report = load_weights(model, str(path))
    assert report.layout == "msceleb"
    assert backbone_equals(model, state, prefix="module.")
    assert report.unexpected == ["module.fc.bias", "module.fc.weight", "module.feature.bias", "module.feature.weight"]


def test_checkpoint_without_batchnorm_counters_still_covers_the_backbone(tmp_path, imagenet):
    # Files from before PyTorch 0.4.1 have no num_batches_tracked.
    state = {f"module.{k}": v for k, v in imagenet.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth.tar"
    torch.save({"state_dict": state}, path)
    report = load_weights(SCNModel(7), str(path))
    assert "backbone.bn1.num_batches_tracked" in report.missing
    assert "backbone.bn1.running_var" in report.loaded


def test_names_that_match_nothing_fail(tmp_path, imagenet):
    # The released code's own layer names (an nn.Sequential of the trunk): nothing matches.
    state = {f"module.features.{i}.weight": torch.randn(4) for i in range(8)}
    path = tmp_path / "mismatch.pth.tar"
    torch.save({"state_dict": state}, path)
    with pytest.raises(WeightLoadError, match="no tensor of .*mismatch.pth.tar matches the model"):
        load_weights(SCNModel(7), str(path), allow_partial=True)


def test_partial_backbone_fails_unless_allowed(tmp_path, imagenet):
    state = {k: v for k, v in imagenet.items() if not k.startswith("layer4.")}
    state["conv1.weight"] = torch.randn(64, 3, 5, 5)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(WeightLoadError) as e:
        load_weights(SCNModel(7), str(path))
    message = str(e.value)
    assert "backbone.layer4.1.bn2.running_mean" in message and "backbone.conv1.weight" in message
    assert "(64, 3, 5, 5) vs (64, 3, 7, 7)" in message

    model = SCNModel(7)
    before = model.backbone.layer4[0].conv1.weight.clone()
    report = load_weights(model, str(path), allow_partial=True)
    assert "backbone.layer4.0.conv1.weight" in report.missing
    assert report.mismatched == ["backbone.conv1.weight: (64, 3, 5, 5) vs (64, 3, 7, 7)"]
    assert torch.equal(model.backbone.layer4[0].conv1.weight, before)  # left as it was
    assert torch.equal(model.backbone.layer1[0].conv1.weight, imagenet["layer1.0.conv1.weight"])


def test_files_that_need_full_unpickling_are_refused(tmp_path, imagenet):
    path = tmp_path / "unsafe.pth.tar"
    torch.save({"state_dict": imagenet, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(WeightLoadError, match=r"holds a Python object \(argparse.Namespace\)") as e:
        load_weights(SCNModel(7), str(path))
    assert "weights_only=False" not in str(e.value)  # torch's own message advises the unsafe load


@pytest.mark.parametrize("data", [b"not a model", b"", b"PK\x03\x04 a cut zip"], ids=["garbage", "empty", "cut-zip"])
def test_a_file_that_is_no_model_file_is_said_to_be_so(tmp_path, data: bytes) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(data)
    with pytest.raises(WeightLoadError, match="is not a readable model file") as e:
        load_model_file(str(path))
    assert "weights_only=False" not in str(e.value)


def test_model_file_round_trip(tmp_path):
    torch.manual_seed(1)
    model = SCNModel(3)
    path = tmp_path / "model.pt"
    save_model_file(str(path), model, ["neutral", "happiness", "sadness"], extra={"epoch": 4, "accuracy": 0.5})
    loaded, classes, extra = load_model_file(str(path))
    assert classes == ["neutral", "happiness", "sadness"] and extra == {"epoch": 4, "accuracy": 0.5}
    model.eval(), loaded.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x).scaled_logits, loaded(x).scaled_logits)
    with pytest.raises(ValueError, match="2 class names"):
        save_model_file(str(path), model, ["neutral", "happiness"])


def test_scn_scale_file_same_classes(tmp_path):
    source = SCNModel(8)
    path = tmp_path / "pretrained.pt"
    save_model_file(str(path), source, CANONICAL)
    model = SCNModel(8)
    report = load_weights(model, str(path), classes=CANONICAL)
    assert report.layout == "scn-scale" and report.missing == [] and report.unexpected == []
    assert model.state_dict().keys() == source.state_dict().keys()
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
    assert report.classifier_rows == {c: c for c in CANONICAL}


def test_eight_classes_to_seven_by_name(tmp_path):
    source = SCNModel(8)
    path = tmp_path / "pretrained.pt"
    save_model_file(str(path), source, CANONICAL)
    model = SCNModel(7)
    report = load_weights(model, str(path), classes=BASIC7)
    assert backbone_equals(model, source.backbone.state_dict())
    assert torch.equal(model.importance.weight, source.importance.weight)
    assert report.classifier_rows == {c: c for c in BASIC7}
    for i, name in enumerate(BASIC7):
        j = CANONICAL.index(name)
        assert torch.equal(model.classifier.weight[i], source.classifier.weight[j])
        assert model.classifier.bias[i] == source.classifier.bias[j]


def test_rows_follow_names_not_positions(tmp_path):
    source = SCNModel(3)
    path = tmp_path / "pretrained.pt"
    save_model_file(str(path), source, ["neutral", "happiness", "sadness"])
    model = SCNModel(3)
    fresh = model.classifier.weight[2].clone()
    report = load_weights(model, str(path), classes=["neutral", "sadness", "anger"])
    assert report.classifier_rows == {"neutral": "neutral", "sadness": "sadness"}
    assert torch.equal(model.classifier.weight[0], source.classifier.weight[0])
    assert torch.equal(model.classifier.weight[1], source.classifier.weight[2])
    assert torch.equal(model.classifier.weight[2], fresh)  # anger: not in the file, left fresh


def test_scn_scale_file_without_class_names_mismatches_the_classifier(tmp_path):
    path = tmp_path / "pretrained.pt"
    save_model_file(str(path), SCNModel(8), CANONICAL)
    report = load_weights(SCNModel(7), str(path))
    assert report.mismatched == ["classifier.bias: (8,) vs (7,)", "classifier.weight: (8, 512) vs (7, 512)"]
    assert report.classifier_rows == {}


def test_unrecognized_files_and_class_counts(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(WeightLoadError, match="expected a dict"):
        load_weights(SCNModel(7), str(path))
    torch.save({"model": {"conv1.weight": torch.zeros(1)}, "epoch": 3}, path)
    with pytest.raises(WeightLoadError, match="unrecognized weights file layout.*'epoch', 'model'"):
        load_weights(SCNModel(7), str(path))
    with pytest.raises(WeightLoadError, match="8 class names for a model with 7 outputs"):
        load_weights(SCNModel(7), str(path), classes=CANONICAL)
