"""Model cards: the typed, frozen form of ``weights/<name>/card.json``.

A model folder holds ``card.json`` (everything a prediction needs: architecture, pipeline,
normalisation, calibration, operating points, figures, provenance) and ``model.safetensors``.
:class:`ModelCard` reads that file into frozen parts with each default written once below. Keys
this module does not know stay in each part's ``extra`` mapping, in their place, so every card on
disk loads and re-serialises unchanged: ``ModelCard.from_dict(d).to_dict() == d``, key order
included. The pattern is timm's ``PretrainedCfg``.

This module imports nothing else of ``boneai`` (the standard library only), so every other module,
the pages and scripts can use it without pulling in torch.

Example:
    >>> card = ModelCard.from_dict({"name": "m", "task": "fracture", "architecture": "resnet18",
    ...                             "operating_points": {"balanced": {"threshold": 0.4}}, "note": "kept"})
    >>> card.weights_file, card.default_operating_point, card.thresholds, card.model_kind
    ('model.safetensors', 'balanced', {'balanced': 0.4}, 'classifier')
    >>> card.extra["note"], card.to_dict() == ModelCard.from_json(card.to_json()).to_dict()
    ('kept', True)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Iterator

__all__ = [
    "CARD_FILE",
    "WEIGHTS_FILE",
    "DEFAULT_OPERATING_POINT",
    "DEFAULT_TEMPERATURE",
    "DEFAULT_LOGIT_OFFSET",
    "DEFAULT_REGION_THRESHOLD",
    "MODEL_KINDS",
    "Step",
    "OperatingPoint",
    "Calibration",
    "Figures",
    "Training",
    "Member",
    "AnomalyScore",
    "ImageScore",
    "ModelCard",
    "validation_split_key",
    "card_split_key",
]

#: The card's file name in a model folder.
CARD_FILE = "card.json"
#: The weights' file name when the card names none.
WEIGHTS_FILE = "model.safetensors"
#: The operating point used when the caller and the card name none.
DEFAULT_OPERATING_POINT = "balanced"
#: Calibration ``p = sigmoid(logit / temperature + logit_offset)`` when the card has none: the identity.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_LOGIT_OFFSET = 0.0
#: A localiser's map threshold that outlines box regions, when its card has none.
DEFAULT_REGION_THRESHOLD = 0.3
#: What ``ModelCard.model_kind`` can be: the key of the loader that builds the model.
MODEL_KINDS = ("classifier", "ensemble", "anomaly", "localiser", "site_probe")

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _freeze(value: Any) -> Any:
    """JSON data made immutable: objects become read-only mappings, arrays tuples."""
    if isinstance(value, _Part):
        return value
    if isinstance(value, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    """The plain JSON form (dicts and lists, fresh copies) of a frozen value or part."""
    if isinstance(value, _Part):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_thaw(v) for v in value]
    return value


# -- how a field is read from JSON ------------------------------------------------------------------
def _part(cls: type) -> Callable[[Any], Any]:
    return lambda v: None if v is None else cls.from_dict(v)


def _parts(cls: type) -> Callable[[Any], Any]:
    return lambda v: None if v is None else tuple(cls.from_dict(x) for x in _as_list(v, cls.__name__))


def _part_map(cls: type) -> Callable[[Any], Any]:
    return lambda v: None if v is None else MappingProxyType(
        {k: cls.from_dict(x) for k, x in _as_mapping(v, cls.__name__).items()})


def _as_mapping(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"model card: {what} should be a JSON object, not {type(value).__name__}")
    return value


def _as_list(value: Any, what: str) -> list[Any] | tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"model card: {what} should be a JSON array, not {type(value).__name__}")
    return value


def _key(name: str, load: Callable[[Any], Any] | None = None, **kw: Any) -> Any:
    """A field stored under JSON key ``name`` (read with ``load``, else frozen as it is)."""
    return field(metadata={"key": name, "load": load}, **kw)


@dataclass(frozen=True)
class _Slot:
    attr: str
    key: str
    load: Callable[[Any], Any]
    default: Any


@dataclass(frozen=True, kw_only=True)
class _Part:
    """A JSON object read into typed fields; the keys it does not know stay in ``extra``.

    ``key_order`` is the order of the keys as read, so that :meth:`to_dict` writes them back in
    place. A field is written when the JSON had its key or its value differs from the default.
    """

    extra: Mapping[str, Any] = field(default_factory=lambda: _EMPTY, repr=False)
    key_order: tuple[str, ...] = field(default=(), repr=False, compare=False)

    _slots_cache: ClassVar[dict[type, tuple[_Slot, ...]]] = {}

    @classmethod
    def _slots(cls) -> tuple[_Slot, ...]:
        if cls not in _Part._slots_cache:
            slots = []
            for f in dataclasses.fields(cls):
                if f.name in ("extra", "key_order") or not f.init or f.metadata.get("skip"):
                    continue
                default = f.default if f.default is not dataclasses.MISSING else (
                    f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
                slots.append(_Slot(f.name, f.metadata.get("key") or f.name, f.metadata.get("load") or _freeze, default))
            _Part._slots_cache[cls] = tuple(slots)
        return _Part._slots_cache[cls]

    @classmethod
    def _read(cls, d: Mapping[str, Any], known: set[str]) -> dict[str, Any]:
        """Extra constructor arguments from keys the generic slots do not cover (a hook)."""
        return {}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **kwargs: Any) -> Any:
        """The part of a JSON object (itself when it already is one)."""
        if isinstance(d, cls):
            return d
        d = _as_mapping(d, cls.__name__)
        values: dict[str, Any] = {}
        known: set[str] = set()
        for s in cls._slots():
            if s.key in d:
                values[s.attr] = s.load(d[s.key])
                known.add(s.key)
        values.update(cls._read(d, known))
        extra = {k: _freeze(v) for k, v in d.items() if k not in known}
        return cls(**values, **kwargs, extra=MappingProxyType(extra), key_order=tuple(d))

    def _written(self) -> dict[str, Any]:
        """JSON key -> frozen value of every typed field that is written (see the class note)."""
        present = set(self.key_order)
        out = {}
        for s in self._slots():
            value = getattr(self, s.attr)
            if s.key in present or value != s.default:
                out[s.key] = value
        return out

    def _items(self) -> dict[str, Any]:
        """Everything written, in the order read (then new fields, then new extra keys)."""
        typed = self._written()
        out: dict[str, Any] = {}
        for k in self.key_order:
            if k in typed:
                out[k] = typed[k]
            elif k in self.extra:
                out[k] = self.extra[k]
        for k, v in typed.items():
            out.setdefault(k, v)
        for k, v in self.extra.items():
            out.setdefault(k, v)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (plain dicts and lists, a fresh copy)."""
        return {k: _thaw(v) for k, v in self._items().items()}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


