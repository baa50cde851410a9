"""Option sets defined once, as dataclasses with help text, and the argparse flags generated from them.

This module imports nothing else of ours and nothing heavy, so the command line can build its parser
without loading torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass

__all__ = ["LocaliserConfig", "add_config_arguments", "option"]


def option(default, help: str, required: bool = False):  # noqa: A002 - argparse's word
    """A config field with its help text (and whether the command line must give it)."""
    return dataclasses.field(default=default, metadata={"help": help, "required": required})


def add_config_arguments(parser: argparse.ArgumentParser, config_type: type) -> None:
    """Generate one ``--option`` flag per field of ``config_type``, with its type, default and help."""
    hints = typing.get_type_hints(config_type)
    for f in dataclasses.fields(config_type):
        kind = hints[f.name]
        base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
        flag = "--" + f.name.replace("_", "-")
        required = bool(f.metadata.get("required"))
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, dest=f.name,
                                help=f.metadata.get("help", ""))
            continue
        parser.add_argument(flag, type=base, default=None if required else f.default, required=required,
                            dest=f.name, help=f.metadata.get("help", ""))


@dataclass
class LocaliserConfig:
    """Options of ``python -m boneai train-localiser``."""

    data: str = option("", "FracAtlas folder (dataset.csv, images/, fracture_masks_coco.json)", required=True)
    out: str = option("", "output folder, e.g. runs/localiser", required=True)
    split: str = option("weights/splits/fracatlas.csv", "split file (image_id, group, split) from `python -m boneai split`")
    init_from: str = option("weights/fracture", "fracture classifier folder whose EfficientNet-Lite encoder starts the network")
    continue_from: typing.Optional[str] = option(
        None, "a train-localiser run whose whole network starts this one (a second stage, e.g. at a lower learning "
              "rate); it is also the first candidate, so the stage never ends worse than it started")
    image_size: int = option(384, "input square in pixels")
    epochs: int = option(12, "passes over the fractured training images")
    batch_size: int = option(16, "images per step")
    lr: float = option(1e-3, "learning rate of the decoder and heads (AdamW, one-cycle)")
    encoder_lr: float = option(2e-4, "learning rate of the pretrained encoder")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    freeze_blocks: int = option(3, "keep the encoder's stem and first N blocks fixed (weights and batch-norm statistics)")
    negatives_per_positive: float = option(1.0, "normal images drawn afresh each epoch per fractured image")
    cls_weight: float = option(0.5, "weight of the image-level loss beside the map loss")
    box_threshold: float = option(0.5, "map threshold for the validation figures printed each epoch")
    seed: int = option(0, "random seed")
    max_minutes: typing.Optional[float] = option(None, "wall-clock budget; stops before an epoch that would overrun it")
    limit: typing.Optional[int] = option(None, "use only N training images (quick runs)")
    threads: int = option(0, "torch threads (0: torch's default)")
