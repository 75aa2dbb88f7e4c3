"""The SCN network: a torchvision ResNet trunk, a classifier and the importance branch.

alpha = sigmoid(w_a . x + b) scales the logits (z = alpha * W x), acting as a per-sample
inverse temperature. Since alpha > 0 the argmax does not depend on it, so inference
(`predict`) skips the branch.

`method: eac` asks the same network for its class activation maps (Zhou et al., CVPR 2016, as
Erasing Attention Consistency uses them): the classifier's weights applied at every position of
the last feature map, before pooling. The other methods never ask, and their outputs are the
same numbers as without this path (tests/test_model.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torchvision
from torch import Tensor, nn

from scn_scale.config import BACKBONES, ModelConfig


class SCNOutput(NamedTuple):
    logits: Tensor  # [N, C], W x, unscaled
    alpha: Tensor  # [N], in (0, 1)
    scaled_logits: Tensor  # [N, C], alpha[:, None] * logits
    cam: Tensor | None = None  # [N, C, h, w], the class activation maps; only when forward(x, cam=True)


class SCNModel(nn.Module):
    def __init__(self, num_classes: int, backbone: str = "resnet18", dropout: float = 0.0):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; known: {list(BACKBONES)}")
        # weights=None: never download; pretrained weights come through scn_scale.weights,
        # which reports exactly what it loaded.
        net = getattr(torchvision.models, backbone)(weights=None)
        feat_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.backbone_name = backbone
        self.num_classes = num_classes
        self.backbone = net
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(feat_dim, num_classes)
        self.importance = nn.Linear(feat_dim, 1)

    @property
    def feature_dim(self) -> int:
        return self.classifier.in_features

    def feature_map(self, x: Tensor) -> Tensor:
        """The trunk's last feature map [N, D, h, w]: torchvision's ResNet forward up to its pooling."""
        net = self.backbone
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))

    def forward(self, x: Tensor, cam: bool = False) -> SCNOutput:
        """`cam`: also the class activation maps, for EAC's consistency loss.

        The maps use the classifier's weights detached, as the EAC authors' released code does:
        the consistency loss trains the trunk's features, not the classifier. No bias: a
        constant per class would cancel in the consistency of two maps anyway.
        """
        if cam:
            fmap = self.feature_map(x)
            maps = torch.einsum("ndhw,cd->nchw", fmap, self.classifier.weight.detach())
            pooled = torch.flatten(self.backbone.avgpool(fmap), 1)
        else:  # torchvision's own forward: SCN and the baseline run exactly what they ran before
            maps, pooled = None, self.backbone(x)
        feat = self.dropout(pooled)
        logits = self.classifier(feat)
        alpha = torch.sigmoid(self.importance(feat)).squeeze(1)
        return SCNOutput(logits, alpha, alpha[:, None] * logits, maps)

    def predict(self, x: Tensor) -> Tensor:
        """Unscaled logits: same argmax as the scaled ones, without computing alpha."""
        return self.classifier(self.dropout(self.backbone(x)))


def build_model(cfg: ModelConfig, num_classes: int) -> SCNModel:
    return SCNModel(num_classes, backbone=cfg.backbone, dropout=cfg.dropout)