# -- the parts --------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Step(_Part):
    """One preprocessing step: ``{"step": name, "params": {...}}`` (see ``boneai.preprocess``)."""

    step: str = ""
    params: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)

    def spec(self) -> dict[str, Any]:
        """The step in the pipeline format ``boneai.preprocess`` runs (a plain dict)."""
        return self.to_dict()


@dataclass(frozen=True, kw_only=True)
class OperatingPoint(_Part):
    """A named decision threshold with its figures where they were measured."""

    threshold: float = 0.0
    sensitivity: float | None = None
    specificity: float | None = None
    ppv: float | None = None
    npv: float | None = None


@dataclass(frozen=True, kw_only=True)
class Calibration(_Part):
    """``p = sigmoid(logit / temperature + logit_offset)``. On disk these are the card's top-level
    ``temperature``, ``logit_offset`` and ``calibration`` (the formula in words) keys."""

    temperature: float = DEFAULT_TEMPERATURE
    logit_offset: float = DEFAULT_LOGIT_OFFSET
    description: str | None = _key("calibration", default=None)


@dataclass(frozen=True, kw_only=True)
class Figures(_Part):
    """Figures on a split (``validation``, ``test``): classifier, regressor or anomaly metrics."""

    n: int | None = None
    n_positive: int | None = None
    auc: float | None = None
    auc_ci95: tuple[float, float] | None = None
    ap: float | None = None
    ece: float | None = None
    mae: float | None = None
    rmse: float | None = None
    bias: float | None = None
    pearson_r: float | None = None
    per_region: tuple[Mapping[str, Any], ...] | None = None
    command: str | None = None  # test figures: the evaluate command that measured them
    note: str | None = None


