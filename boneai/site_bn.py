"""Site batch-norm statistics: a network's batch norms re-estimated on a site's own radiographs.

Li et al., "Revisiting Batch Normalization for Practical Domain Adaptation" (AdaBN, 2016): a
network's learned weights carry what it knows about the task, and its batch-norm statistics carry
what its training images looked like. Re-estimating only the statistics on the new site's images
(no labels used) removes much of a shift in the imaging chain: contrast curve, sharpening, noise,
resolution. On the simulated site of ``bench/site_adapt.py`` the parent's AUC on held-out images
rose from 0.58-0.70 to 0.74-0.82 in three random halvings (``docs/site_adaptation.md``).

``adapt`` offers it as a step before its candidates (``bn_recalibrate``, ``bn_linear_probe``,
``bn_multi_probe_parent``): inside cross-validation, the statistics come from each training part
only, so the out-of-fold figures never see the statistics of the images they score.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)).eval()
    >>> adapted = site_batchnorm(net, [torch.full((4, 1, 3, 3), 5.0) + torch.randn(4, 1, 3, 3)])
    >>> bool((adapted[1].running_mean != net[1].running_mean).all())
    True
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from boneai.errors import BoneAIError

__all__ = ["site_batchnorm", "batchnorm_buffers"]


def _norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def site_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], mirror: bool = True) -> nn.Module:
    """A copy of ``model`` (float32, evaluation mode) whose batch-norm running statistics are the
    average over ``batches`` (and their mirror images with ``mirror``, as the site features are
    mirror-averaged). The weights are untouched; ``model`` itself is not changed.

    Raises:
        BoneAIError: the network has no batch norms, or no images were given.
    """
    adapted = copy.deepcopy(model).float().eval()
    norms = _norms(adapted)
    if not norms:
        raise BoneAIError("This network has no batch norms to re-estimate on the site's images.")
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over every batch, not an exponential one
        bn.train()  # only the norms: dropout and the rest stay in evaluation mode
    seen = 0
    with torch.no_grad():
        for batch in batches:
            batch = batch.float().contiguous(memory_format=torch.channels_last)
            adapted(batch)
            if mirror:
                adapted(torch.flip(batch, dims=[3]))
            seen += len(batch)
    if not seen:
        raise BoneAIError("No site images to re-estimate the batch-norm statistics on.")
    return adapted.eval()


def batchnorm_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The running statistics of every batch norm, by state-dict key (what a site model stores)."""
    names = {id(m): name for name, m in model.named_modules()}
    out = {}
    for bn in _norms(model):
        for buf in ("running_mean", "running_var", "num_batches_tracked"):
            value = getattr(bn, buf)
            if value is not None:
                out[f"{names[id(bn)]}.{buf}"] = value.detach().clone()
    return out
