"""Losses from the source documents.

- Weighted binary cross-entropy with the MURA class weights (Rajpurkar et al. 2017):
  ``w_pos = |N| / (|A| + |N|)`` and ``w_neg = |A| / (|A| + |N|)`` where |A| and |N| count abnormal
  and normal training images, so the rarer class weighs more.
- Focal loss (Lin et al. 2017), used for class imbalance in the FracAtlas ResNet study.
- L1 / MAE and smooth L1 for bone-age regression (the ResNet-34 bone-age report trains on MAE).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WeightedBCELoss", "FocalLoss", "mura_class_weights", "build_loss", "LOSSES"]


def mura_class_weights(n_positive: int, n_negative: int) -> tuple[float, float]:
    """MURA weights ``(w_pos, w_neg) = (N/(A+N), A/(A+N))``."""
    total = n_positive + n_negative
    if n_positive <= 0 or n_negative <= 0:
        raise ValueError("both classes must be present to compute MURA class weights")
    return n_negative / total, n_positive / total


class WeightedBCELoss(nn.Module):
    """``-(w_pos * y * log p + w_neg * (1 - y) * log(1 - p))`` averaged, on logits (numerically stable)."""

    def __init__(self, w_pos: float = 0.5, w_neg: float = 0.5) -> None:
        super().__init__()
        self.w_pos, self.w_neg = float(w_pos), float(w_neg)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = logits.reshape(-1), target.reshape(-1).to(logits.dtype)
        log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
        loss = -(self.w_pos * target * log_p + self.w_neg * (1 - target) * log_not_p)
        return loss.mean()


class FocalLoss(nn.Module):
    """Binary focal loss ``-alpha_t (1 - p_t)^gamma log p_t`` on logits (alpha=None: no alpha term)."""

    def __init__(self, gamma: float = 2.0, alpha: float | None = 0.25) -> None:
        super().__init__()
        self.gamma, self.alpha = float(gamma), alpha

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = logits.reshape(-1), target.reshape(-1).to(logits.dtype)
        ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        p_t = torch.exp(-ce)
        loss = (1 - p_t) ** self.gamma * ce
        if self.alpha is not None:
            loss = (self.alpha * target + (1 - self.alpha) * (1 - target)) * loss
        return loss.mean()


class _Regression(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.fn(pred.reshape(-1), target.reshape(-1).to(pred.dtype))


LOSSES = ("bce", "weighted_bce", "focal", "l1", "smooth_l1")


def build_loss(name: str, n_positive: int = 0, n_negative: int = 0, pos_weight: float | None = None) -> nn.Module:
    """A loss by name. ``bce`` uses ``pos_weight`` (default N/A); ``weighted_bce`` the MURA weights."""
    if name == "bce":
        w = pos_weight if pos_weight is not None else (n_negative / n_positive if n_positive else 1.0)
        return nn.BCEWithLogitsLoss(pos_weight=torch.tensor(float(w)))
    if name == "weighted_bce":
        return WeightedBCELoss(*mura_class_weights(n_positive, n_negative))
    if name == "focal":
        return FocalLoss()
    if name == "l1":
        return _Regression(F.l1_loss)
    if name == "smooth_l1":
        return _Regression(lambda p, t: F.smooth_l1_loss(p, t, beta=6.0))
    raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