@dataclass(frozen=True, kw_only=True)
class Training(_Part):
    """How the model was trained: commands, configuration (``TrainConfig`` as a dict), history."""

    command: str | None = None
    commands: tuple[str, ...] | None = None
    config: Mapping[str, Any] | None = None
    history: tuple[Mapping[str, Any], ...] | None = None
    n_train: int | None = None
    n_val: int | None = None
    epochs_run: int | None = None
    train_seconds: float | None = None

    @property
    def all_commands(self) -> list[str | None]:
        """Every command that contributed (``commands``, else the one ``command``)."""
        return list(self.commands) if self.commands is not None else [self.command]


@dataclass(frozen=True, kw_only=True)
class Member(_Part):
    """One model of an ensemble: its own architecture, input, pipeline, provenance and figures."""

    architecture: str | None = None
    input_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    pipeline: tuple[Step, ...] = _key("pipeline", _parts(Step), default=())
    tta_hflip: bool = False
    description: str | None = None
    initial_weights: str | None = None
    weights_dtype: str | None = None
    prefix: str = ""  # its tensors' key prefix in the ensemble's weights file
    source: str | None = None
    commands: tuple[str | None, ...] | None = None
    epochs_run: int | None = None
    train_seconds: float | None = None
    validation: Figures | None = _key("validation", _part(Figures), default=None)
    revalidation: Mapping[str, Any] | None = None

    @property
    def training(self) -> Training:
        """A member keeps its commands and figures at its top level; the :class:`Training` view."""
        return Training(commands=self.commands, epochs_run=self.epochs_run, train_seconds=self.train_seconds)

    def card(self, parent: "ModelCard") -> "ModelCard":
        """The member as a model card of its own (the ensemble's task; named ``parent[m<i>]``)."""
        parent_name = parent.name or (parent.directory.name if parent.directory is not None else "ensemble")
        return ModelCard(name=f"{parent_name}[{self.prefix.rstrip('.')}]", task=parent.task,
                         architecture=self.architecture, input_size=self.input_size, mean=self.mean, std=self.std,
                         pipeline=self.pipeline, tta_hflip=self.tta_hflip, description=self.description,
                         initial_weights=self.initial_weights, weights_dtype=self.weights_dtype,
                         directory=parent.directory)


@dataclass(frozen=True, kw_only=True)
class AnomalyScore(_Part):
    """How an anomaly model turns an error map into an image score."""

    kind: str = "mean"  # mean | topk (autoencoders) | mahalanobis (feature Gaussian)
    top_fraction: float = 0.05
    definition: str | None = None


@dataclass(frozen=True, kw_only=True)
class ImageScore(_Part):
    """A localiser's image probability: a logistic combination of its head's logit and map peak."""

    weights: tuple[float, ...] = ()
    bias: float = 0.0


# -- the card ---------------------------------------------------------------------------------------
_CALIBRATION_KEYS = ("temperature", "logit_offset", "calibration")


