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
