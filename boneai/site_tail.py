"""Fine-tuning the last block of a parent classifier on a site's radiographs (``adapt``'s
``finetune_blocks`` candidate).

Only the network's tail learns: its last ``TAIL_BLOCKS`` stage(s) of MBConv blocks, the final
1 x 1 convolution with its batch norm, and the linear head. Everything before the tail is fixed, so
each image's activations at the tail's input are computed once (for the image and its mirror) and
cached; a fine-tuning run then costs only the tail's forward and backward passes, a few seconds on
two CPU cores for ~100 images. Batch-norm statistics stay the parent's (too few site images to
re-estimate them). Training: Adam at :data:`TAIL_LR`, mini-batches of 16, class-balanced BCE, each
image seen as itself or its mirror at random; the logit is the mean over image and mirror, as the
parent's mirror-averaged features give.

Example:
    >>> from boneai.inference import load_model
    >>> import torch
    >>> pred = load_model("fracture_fast")
    >>> tail = Tail(pred.model)
    >>> x = torch.zeros(1, 3, 224, 224)
    >>> torch.allclose(tail(trunk_forward(pred.model, x)), pred.model(x)[:, 0], atol=1e-4)
    True
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from boneai.errors import BoneAIError

__all__ = ["TAIL_BLOCKS", "TAIL_EPOCHS", "TAIL_INNER_FOLDS", "TAIL_LR", "Tail", "trunk_forward", "tail_inputs", "train_tail"]

#: Stages of MBConv blocks fine-tuned (the last one: for EfficientNet-Lite0 one block, 192 -> 320 channels).
TAIL_BLOCKS = 1
#: Epochs compared by inner cross-validation (checkpoints of one run). On the simulated site (five
#: halvings of bench/site_adapt.py's site, docs/site_adaptation.md) 10 epochs at 1e-4 did best.
TAIL_EPOCHS = (3, 6, 12)
TAIL_LR = 1e-4
#: Inner folds for the epochs (fewer than the probes' five: each fold is a fine-tuning run).
TAIL_INNER_FOLDS = 3
TAIL_BATCH = 16
_PARTS = ("conv_head", "bn2", "global_pool", "classifier")


def _check(model: nn.Module) -> None:
    if not all(hasattr(model, p) for p in ("conv_stem", "bn1", "blocks", *_PARTS)):
        raise BoneAIError("Block fine-tuning needs an EfficientNet-style classifier (timm: conv_stem, blocks, "
                          "conv_head, classifier).")


def trunk_forward(model: nn.Module, x: torch.Tensor, n_blocks: int = TAIL_BLOCKS) -> torch.Tensor:
    """The fixed part of the network: stem and every block stage but the last ``n_blocks``."""
    _check(model)
    x = model.bn1(model.conv_stem(x))
    for stage in list(model.blocks)[:-n_blocks]:
        x = stage(x)
    return x


class Tail(nn.Module):
    """A trainable copy of a classifier's last ``n_blocks`` block stages, final convolution and head.

    ``state_for_parent()`` gives its weights under the parent network's own keys, so they can replace
    the parent's in a saved model.
    """

    def __init__(self, model: nn.Module, n_blocks: int = TAIL_BLOCKS) -> None:
        super().__init__()
        _check(model)
        n_stages = len(model.blocks)
        if not 0 < n_blocks < n_stages:
            raise BoneAIError(f"Cannot fine-tune the last {n_blocks} of {n_stages} block stages.")
        self.first = n_stages - n_blocks
        self.blocks = copy.deepcopy(nn.Sequential(*list(model.blocks)[self.first:]))
        for name in _PARTS:
            setattr(self, name, copy.deepcopy(getattr(model, name)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv_head(self.blocks(x)))
        return self.classifier(self.global_pool(x).flatten(1))[:, 0]

    def state_for_parent(self) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in self.state_dict().items():
            head, _, rest = key.partition(".")
            if head == "blocks":
                index, _, rest = rest.partition(".")
                key = f"blocks.{int(index) + self.first}.{rest}"
            out[key] = value.detach().clone()
        return out

    def train(self, mode: bool = True) -> "Tail":
        """Training mode keeps every batch norm in evaluation mode (the parent's statistics)."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self


def tail_inputs(model: nn.Module, batch: torch.Tensor, n_blocks: int = TAIL_BLOCKS) -> np.ndarray:
    """(N, 2, C, H, W) float16 activations at the tail's input, of each image and its mirror."""
    with torch.inference_mode():
        n = batch.shape[0]
        x = torch.cat([batch, torch.flip(batch, dims=[3])]).to(memory_format=torch.channels_last)
        acts = trunk_forward(model, x, n_blocks).float()
    return torch.stack([acts[:n], acts[n:]], dim=1).half().numpy()


def tail_logits(tail: Tail, acts: np.ndarray) -> np.ndarray:
    """Mirror-averaged logits of cached activations (N, 2, C, H, W)."""
    tail.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(acts), 64):
            a = torch.from_numpy(acts[i:i + 64].astype(np.float32))
            n = a.shape[0]
            z = tail(a.flatten(0, 1).contiguous(memory_format=torch.channels_last)).reshape(n, 2)
            out.append(z.mean(dim=1).double().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def train_tail(model: nn.Module, acts: np.ndarray, y: np.ndarray, checkpoints: Sequence[int],
               score_acts: np.ndarray | None = None, seed: int = 0,
               n_blocks: int = TAIL_BLOCKS) -> tuple[Tail, dict[int, np.ndarray]]:
    """Fine-tune a tail of ``model`` on cached activations for ``max(checkpoints)`` epochs.

    Returns the tail after the last epoch and, for each checkpoint epoch, the logits of
    ``score_acts`` at that epoch (empty when ``score_acts`` is None).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tail = Tail(model, n_blocks).float().to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(tail.parameters(), lr=TAIL_LR)
    yt = torch.tensor(y, dtype=torch.float32)
    pos = float(yt.mean())
    weights = torch.where(yt > 0, 0.5 / max(pos, 1e-6), 0.5 / max(1 - pos, 1e-6))
    scores: dict[int, np.ndarray] = {}
    for epoch in range(1, max(checkpoints) + 1):
        tail.train()
        order = rng.permutation(len(y))
        for start in range(0, len(order), TAIL_BATCH):
            idx = order[start:start + TAIL_BATCH]
            side = rng.integers(0, 2, len(idx))
            x = torch.from_numpy(acts[idx, side].astype(np.float32)).contiguous(memory_format=torch.channels_last)
            loss = nn.functional.binary_cross_entropy_with_logits(tail(x), yt[idx], weight=weights[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch in checkpoints and score_acts is not None:
            scores[epoch] = tail_logits(tail, score_acts)
    return tail.eval(), scores
