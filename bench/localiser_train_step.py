"""One localiser training step on the CPU, standard layout against channels-last.

    .venv/bin/python bench/localiser_train_step.py

Forward, loss, backward and AdamW step of the FPN localiser (EfficientNet-Lite0 encoder, stem and
first three blocks frozen, as ``train-localiser`` trains it) on a batch of 16 random images, three
times per setting; prints the seconds per step. Wall clock: run it on an otherwise idle machine.
"""

from __future__ import annotations

import time

import torch

from boneai.localisation import FractureLocaliser, _loss


def main() -> None:
    torch.set_num_threads(2)
    model = FractureLocaliser(0)
    for module in model.frozen_modules(3):
        module.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-4)
    for size, channels_last in [(384, False), (384, True), (320, True)]:
        x = torch.randn(16, 3, size, size)
        net = model
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            net = model.to(memory_format=torch.channels_last)
        masks, labels = torch.zeros(16, 1, size // 4, size // 4), torch.zeros(16)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            mask_logits, image_logits = net(x)
            loss = _loss(mask_logits, image_logits, masks, labels, 0.5)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t)
        print(f"{size} px, channels_last={channels_last}: " + ", ".join(f"{t:.2f} s" for t in times), flush=True)


if __name__ == "__main__":
    main()
