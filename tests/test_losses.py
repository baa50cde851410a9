"""Losses against values computed by hand."""

import math

import pytest
import torch

from boneai.losses import FocalLoss, WeightedBCELoss, build_loss, mura_class_weights


def test_mura_class_weights_favour_the_rare_class():
    w_pos, w_neg = mura_class_weights(n_positive=20, n_negative=80)
    assert w_pos == pytest.approx(0.8) and w_neg == pytest.approx(0.2)


def test_weighted_bce_matches_hand_computation():
    logits = torch.tensor([0.0, 2.0])
    target = torch.tensor([1.0, 0.0])
    loss = WeightedBCELoss(w_pos=0.8, w_neg=0.2)(logits, target)
    # y=1, p=0.5: -0.8*log(0.5); y=0, p=sigmoid(2): -0.2*log(1-sigmoid(2)) = 0.2*log(1+e^2)
    expected = (0.8 * math.log(2) + 0.2 * math.log(1 + math.e**2)) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_focal_loss_matches_hand_computation_and_down_weights_easy_examples():
    logits = torch.tensor([3.0])
    target = torch.tensor([1.0])
    p = 1 / (1 + math.exp(-3.0))
    expected = 0.25 * (1 - p) ** 2 * -math.log(p)
    assert float(FocalLoss(gamma=2.0, alpha=0.25)(logits, target)) == pytest.approx(expected, rel=1e-5)
    # gamma=0 and no alpha is plain cross-entropy.
    assert float(FocalLoss(gamma=0.0, alpha=None)(logits, target)) == pytest.approx(-math.log(p), rel=1e-5)


def test_regression_losses_in_months():
    pred, target = torch.tensor([10.0, 30.0]), torch.tensor([12.0, 20.0])
    assert float(build_loss("l1")(pred, target)) == pytest.approx(6.0)
    # smooth L1 with beta=6: |2| < 6 -> 0.5*4/6; |10| >= 6 -> 10 - 3
    assert float(build_loss("smooth_l1")(pred, target)) == pytest.approx((0.5 * 4 / 6 + 7.0) / 2)


def test_bce_default_positive_weight_is_class_ratio():
    loss = build_loss("bce", n_positive=25, n_negative=75)
    assert float(loss.pos_weight) == pytest.approx(3.0)


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("hinge")
