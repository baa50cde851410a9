"""Option sets defined once, as dataclasses with help text, and the argparse flags generated from them.

Each option is a dataclass field made with :func:`option`: its default, help text and how the command
line spells it (flag name, choices, metavar) are written there and nowhere else. From the dataclass,
:func:`add_config_arguments` generates the flags, :func:`config_from_args` builds the config back from
the parsed flags (and, for commands with ``--config FILE``, from a JSON file), and :func:`config_argv`
writes a config as the equivalent flags, for the command recorded in a model card.

This module imports nothing else of ours and nothing heavy, so the command line can build its parser
without loading torch.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_config_arguments(parser, TrainConfig, config_file=True)
    >>> cfg = config_from_args(TrainConfig, parser.parse_args(["--data", "d", "--out", "o", "--no-crop"]))
    >>> (cfg.model, cfg.crop, cfg.epochs)
    ('efficientnet_lite0', False, 30)
    >>> config_argv(cfg)
    ['--data', 'd', '--model', 'efficientnet_lite0', '--out', 'o', '--no-crop']
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LocaliserConfig", "TrainConfig", "TRAIN_TASKS", "DEFAULT_ARCHITECTURES", "add_config_arguments",
           "check_config", "config_argv", "config_from_args", "config_from_dict", "config_to_dict", "option",
           "option_help"]


def option(default, help: str, required: bool = False, *,  # noqa: A002 - argparse's word
           flag: str | None = None, choices: typing.Sequence[str] | None = None, metavar: str | None = None,
           command_line: bool = True):
    """A config field with its help text and how the command line spells it.

    Args:
        default: the value when neither a flag nor a config file gives one.
        help: the flag's help text.
        required: the command line must give it (a flag, or the ``--config`` file).
        flag: the flag's name when it is not ``--field-name``. A ``bool`` option is one switch that
            sets the opposite of its default: ``--name`` when the default is False, ``--no-name`` when
            it is True, unless ``flag`` names it otherwise (``--fp32``).
        choices: the allowed values.
        metavar: the value's name in the help text.
        command_line: False for a recorded field the command sets itself (no flag, not read from files).
    """
    metadata: dict[str, Any] = {"help": help, "required": required, "command_line": command_line}
    if flag is not None:
        metadata["flag"] = flag
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if metavar is not None:
        metadata["metavar"] = metavar
    return dataclasses.field(default=default, metadata=metadata)


def _options(config_type: type) -> list[tuple[dataclasses.Field, type, bool]]:
    """The command-line fields of ``config_type``: (field, base type, whether None is allowed)."""
    hints = typing.get_type_hints(config_type)
    out = []
    for f in dataclasses.fields(config_type):
        if not f.metadata.get("command_line", True):
            continue
        kind = hints[f.name]
        args = typing.get_args(kind)
        base = next((a for a in args if a is not type(None)), kind)
        out.append((f, base, type(None) in args))
    return out


def _flag(f: dataclasses.Field, base: type) -> str:
    if "flag" in f.metadata:
        return f.metadata["flag"]
    name = f.name.replace("_", "-")
    return f"--no-{name}" if base is bool and f.default is True else f"--{name}"


def option_help(config_type: type, name: str) -> str:
    """The help text of one option (for a form beside the command line)."""
    return next(f.metadata.get("help", "") for f in dataclasses.fields(config_type) if f.name == name)


def add_config_arguments(parser: argparse.ArgumentParser, config_type: type, config_file: bool = False) -> None:
    """Generate one flag per option of ``config_type``, with its type, default, choices and help.

    With ``config_file`` the parser also takes ``--config FILE`` (a JSON object of options; flags
    given on the command line override its values), and the parsed namespace holds only the options
    given as flags: read it with :func:`config_from_args`, which also checks the required ones.
    """
    if config_file:
        parser.add_argument("--config", default=None, metavar="FILE",
                            help="a JSON file of these options (e.g. the config.json of a training job); "
                                 "options given as flags override its values")
    for f, base, _ in _options(config_type):
        flag, help_text = _flag(f, base), f.metadata.get("help", "")
        required = bool(f.metadata.get("required"))
        default = argparse.SUPPRESS if config_file else f.default
        if base is bool:
            parser.add_argument(flag, action="store_const", const=not f.default, default=default, dest=f.name,
                                help=help_text)
            continue
        parser.add_argument(flag, type=base, default=None if required and not config_file else default,
                            required=required and not config_file, dest=f.name, help=help_text,
                            choices=f.metadata.get("choices"), metavar=f.metadata.get("metavar"))


def _check_value(f: dataclasses.Field, base: type, nullable: bool, value: Any, source: str) -> Any:
    """``value`` for field ``f`` as read from JSON, checked (and an int widened to float)."""
    if value is None:
        if nullable:
            return None
        raise ValueError(f"{source}: {f.name} cannot be null")
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ValueError(f"{source}: {f.name} must be {base.__name__}, not {type(value).__name__} ({value!r})")
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ValueError(f"{source}: {f.name} {value!r} is not one of {', '.join(map(str, choices))}")
    return value


def config_from_dict(config_type: type, data: typing.Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """The options in ``data`` (e.g. a ``config.json``), checked for names, types and choices.

    Fields the command sets itself (``command``) are skipped, so the ``training.config`` of a model
    card can be read back as it is. Raises ``ValueError`` naming ``source`` and the option.
    """
    if not isinstance(data, typing.Mapping):
        raise ValueError(f"{source}: expected a JSON object of options")
    options = {f.name: (f, base, nullable) for f, base, nullable in _options(config_type)}
    recorded = {f.name for f in dataclasses.fields(config_type)} - set(options)
    unknown = sorted(set(data) - set(options) - recorded)
    if unknown:
        raise ValueError(f"{source}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
    return {k: _check_value(*options[k], v, source) for k, v in data.items() if k in options}


def check_config(config: Any) -> None:
    """Raise ``ValueError`` when an option of ``config`` has a value outside its type or choices."""
    for f, base, nullable in _options(type(config)):
        _check_value(f, base, nullable, getattr(config, f.name), type(config).__name__)


def config_from_args(config_type: type, args: argparse.Namespace, **recorded: Any):
    """The config of a parsed command line: defaults, then the ``--config`` file, then the flags given.

    ``recorded`` sets the fields the command fills in itself (``command``). Raises ``ValueError``
    when a required option is given neither as a flag nor in the file.
    """
    values: dict[str, Any] = {}
    path = getattr(args, "config", None)
    if path:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc})") from None
        values.update(config_from_dict(config_type, data, source=str(path)))
    options = _options(config_type)
    values.update({f.name: getattr(args, f.name) for f, _, _ in options if hasattr(args, f.name)})
    missing = [_flag(f, base) for f, base, _ in options if f.metadata.get("required") and f.name not in values]
    if missing:
        raise ValueError(f"the following arguments are required: {', '.join(missing)}"
                         + (f" (neither given as flags nor in {path})" if path else ""))
    config = config_type(**values, **recorded)
    check_config(config)
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    """The options of ``config`` as a JSON-ready dict (what ``--config FILE`` reads)."""
    return {f.name: getattr(config, f.name) for f, _, _ in _options(type(config))}


def config_argv(config: Any) -> list[str]:
    """The flags that give ``config`` on the command line: the required options and every one that
    differs from its default, in field order. Parsing them gives ``config`` back."""
    argv: list[str] = []
    for f, base, _ in _options(type(config)):
        value = getattr(config, f.name)
        if value == f.default and not f.metadata.get("required"):
            continue
        flag = _flag(f, base)
        if base is bool:
            argv.append(flag)  # a switch: present exactly when the value differs from the default
        elif value is None:
            raise ValueError(f"{f.name}=None cannot be written as a flag (its default is {f.default!r})")
        else:
            argv += [flag, repr(value) if isinstance(value, float) else str(value)]
    return argv


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
    epochs: int = option(12, "passes over the fractured training images (0 with --continue-from: keep the starting network)")
    batch_size: int = option(16, "images per step")
    lr: float = option(1e-3, "learning rate of the decoder and heads (AdamW, one-cycle)")
    encoder_lr: float = option(2e-4, "learning rate of the pretrained encoder")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    freeze_blocks: int = option(3, "keep the encoder's stem and first N blocks fixed (weights and batch-norm statistics)")
    negatives_per_positive: float = option(1.0, "normal images drawn afresh each epoch per fractured image")
    cls_weight: float = option(0.5, "weight of the image-level loss beside the map loss")
    box_threshold: float = option(0.5, "map threshold for the validation figures printed each epoch")
    centre_head: bool = option(False, "also learn a box-centre heatmap and box sizes (CenterNet-style), "
                                      "so that every heatmap peak is a box with its own score")
    classifier_head: bool = option(False, "take the image logit from the --init-from classifier's own later blocks and "
                                          "head, beside the localiser's (see --shared-blocks): they and the shared "
                                          "blocks stay fixed, and one forward pass gives the classifier's logit and the boxes")
    shared_blocks: typing.Optional[int] = option(
        None, "with --classifier-head: encoder blocks the two branches share (fixed, the classifier's); the later "
              "blocks are the localiser's own, trained at --encoder-lr, beside the classifier's (default: all shared)")
    classifier_input_size: typing.Optional[int] = option(
        None, "with --classifier-head: the classifier's input square (default: its card's); at a larger --image-size "
              "the shared features are resized to their size at that input before the classifier's branch")
    tune_classifier_branch: bool = option(
        False, "with --classifier-head: train only the classifier's own later blocks and head (batch-norm statistics "
               "fixed) on the image labels, at this --image-size through the resize; the shared blocks and the "
               "localiser's branch stay fixed, so the boxes do not change. Epochs are kept by validation image AUC, "
               "and --lr is that branch's learning rate")
    seed: int = option(0, "random seed")
    max_minutes: typing.Optional[float] = option(None, "wall-clock budget; stops before an epoch that would overrun it")
    limit: typing.Optional[int] = option(None, "use only N training images (quick runs)")
    threads: int = option(0, "torch threads (0: torch's default)")


#: Candidates of ``python -m boneai adapt`` (``boneai.site``), simplest first.
ADAPT_METHODS = ("recalibrate", "finetune_head", "finetune_blocks", "linear_probe", "multi_probe", "multi_probe_parent",
                 "bn_recalibrate", "bn_linear_probe", "bn_multi_probe_parent")

#: Tasks of ``python -m boneai train``, and the architecture each trains when ``--model`` is not given.
TRAIN_TASKS = ("fracture", "boneage", "anomaly")
DEFAULT_ARCHITECTURES = {"fracture": "efficientnet_lite0", "boneage": "boneage_lite0", "anomaly": "cae"}
# The names of the optimiser and scheduler factories in boneai.train and of boneai.losses.build_loss;
# written here too so the parser needs no torch (tests hold the two lists equal).
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("onecycle", "cosine", "plateau", "none")
LOSSES = ("bce", "weighted_bce", "focal", "l1", "smooth_l1", "masked_mse")


@dataclass
class TrainConfig:
    """Options of ``python -m boneai train``: everything a training run depends on, recorded verbatim
    in the model card (``training.config``)."""

    task: str = option("fracture", "what to train", choices=TRAIN_TASKS)
    data: str = option("", "FracAtlas, image-folder or bone-age folder", required=True)
    model: str | None = option(
        None, "registered architecture (see `python -m boneai models`); default: "
              + ", ".join(f"{arch} ({task})" for task, arch in DEFAULT_ARCHITECTURES.items()))
    out: str = option("runs/model", "output folder, e.g. weights/NAME", required=True)
    epochs: int = option(30, "passes over the training images")
    image_size: int | None = option(None, "input square in pixels (default: the architecture's)")
    batch_size: int = option(32, "images per step")
    lr: float = option(1e-3, "learning rate (the peak of the one-cycle schedule)")
    weight_decay: float = option(1e-4, "weight decay")
    optimizer: str = option("adamw", "optimiser (sgd: Nesterov momentum 0.9)", choices=OPTIMIZERS)
    scheduler: str = option("onecycle", "learning-rate schedule (plateau: x0.3 after 2 epochs without progress)",
                            choices=SCHEDULERS)
    loss: str | None = option(None, "loss (default: bce for fracture, l1 for boneage)", choices=LOSSES)
    augment: str = option("strong", "training augmentation (strong: random crops, zoom, rotation, flips, "
                          "gamma/contrast, CLAHE at random, noise; basic: flips and small rotations)",
                          choices=("none", "basic", "strong"))
    crop: bool = option(True, "skip the Otsu crop to the image content")
    clahe: bool = option(False, "CLAHE (clip 2.0, 8x8) in the input pipeline")
    weighted_sampler: bool = option(False, "inverse-frequency class sampling")
    val_fraction: float = option(0.2, "share of the images held out for validation (stratified)")
    seed: int = option(0, "random seed (also chooses the validation split)")
    patience: int = option(10, "early stopping: epochs without a better validation score")
    max_minutes: float | None = option(
        None, "wall-clock budget; training stops before an epoch that would overrun it")
    limit: int | None = option(None, "use only N images (quick runs)")
    workers: int = option(0, "data-loader worker processes")
    device: str = option("auto", "auto, cpu or cuda")
    resume: bool = option(True, "ignore checkpoint_last.pt in --out")
    tta: bool = option(True, "no mirror test-time augmentation at validation")
    fp16_weights: bool = option(True, "save float32 weights instead of float16", flag="--fp32")
    pretrained: bool = option(True, "do not load ImageNet weights", flag="--from-scratch")
    freeze_blocks: int = option(0, "EfficientNet: freeze stem + first N blocks (about 2x faster on a CPU)")
    init_from: str | None = option(
        None, "fine-tune a trained model folder of the same architecture, e.g. at a higher --image-size; it "
              "must not have trained on this run's validation images (a model of other data is fine)",
        metavar="MODEL_DIR")
    init_member: int | None = option(
        None, "with an ensemble as --init-from: start from its member K (0-based)", metavar="K")
    distill_from: str | None = option(
        None, "knowledge distillation: train towards this model's outputs (a single model or an ensemble that "
              "never trained on this run's validation images), e.g. a smaller, faster student", metavar="MODEL_DIR")
    distill_weight: float = option(0.5, "share of the teacher's output in the training target (default 0.5)")
    region: str | None = option(None, "anomaly task: only this body region (e.g. hand)")
    command: str = option("", "the command that started the run (recorded in the card)", command_line=False)

    def __post_init__(self) -> None:
        if self.model is None:  # the task's default architecture, so the card names what was trained
            self.model = DEFAULT_ARCHITECTURES.get(self.task)
