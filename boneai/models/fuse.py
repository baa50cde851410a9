"""Inference-only copies of a network with each batch normalisation folded into its convolution.

In evaluation mode a ``BatchNorm2d`` that directly follows a ``Conv2d`` is an affine map per output
channel, so it can be merged into the convolution's weights and bias:
``w' = w * g / sqrt(v + eps)`` and ``b' = (b - m) * g / sqrt(v + eps) + beta``.
On the CPU the separate normalisation pass over every feature map costs about a quarter of an
EfficientNet-Lite forward pass; folded, the outputs agree with the original to float32 rounding.

The pairs are found by running the network once and recording which normalisation layer consumed
which convolution's output, so this works for any architecture built from standard modules (timm's
``BatchNormAct2d`` keeps its activation). A convolution whose output is used anywhere else as well
is left alone. The original model is not changed: Grad-CAM and training keep using it.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    >>> folded = fold_batchnorm(net, torch.zeros(1, 1, 8, 8))
    >>> x = torch.randn(2, 1, 8, 8)
    >>> bool(torch.allclose(net(x), folded(x), atol=1e-5))
    True
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["fold_batchnorm", "symmetric_same_padding", "inference_copy"]


def _run(model: nn.Module, example: torch.Tensor | tuple) -> torch.Tensor:
    with torch.no_grad():
        return model(*example) if isinstance(example, tuple) else model(example)


def _fold_pairs(model: nn.Module, example: torch.Tensor | tuple) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """(conv, bn) pairs where the bn's only input is the conv's output, consumed nowhere else."""
    produced: dict[int, tuple[nn.Conv2d, torch.Tensor]] = {}
    uses: dict[int, int] = {}
    pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d, int]] = []

    def on_conv(module, inputs, output):
        produced[id(output)] = (module, output)  # the tensor is held, so its id is not reused

    def count_use(module, inputs):
        for t in inputs:
            if isinstance(t, torch.Tensor) and id(t) in produced and produced[id(t)][1] is t:
                uses[id(t)] = uses.get(id(t), 0) + 1

    def on_bn(module, inputs, output):
        t = inputs[0]
        if id(t) in produced and produced[id(t)][1] is t:
            pairs.append((produced[id(t)][0], module, id(t)))

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(on_conv))
        if isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_hook(on_bn))
        if isinstance(m, nn.BatchNorm2d) or not list(m.children()):  # who consumed which conv output
            handles.append(m.register_forward_pre_hook(count_use))
    try:
        _run(model, example)
    finally:
        for h in handles:
            h.remove()
    seen: set[int] = set()
    result = []
    for conv, bn, key in pairs:
        # Skip a conv read by more than its bn, or a conv/bn met twice (a module reused in the graph).
        if uses.get(key, 0) != 1 or id(conv) in seen or id(bn) in seen:
            continue
        seen.update((id(conv), id(bn)))
        result.append((conv, bn))
    return result


def _replacement(bn: nn.BatchNorm2d) -> nn.Module:
    """What is left of a normalisation layer once folded: timm's activation (and dropout), or nothing."""
    act, drop = getattr(bn, "act", None), getattr(bn, "drop", None)
    rest = [m for m in (drop, act) if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]
    if not rest:
        return nn.Identity()
    return rest[0] if len(rest) == 1 else nn.Sequential(*rest)


