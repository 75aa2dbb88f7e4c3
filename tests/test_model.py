import pytest
import torch
from torch import nn

from scn_scale.config import ModelConfig
from scn_scale.model import SCNModel, SCNOutput, build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SCNModel(num_classes=7).eval()


def test_forward_shapes_and_scaling(model):
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, SCNOutput)
    assert out.logits.shape == (3, 7) and out.alpha.shape == (3,) and out.scaled_logits.shape == (3, 7)
    assert torch.all((out.alpha > 0) & (out.alpha < 1))
    feat = model.backbone(x)
    assert torch.allclose(out.logits, model.classifier(feat))
    assert torch.allclose(out.alpha, torch.sigmoid(model.importance(feat)).squeeze(1))
    assert torch.allclose(out.scaled_logits, out.alpha[:, None] * out.logits)


def test_predict_skips_the_branch_with_the_same_argmax(model):
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        logits = model.predict(x)
    assert torch.allclose(logits, out.logits)
    assert torch.equal(logits.argmax(1), out.scaled_logits.argmax(1))


def test_structure(model):
    assert isinstance(model.backbone.fc, nn.Identity)
    assert model.feature_dim == 512
    assert model.importance.out_features == 1


def test_build_model_by_name():
    m = build_model(ModelConfig(backbone="resnet50", dropout=0.5), num_classes=8)
    assert m.feature_dim == 2048 and m.classifier.out_features == 8 and m.dropout.p == 0.5
    with pytest.raises(ValueError, match="unknown backbone"):
        SCNModel(7, backbone="vgg16")


def test_gradients_reach_both_heads(model):
    m = SCNModel(num_classes=3)
    out = m(torch.randn(2, 3, 32, 32))
    out.scaled_logits.sum().backward()
    assert m.importance.weight.grad is not None and m.importance.weight.grad.abs().sum() > 0
    assert m.classifier.weight.grad.abs().sum() > 0


def test_cam_path_gives_the_same_outputs_and_maps_of_every_class(model):
    """cam=True runs the trunk in steps of its own: the same logits and alpha, plus one map per class."""
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain, with_cam = model(x), model(x, cam=True)
    assert plain.cam is None
    assert with_cam.cam.shape == (2, 7, 2, 2)  # 64 px: the trunk's stride is 32
    for name in ("logits", "alpha", "scaled_logits"):
        assert torch.equal(getattr(plain, name), getattr(with_cam, name)), name
    # A map is the classifier's weights at every position: pooled, it is the logits without the bias.
    pooled = with_cam.cam.mean(dim=(2, 3)) + model.classifier.bias
    assert torch.allclose(pooled, with_cam.logits, atol=1e-5)


def test_cam_trains_the_trunk_not_the_classifier():
    m = SCNModel(num_classes=3)
    m(torch.randn(2, 3, 64, 64), cam=True).cam.square().sum().backward()
    assert m.classifier.weight.grad is None  # detached, as in the EAC authors' code
    assert m.backbone.layer4[1].conv2.weight.grad.abs().sum() > 0
    assert m.backbone.conv1.weight.grad.abs().sum() > 0


def test_scn_and_baseline_outputs_are_torchvisions_resnet():
    """The path SCN and the baseline take is torchvision's own forward, bit for bit (same seed, same weights)."""
    import torchvision

    torch.manual_seed(3)
    m = SCNModel(num_classes=4).eval()
    reference = torchvision.models.resnet18(weights=None)
    reference.fc = nn.Identity()
    reference.load_state_dict(m.backbone.state_dict())
    reference.eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        out = m(x)
        assert torch.equal(out.logits, m.classifier(reference(x)))
        assert torch.equal(torch.flatten(m.backbone.avgpool(m.feature_map(x)), 1), reference(x))