@dataclass(frozen=True, kw_only=True)
class ModelCard(_Part):
    """A model folder's ``card.json``, typed and frozen.

    Build one with :meth:`from_dir` or :meth:`from_dict`; write it with :meth:`to_json`. Fields
    left ``None`` were not in the card. ``directory`` (not part of the JSON) is the folder it was
    read from. For code that still reads the JSON keys (pages, scripts), the card also answers
    ``card["key"]``, ``card.get("key", default)`` and ``"key" in card`` with plain JSON values.
    """

    name: str | None = None
    task: str | None = None  # fracture | boneage | anomaly
    kind: str | None = None  # as written in the card (only localisers write it); see model_kind
    architecture: str | None = None
    description: str | None = None
    initial_weights: str | None = None
    input_size: int | None = None
    architecture_params: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    pipeline: tuple[Step, ...] = _key("pipeline", _parts(Step), default=())
    tta_hflip: bool = False
    weights_file: str = WEIGHTS_FILE
    weights_dtype: str | None = None
    calibration: Calibration = field(default_factory=Calibration, metadata={"skip": True})
    operating_points: Mapping[str, OperatingPoint] = _key("operating_points", _part_map(OperatingPoint),
                                                          default_factory=lambda: _EMPTY)
    default_operating_point: str = DEFAULT_OPERATING_POINT
    validation: Figures | None = _key("validation", _part(Figures), default=None)
    validation_before_protocol: Figures | None = _key("validation_before_protocol", _part(Figures), default=None)
    test: Figures | None = _key("test", _part(Figures), default=None)
    protocol: Mapping[str, Any] | None = None
    revalidation: Mapping[str, Any] | None = None
    training: Training | None = _key("training", _part(Training), default=None)
    data: Mapping[str, Any] | None = None
    members: tuple[Member, ...] = _key("members", _parts(Member), default=())
    # anomaly models
    score: AnomalyScore | None = _key("score", _part(AnomalyScore), default=None)
    mask: str | None = None
    heatmap_model: str | None = None
    # localisers
    image_score: ImageScore | None = _key("image_score", _part(ImageScore), default=None)
    region_threshold: float | None = None
    region_relative: float | None = None  # boxes drawn round cells >= this share of the region's peak
    region_shrink: float = 1.0  # each box scaled about its centre (fitted on validation)
    centre_head: bool = False  # the network also predicts box centres and sizes (CenterNet-style)
    classifier_head: bool = False  # the image logit is the classifier's own branch and head (shared trunk fixed)
    shared_blocks: int | None = None  # encoder blocks shared with that classifier (None: all)
    classifier_input_size: int | None = None  # that classifier's input square (shared features resized to it)
    box_source: str | None = None  # "regions" (of the fracture map; None too) or "centres" (heatmap peaks)
    box_operating_points: Mapping[str, OperatingPoint] = _key("box_operating_points", _part_map(OperatingPoint),
                                                              default_factory=lambda: _EMPTY)
    map_stride: int | None = None
    version: str | None = None
    directory: Path | None = field(default=None, compare=False, metadata={"skip": True})

    # -- reading and writing ---------------------------------------------------------------------
    @classmethod
    def _read(cls, d: Mapping[str, Any], known: set[str]) -> dict[str, Any]:
        keys = [k for k in _CALIBRATION_KEYS if k in d]
        known.update(keys)
        return {"calibration": Calibration.from_dict({k: d[k] for k in keys})}

    @classmethod
    def from_dict(  # type: ignore[override]
            cls, d: Mapping[str, Any], directory: str | Path | None = None) -> "ModelCard":
        """The card of a JSON object (a ``ModelCard`` is returned as it is, or re-homed in ``directory``)."""
        if isinstance(d, ModelCard):
            return d if directory is None else dataclasses.replace(d, directory=Path(directory))
        return super().from_dict(d, directory=None if directory is None else Path(directory))

    @classmethod
    def from_json(cls, text: str, directory: str | Path | None = None) -> "ModelCard":
        return cls.from_dict(json.loads(text), directory)

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelCard":
        """The card of a model folder (or of its ``card.json``); a card without a name is named after
        its folder."""
        path = Path(path)
        folder = path.parent if path.name == CARD_FILE and path.is_file() else path
        card = cls.from_json((folder / CARD_FILE).read_text(), folder)
        return card if card.name else dataclasses.replace(card, name=folder.name)

    @classmethod
    def coerce(cls, card: "ModelCard | Mapping[str, Any]", directory: str | Path | None = None) -> "ModelCard":
        """A ``ModelCard`` from a card or a card dict (a listing's ``dir`` key becomes ``directory``)."""
        if isinstance(card, ModelCard):
            return card if directory is None or card.directory is not None else cls.from_dict(card, directory)
        if "dir" in card:
            directory = directory if directory is not None else card["dir"]
            card = {k: v for k, v in card.items() if k != "dir"}
        return cls.from_dict(card, directory)

    def _written(self) -> dict[str, Any]:
        out = super()._written()
        cal = self.calibration
        present = set(self.key_order) | set(cal.key_order)
        for attr, key, default in (("temperature", "temperature", DEFAULT_TEMPERATURE),
                                   ("logit_offset", "logit_offset", DEFAULT_LOGIT_OFFSET),
                                   ("description", "calibration", None)):
            value = getattr(cal, attr)
            if key in present or value != default:
                out[key] = value
        return out

    def write(self, directory: str | Path | None = None) -> Path:
        """Write ``card.json`` into ``directory`` (default: the folder it was read from)."""
        folder = Path(directory) if directory is not None else self.directory
        if folder is None:
            raise ValueError("model card: no folder to write card.json into")
        path = folder / CARD_FILE
        path.write_text(self.to_json())
        return path

    # -- what the code reads ---------------------------------------------------------------------
    @property
    def model_kind(self) -> str:
        """Which loader builds the model: the card's ``kind`` if written, else ``anomaly`` for an anomaly
        model, ``ensemble`` for a card with members, else ``classifier`` (one network: classifier or
        bone-age regressor)."""
        if self.kind:
            return self.kind
        if self.task == "anomaly":
            return "anomaly"
        if self.members:
            return "ensemble"
        return "classifier"

    @property
    def thresholds(self) -> dict[str, float]:
        """Operating point name -> threshold."""
        return {k: float(v.threshold) for k, v in (self.operating_points or {}).items()}

    @property
    def box_thresholds(self) -> dict[str, float]:
        """A localiser's box operating point name -> box score threshold."""
        return {k: float(v.threshold) for k, v in (self.box_operating_points or {}).items()}

    @property
    def temperature(self) -> float:
        return float(self.calibration.temperature)

    @property
    def logit_offset(self) -> float:
        return float(self.calibration.logit_offset)

    def pipeline_spec(self) -> list[dict[str, Any]]:
        """The pipeline in the format ``boneai.preprocess`` runs (a list of plain dicts)."""
        return [s.spec() for s in self.pipeline]

    @property
    def weights_path(self) -> Path:
        """The weights file in the card's folder."""
        if self.directory is None:
            raise ValueError(f"model card {self.name!r} was not read from a folder")
        return self.directory / self.weights_file

    def split_key(self) -> tuple:
        """:func:`card_split_key` of this card."""
        return card_split_key(self)

    # -- the JSON keys, for code that reads the card as a dict -----------------------------------
    def __getitem__(self, key: str) -> Any:
        items = self._items()
        if key not in items:
            raise KeyError(key)
        return _thaw(items[key])

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        return key in self._items()

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())

    def keys(self) -> list[str]:
        return list(self._items())

    def items(self) -> list[tuple[str, Any]]:
        return list(self.to_dict().items())

    def values(self) -> list[Any]:
        return list(self.to_dict().values())


# -- which validation split a model was validated on ------------------------------------------------
def validation_split_key(config: Mapping[str, Any]) -> tuple:
    """What decides a run's validation split (from its ``TrainConfig`` as a dict): two runs with the
    same key validated on the same images."""
    val_fraction = config.get("val_fraction")
    return (str(Path(str(config.get("data", ""))).resolve()), None if val_fraction is None else float(val_fraction),
            config.get("seed"), config.get("limit"))


def card_split_key(card: "ModelCard | Mapping[str, Any]") -> tuple:
    """:func:`validation_split_key` of a model card: the split its current validation figures come
    from (after ``revalidate``, the same split of the data it was validated on again)."""
    card = ModelCard.coerce(card)
    config = dict(card.training.config or {}) if card.training is not None else {}
    if card.revalidation:
        config["data"] = card.revalidation["data"]
    return validation_split_key(config)