def fold_batchnorm(model: nn.Module, example: torch.Tensor | tuple) -> nn.Module:
    """An evaluation-mode copy of ``model`` with conv -> batch-norm pairs merged (see the module doc).

    ``example`` is one input (or a tuple of inputs) the model accepts; a small one is enough. The
    copy's output on ``example`` is checked against the original's; should a convolution's output
    also feed an operation the hooks cannot see (a functional call), they would differ, and the
    unfolded copy is returned instead.
    """
    model = model.eval()
    reference = _run(model, example)
    folded = copy.deepcopy(model).eval()
    pairs = _fold_pairs(folded, example)
    names = {id(m): name for name, m in folded.named_modules()}
    for conv, bn in pairs:
        if bn.running_mean is None or bn.running_var is None or not bn.track_running_stats:
            continue
        with torch.no_grad():
            scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
            shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
            conv.bias = nn.Parameter((bias - bn.running_mean) * scale + shift, requires_grad=False)
        parent_name, _, attr = names[id(bn)].rpartition(".")
        parent = folded.get_submodule(parent_name) if parent_name else folded
        if isinstance(parent, (nn.Sequential, nn.ModuleList)) and attr.isdigit():
            parent[int(attr)] = _replacement(bn)
        else:
            setattr(parent, attr, _replacement(bn))
    for p in folded.parameters():
        p.requires_grad_(False)
    out = _run(folded, example)
    if not torch.allclose(out, reference, rtol=1e-3, atol=1e-3 * float(reference.abs().max().clamp(min=1.0))):
        plain = copy.deepcopy(model).eval()
        for p in plain.parameters():
            p.requires_grad_(False)
        return plain
    return folded


class _SymmetricSameConv(nn.Module):
    """TensorFlow "SAME" padding without padding the input.

    timm's ``Conv2dSame`` pads every input with ``F.pad`` (asymmetric: one more row and column at
    the bottom and right), which copies the whole feature map; for EfficientNet-Lite's strided
    depthwise convolutions that is about a tenth of the CPU forward pass. The same output comes from
    the convolution's own symmetric zero padding ``p = top + stride * c`` (the smallest ``c`` that
    also covers the bottom) followed by dropping the first ``c`` output rows (and columns): output
    row ``j`` then reads input rows from ``stride * j - p``, so row ``i + c`` is TensorFlow's row ``i``.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.dilation, self.groups = tuple(conv.stride), tuple(conv.dilation), conv.groups
        self.kernel_size = tuple(conv.kernel_size)

    @staticmethod
    def _plan(size: int, k: int, s: int, d: int) -> tuple[int, int, int]:
        out = math.ceil(size / s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        top, bottom = total // 2, total - total // 2
        c = math.ceil((bottom - top) / s) if bottom > top else 0
        return top + s * c, c, out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (ph, ch, oh), (pw, cw, ow) = (self._plan(n, k, s, d) for n, k, s, d in
                                      zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation))
        y = F.conv2d(x, self.weight, self.bias, self.stride, (ph, pw), self.dilation, self.groups)
        return y[:, :, ch:ch + oh, cw:cw + ow]


def symmetric_same_padding(model: nn.Module) -> nn.Module:
    """Replace timm's ``Conv2dSame`` modules of ``model`` (in place) by :class:`_SymmetricSameConv`."""
    targets = [(name, m) for name, m in model.named_modules() if type(m).__name__ == "Conv2dSame"]
    for name, conv in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, _SymmetricSameConv(conv))
    return model


def inference_copy(model: nn.Module, example: torch.Tensor | tuple) -> tuple[nn.Module, bool]:
    """The fastest equivalent copy of ``model`` for the CPU forward pass, and whether it differs
    from a plain copy: batch norms folded, TensorFlow "SAME" padding without the padding copy.
    Checked on ``example`` (an input the model accepts) against the original; a copy that does not
    match is never returned."""
    model = model.eval()
    reference = _run(model, example)
    fast = fold_batchnorm(model, example)
    changed = sum(isinstance(m, nn.BatchNorm2d) for m in fast.modules()) < \
        sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    padded = symmetric_same_padding(copy.deepcopy(fast))
    out = _run(padded, example)
    if out.shape == reference.shape and torch.allclose(
            out, reference, rtol=1e-3, atol=1e-3 * float(reference.abs().max().clamp(min=1.0))):
        fast, changed = padded, changed or any(isinstance(m, _SymmetricSameConv) for m in padded.modules())
    return fast, changed
