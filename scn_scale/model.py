"""The SCN network: a torchvision ResNet trunk, a classifier and the importance branch.

alpha = sigmoid(w_a . x + b) scales the logits (z = alpha * W x), acting as a per-sample
inverse temperature. Since alpha > 0 the argmax does not depend on it, so inference
(`predict`) skips the branch.
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

    def forward(self, x: Tensor) -> SCNOutput:
        feat = self.dropout(self.backbone(x))
        logits = self.classifier(feat)
        alpha = torch.sigmoid(self.importance(feat)).squeeze(1)
        return SCNOutput(logits, alpha, alpha[:, None] * logits)

    def predict(self, x: Tensor) -> Tensor:
        """Unscaled logits: same argmax as the scaled ones, without computing alpha."""
        return self.classifier(self.dropout(self.backbone(x)))


def build_model(cfg: ModelConfig, num_classes: int) -> SCNModel:
    return SCNModel(num_classes, backbone=cfg.backbone, dropout=cfg.dropout)
