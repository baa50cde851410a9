"""Batch-norm folding for inference: same outputs, no batch norm left, the original untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from boneai.models import build_model
from boneai.models.fuse import fold_batchnorm


def _randomise_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters, as after training."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "densenet169", "resnet34", "resnet18_cbam", "boneage_lite0"])
def test_folded_copy_gives_the_same_outputs_without_batch_norm_layers(name):
    model = build_model(name, pretrained=False).eval()
    _randomise_batchnorm(model)
    x = torch.randn(3, 3, 96, 96)
    example = (torch.zeros(1, 3, 64, 64), torch.zeros(1)) if name.startswith("boneage") else torch.zeros(1, 3, 64, 64)
    args = (x, torch.tensor([0.0, 1.0, 1.0])) if name.startswith("boneage") else (x,)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = model(*args)
        folded = fold_batchnorm(model, example)
        out = folded(*args)
    scale = float(reference.abs().max().clamp(min=1.0))
    assert torch.allclose(out, reference, rtol=1e-4, atol=1e-4 * scale)
    n_before = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    n_after = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert n_before > 0 and n_after < n_before
    if name in ("efficientnet_lite0", "resnet34", "boneage_lite0"):
        assert n_after == 0  # every batch norm follows a convolution in these networks
    # The original keeps its weights and batch norms (Grad-CAM and training use it).
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in folded.parameters())


class _SharedConvOutput(nn.Module):
    """A convolution whose output feeds a batch norm and, functionally, a residual sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_a_convolution_read_elsewhere_is_not_folded():
    model = _SharedConvOutput().eval()
    _randomise_batchnorm(model)
    folded = fold_batchnorm(model, torch.zeros(1, 2, 8, 8))
    x = torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)
    assert isinstance(folded.bn, nn.BatchNorm2d)  # folding would have changed the residual branch


def test_predictors_run_the_folded_network_and_give_the_card_model_outputs(monkeypatch):
    """The shipped model's forward pass with and without folding: same logits."""
    import numpy as np

    from boneai.inference import load_model
    from boneai.io import read_radiograph
    from tests.conftest import REPO_ROOT as REPO

    image = read_radiograph(sorted((REPO / "samples" / "fracatlas").glob("*.jpg"))[0])
    folded = load_model("fracture_fast")
    monkeypatch.setenv("BONEAI_FOLD_BN", "0")
    plain = load_model("fracture_fast")
    assert plain._forward_model is plain.model and folded._forward_model is not folded.model
    assert folded.batchnorm_folded and not plain.batchnorm_folded
    a, b = folded.predict(image), plain.predict(image)
    assert np.isclose(a.logit, b.logit, atol=1e-4) and a.decision == b.decision


@pytest.mark.parametrize("size", [64, 65, 96, 97, 100])
def test_symmetric_padding_replaces_tensorflow_same_padding_exactly(size):
    """EfficientNet-Lite's strided convolutions (3x3 and 5x5, TensorFlow SAME), on even and odd sizes."""
    from boneai.models.fuse import _SymmetricSameConv, inference_copy, symmetric_same_padding

    model = build_model("efficientnet_lite0", pretrained=False).eval()
    _randomise_batchnorm(model)
    strided = [m for m in model.modules() if type(m).__name__ == "Conv2dSame"]
    assert {m.kernel_size for m in strided} == {(3, 3), (5, 5)}
    x = torch.randn(2, 3, size, size + 3)
    with torch.no_grad():
        reference = model(x)
        replaced = symmetric_same_padding(fold_batchnorm(model, torch.zeros(1, 3, 64, 64)))
        assert sum(isinstance(m, _SymmetricSameConv) for m in replaced.modules()) == len(strided)
        assert torch.allclose(replaced(x), reference, atol=1e-4)
        fast, changed = inference_copy(model, torch.zeros(1, 3, 64, 64))
        assert changed and torch.allclose(fast(x), reference, atol=1e-4)
        # Every strided feature map: the same values as timm's padded convolution, not shifted by a row.
        for conv in strided[1:]:
            feat = torch.randn(1, conv.in_channels, size, size + 1)
            assert torch.allclose(_SymmetricSameConv(conv)(feat), conv(feat), atol=1e-5)
