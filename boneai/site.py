"""Site adaptation: a site model from a parent fracture model and a hospital's own labelled radiographs.

``python -m boneai adapt --task fracture --data DIR [--from NAME] --out MODEL_DIR`` chooses, by
cross-validation **inside** ``DIR`` only, between

* ``recalibrate``: the parent as it is, with temperature, offset and operating points refitted;
* ``finetune_head``: the parent's classifier head trained further on the site's pooled features,
  starting from the parent's head (the number of epochs chosen by inner cross-validation);
* ``finetune_blocks``: the parent's last block stage, final convolution and head trained further
  (``boneai.site_tail``; epochs chosen by inner cross-validation);
* ``linear_probe``: an L2 logistic regression on the parent's pooled features (C chosen by inner CV);
* ``multi_probe``: one such probe per shipped fracture network (the parent's and the other single
  networks in ``weights/``), their scores averaged; and ``multi_probe_parent``, the same average with
  the parent's own logit as one more voter;
* ``bn_recalibrate``, ``bn_linear_probe``, ``bn_multi_probe_parent``: the same after every network's
  batch-norm statistics are re-estimated on the site's images (``boneai.site_bn``, AdaBN; no labels
  used). Inside cross-validation the statistics come from each outer training part only.

Every candidate is scored by *nested* cross-validation (outer folds stratified by label and grouped
by near-duplicate views and patient folders; its hyperparameters chosen by inner folds inside each
outer training part), so the candidates compete on equal terms. Among the candidates within one
bootstrap standard error of the best cross-validated AUC, the one with the most voters is chosen
(:data:`PREFERENCE`): at ~100 images the differences between candidates are mostly noise, and an
average of several fits varies least. The choice, refitted on the whole folder, is written as a model
folder: the calibration (``sigmoid(logit / T + b)``) and the operating
points are fitted on the chosen candidate's *out-of-fold* logits, and the card's ``validation``
figures are those out-of-fold figures, labelled as cross-validated. The card's ``site`` section holds
the provenance: the parent and the hash of its weights, the local data's hash and size, every
candidate's figure, the choice and the command.

Features are pooled encoder features averaged over the image and its mirror (see
``Predictor.pooled_features``); the square root is taken before the probe (ReLU6 features are
skewed). Measured on a simulated site (``bench/site_adapt.py``, ``docs/site_adaptation.md``).

A probe model (``kind: site_probe``) keeps its feature networks' weights in its own
``model.safetensors`` (prefix ``m<i>.``) with the probe arrays (prefix ``probe.<i>.``), so it loads
and registers like any model and does not change when the parent is retrained.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from boneai import evaluate as ev
from boneai._json import json_default
from boneai.card import DEFAULT_OPERATING_POINT, WEIGHTS_FILE, ModelCard
from boneai.config import ADAPT_METHODS
from boneai.data import image_fingerprints, near_duplicate_groups, read_classification_dir
from boneai.ensemble import EnsemblePredictor
from boneai.errors import BoneAIError, DatasetError
from boneai.inference import available_cards, load_model, model_dir
from boneai.io import read_radiograph
from boneai.predictor import Predictor, read_weights
from boneai.scope import file_sha256
from boneai.site_model import SiteProbePredictor, load_site_probe  # noqa: F401
from boneai.site_model import probe_score as _probe_score
from boneai.transforms import to_tensor

__all__ = [
    "METHODS",
    "PREFERENCE",
    "MIN_PER_CLASS",
    "SiteData",
    "read_site",
    "FeatureNet",
    "FeatureCache",
    "site_features",
    "adapt",
    "SiteProbePredictor",
    "load_site_probe",
]

#: Candidates, simplest first.
METHODS = ADAPT_METHODS  # defined beside the command-line options, which name them without importing torch
#: Candidates whose networks' batch-norm statistics are first re-estimated on the site's images
#: (``boneai.site_bn``, AdaBN); inside cross-validation on each training part's images only.
BN_PREFIX = "bn_"
#: Among candidates tied with the best (see :func:`_choose`), the one with the most voters wins:
#: averaging reduces the variance that ~100 images leave in any one fit. On the simulated site the
#: multi-network average was the best fixed candidate (bench/site_adapt.py, docs/site_adaptation.md).
#: A candidate with site statistics comes after the same candidate with the parent's own (the simpler).
PREFERENCE = ("multi_probe_parent", "bn_multi_probe_parent", "multi_probe", "linear_probe", "bn_linear_probe",
              "finetune_blocks", "finetune_head", "recalibrate", "bn_recalibrate")
#: Methods that need a single-network parent (they change that network).
SINGLE_NETWORK_METHODS = ("finetune_head", "finetune_blocks")
#: Resamples of the paired bootstrap that decides whether a candidate is tied with the best.
TIE_BOOT = 300
#: Below this many fractured or not-fractured images a folder cannot be cross-validated usefully.
MIN_PER_CLASS = 8
#: Unreadable files a card or report names one by one (all are counted).
MAX_SKIPPED_LISTED = 50
#: Inverse L2 strengths tried for the probes (on standardised sqrt features). Measured on the
#: simulated site, inner CV picks 3e-4..3e-3 at ~95 images; the grid brackets that widely.
PROBE_CS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
#: Epochs tried for head fine-tuning (full batch, Adam, lr 1e-3, from the parent's head).
HEAD_EPOCHS = (10, 30, 100, 300)
HEAD_LR = 1e-3


# -- the local folder -------------------------------------------------------------------------------
@dataclass
class SiteData:
    """A labelled local folder: ``frame`` (path, image_id, label, group, sha256) and its provenance."""

    root: Path
    frame: pd.DataFrame
    layout: str
    sha256: str
    skipped: list[dict[str, str]] = field(default_factory=list)  # unreadable files: {file, error}

    @property
    def n(self) -> int:
        return len(self.frame)

    @property
    def n_positive(self) -> int:
        return int(self.frame["label"].sum())

    def provenance(self) -> dict[str, Any]:
        return {"path": str(self.root), "layout": self.layout, "sha256": self.sha256, "n": self.n,
                "n_positive": self.n_positive, "n_negative": self.n - self.n_positive,
                "n_groups": int(self.frame["group"].nunique()),
                "n_skipped": len(self.skipped), "skipped": self.skipped[:MAX_SKIPPED_LISTED]}


def read_site(data: str | Path, near_duplicates: bool = True) -> SiteData:
    """Read a labelled folder in the layouts ``evaluate`` reads (class folders or FracAtlas).

    Groups keep views that must not be split across folds together: in class folders a subfolder
    under the class folder (``fractured/patient07/a.png``) is a patient (in the FracAtlas layout,
    which has no patient ids, each image starts as its own group), and near-duplicate views
    (difference hash, as the FracAtlas split uses) are joined across the whole folder.

    With ``near_duplicates`` (as ``adapt`` reads), a file that cannot be read is left out of the frame and
    listed in ``skipped``, so that one damaged file does not stop an adaptation. Without, the frame keeps
    every file and the caller, which reads each one anyway (``validate-site``), reports it. The data hash
    is of the folder as given: every image file found, read or not.
    """

    root = Path(data)
    df = read_classification_dir(root).reset_index(drop=True)
    layout = "fracatlas" if "view" in df.columns else "class_folders"
    rel = [Path(p).relative_to(root) for p in df["path"]]
    df["sha256"] = [file_sha256(p) for p in df["path"]]  # each file hashed once: the caches key by it too
    digest = hashlib.sha256()
    for r, label, h in sorted(zip(map(str, rel), df["label"], df["sha256"], strict=True)):
        digest.update(f"{r}\t{int(label)}\t{h}\n".encode())
    failed: dict[int, str] = {}
    fingerprints = image_fingerprints(df["path"].tolist(), errors=failed) if near_duplicates else None
    skipped = [{"file": str(rel[i]), "error": failed[i]} for i in sorted(failed)]
    if failed and len(failed) == len(df):
        raise DatasetError(f"None of the {len(df)} image files in {root} could be read; the first: "
                           f"{skipped[0]['error']}")
    keep = np.array([i not in failed for i in range(len(df))], dtype=bool)
    df, rel = df[keep].reset_index(drop=True), [r for r, k in zip(rel, keep, strict=True) if k]
    if layout == "class_folders":  # class/patient/file: the patient subfolder is the group
        folder_group = [str(r.parts[0] + "/" + r.parts[1]) if len(r.parts) > 2 else str(r) for r in rel]
        groups = pd.factorize(pd.Series(folder_group))[0]
    else:  # FracAtlas (images/<class>/file): no patient ids, the reader's own group per image
        groups = pd.factorize(df["group"].astype(str))[0]
    if fingerprints is not None and len(df) > 1:
        groups = _join_groups(groups, near_duplicate_groups(fingerprints[keep]))
    df["group"] = groups
    return SiteData(root=root, frame=df, layout=layout, sha256=digest.hexdigest(), skipped=skipped)


def _join_groups(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of two groupings (images sharing either group end up together)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(a)
    rows, cols = [], []
    for labels in (a, b):  # link each image to the first image of its group
        first: dict[Any, int] = {}
        for i, g in enumerate(labels):
            rows.append(i)
            cols.append(first.setdefault(g, i))
    _, comp = connected_components(coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n)), directed=False)
    return comp


# -- features -----------------------------------------------------------------------------------------
@dataclass
class FeatureNet:
    """One feature network: a loaded classifier and where its weights came from."""

    predictor: Predictor
    source: str  # model folder it came from
    prefix: str  # its tensors' prefix in the source weights file ("" for a single network)
    weights_sha256: str
    is_parent: bool
    bn_images: str = ""  # with site batch-norm statistics (in its predictor's network): a hash of their images

    @property
    def key(self) -> str:
        """Identifies the network's exact weights (cache key), site statistics included."""
        bn = f":bn{self.bn_images}" if self.bn_images else ""
        return hashlib.sha256(f"{self.weights_sha256}:{self.prefix}{bn}".encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        return f"{Path(self.source).name}{'[' + self.prefix.rstrip('.') + ']' if self.prefix else ''}"


#: Model kinds whose networks ``adapt`` can read: pooled features before one linear head.
ADAPTABLE_KINDS = ("classifier", "ensemble")


def check_parent(model: str | Path, weights_dir: str | Path | None = None) -> Path:
    """The model folder of ``model`` if ``adapt`` can use it (as the parent or a feature network).

    Read from the card alone, so that the Site validation page and the job runner refuse before a
    job starts.

    Raises:
        ModelNotFoundError: no such model. BoneAIError: a model of another task, a site model, or a
            kind without pooled features (the localiser), with the model to choose instead.
    """
    folder = model_dir(model, weights_dir)
    card = ModelCard.from_dir(folder)
    if card.task != "fracture":
        raise BoneAIError(f"Model {card.name!r} is a {card.task} model; site adaptation needs a fracture model.")
    if "site" in card:  # before the kind: a site model holds members like an ensemble
        raise BoneAIError(f"{card.name!r} is already a site model; adapt its parent ({card['site']['parent']}).")
    if card.model_kind not in ADAPTABLE_KINDS:
        raise BoneAIError(f"Model {card.name!r} is a {card.model_kind}, which site adaptation cannot take as a "
                          "parent; choose a classifier or an ensemble, e.g. fracture (the classifier whose "
                          "blocks and head give the localiser's image probability).")
    return folder


def feature_nets(model: str | Path, is_parent: bool, weights_dir: str | Path | None = None) -> list[FeatureNet]:
    """The networks of a model folder (an ensemble's members, or the one network)."""

    folder = check_parent(model, weights_dir)
    pred = load_model(folder)
    sha = file_sha256(folder / pred.card.weights_file)
    if isinstance(pred, EnsemblePredictor):
        prefixes = [m.prefix for m in pred.card.members]
        return [FeatureNet(m, str(folder), p, sha, is_parent) for m, p in zip(pred.members, prefixes, strict=True)]
    return [FeatureNet(pred, str(folder), "", sha, is_parent)]


def default_feature_models(parent: str | Path, weights_dir: str | Path | None = None) -> list[str]:
    """The other single-network fracture classifiers in ``weights/`` (cheap to run; each sees the
    image at its own input size, which is what made the average robust on the simulated site)."""

    parent_dir = model_dir(parent, weights_dir).resolve()
    out = []
    for card in available_cards("fracture", weights_dir):
        if (card.model_kind == "classifier" and card.directory is not None and card.directory.resolve() != parent_dir
                and "site" not in card):  # a site model is another site's adaptation, not a shipped network
            out.append(str(card.directory))
    return out


class FeatureCache:
    """Pooled features per network and file content, in ``<dir>/<network key>.npz`` (reruns skip done
    images; the key is the network's weights hash, so other weights never reuse them). In memory it
    also keeps each file's model input per preprocessing pipeline, so that the passes of one ``adapt``
    (features, tail inputs, site statistics per fold) read and preprocess every file once."""

    def __init__(self, directory: str | Path | None) -> None:
        self.directory = Path(directory) if directory else None
        self._mem: dict[str, dict[str, np.ndarray]] = {}
        self._inputs: dict[tuple[str, str], np.ndarray] = {}

    def input_batch(self, pr: Predictor, paths: Sequence[str], digests: Sequence[str],
                    idx: Sequence[int]) -> torch.Tensor:
        """The normalised model inputs of files ``idx`` for ``pr``'s pipeline (uint8 squares kept)."""
        pipeline = json.dumps(pr.pipeline, sort_keys=True)
        tensors = []
        for i in idx:
            key = (pipeline, digests[i])
            if key not in self._inputs:
                self._inputs[key] = pr.input_image(_read_pixels(paths[i]))
            tensors.append(to_tensor(self._inputs[key], pr.mean, pr.std))
        return torch.stack(tensors)

    def _file(self, key: str) -> Path | None:
        return self.directory / f"{key}.npz" if self.directory else None

    def get(self, key: str) -> dict[str, np.ndarray]:
        if key not in self._mem:
            path = self._file(key)
            self._mem[key] = dict(np.load(path)) if path is not None and path.is_file() else {}
        return self._mem[key]

    def save(self, key: str) -> None:
        path = self._file(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **self._mem.get(key, {}))
        os.replace(tmp, path)


def _read_pixels(path: str) -> np.ndarray:

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_radiograph(path).pixels


def site_features(nets: Sequence[FeatureNet], paths: Sequence[str], cache: FeatureCache | None = None,
                  batch_size: int = 16, log: Callable[[str], None] | None = None,
                  digests: Sequence[str] | None = None) -> list[np.ndarray]:
    """(N, C) mirror-averaged pooled features of every image, one array per network (``digests``: the
    files' SHA-256 when the caller has them already)."""
    cache = cache or FeatureCache(None)
    digests = list(digests) if digests is not None else [file_sha256(p) for p in paths]
    out = []
    for net in nets:
        store = cache.get(net.key)
        todo = [i for i, d in enumerate(digests) if d not in store]
        t0 = time.time()
        for start in range(0, len(todo), batch_size):
            idx = todo[start:start + batch_size]
            pr = net.predictor
            feats = pr.pooled_features(cache.input_batch(pr, paths, digests, idx), mirror=True)
            for i, f in zip(idx, feats, strict=True):
                store[digests[i]] = f.astype(np.float32)
            if log:
                log(f"features {net.label}: {min(start + batch_size, len(todo))}/{len(todo)} new images "
                    f"({time.time() - t0:.0f} s)")
        if todo:
            cache.save(net.key)
        out.append(np.stack([store[d] for d in digests]))
    return out


def site_bn_nets(nets: Sequence[FeatureNet], paths: Sequence[str], rows: np.ndarray, digests: Sequence[str],
                 cache: FeatureCache | None = None, batch_size: int = 16,
                 log: Callable[[str], None] | None = None) -> list[FeatureNet]:
    """Each network with its batch-norm statistics re-estimated on the images ``rows`` (AdaBN,
    ``boneai.site_bn``; no labels used); the weights stay the network's."""
    from boneai.site_bn import site_batchnorm

    cache = cache or FeatureCache(None)
    rows = np.asarray(rows)
    tag = hashlib.sha256("".join(sorted(digests[i] for i in rows)).encode()).hexdigest()[:16]
    out = []
    for net in nets:
        pr = net.predictor
        t0 = time.time()
        batches = (cache.input_batch(pr, paths, digests, rows[start:start + batch_size])
                   for start in range(0, len(rows), batch_size))
        adapted = site_batchnorm(pr.model, batches)
        site_pred = Predictor(pr.card, adapted.to(memory_format=torch.channels_last), pr.directory)
        out.append(FeatureNet(site_pred, net.source, net.prefix, net.weights_sha256, net.is_parent, bn_images=tag))
        if log:
            log(f"site batch-norm statistics {net.label}: {len(rows)} images ({time.time() - t0:.0f} s)")
    return out


def site_tail_inputs(net: FeatureNet, paths: Sequence[str], cache: FeatureCache | None = None,
                     batch_size: int = 16, log: Callable[[str], None] | None = None,
                     digests: Sequence[str] | None = None) -> np.ndarray:
    """(N, 2, C, H, W) activations at the input of the network's tail (``boneai.site_tail``), of each
    image and its mirror, cached like the pooled features (key: the network's and the tail's)."""
    from boneai.site_tail import TAIL_BLOCKS, tail_inputs

    cache = cache or FeatureCache(None)
    key = f"{net.key}-tail{TAIL_BLOCKS}"
    store = cache.get(key)
    digests = list(digests) if digests is not None else [file_sha256(p) for p in paths]
    todo = [i for i, d in enumerate(digests) if d not in store]
    pr = net.predictor
    for start in range(0, len(todo), batch_size):
        idx = todo[start:start + batch_size]
        for i, a in zip(idx, tail_inputs(pr.model, cache.input_batch(pr, paths, digests, idx)), strict=True):
            store[digests[i]] = a
        if log:
            log(f"tail inputs {net.label}: {min(start + batch_size, len(todo))}/{len(todo)} new images")
    if todo:
        cache.save(key)
    return np.stack([store[d] for d in digests])


def _head(net: FeatureNet) -> tuple[np.ndarray, float]:
    """The network's own linear head (weight (C,), bias)."""
    clf = net.predictor.model.get_classifier() if hasattr(net.predictor.model, "get_classifier") else None
    if not isinstance(clf, nn.Linear) or clf.out_features != 1:
        raise BoneAIError(f"{net.label}: the head is not one linear layer; head fine-tuning needs one.")
    return clf.weight.detach().reshape(-1).double().numpy(), float(clf.bias.detach().reshape(-1)[0])


# -- the candidates ---------------------------------------------------------------------------------
def _probe_fit(x: np.ndarray, y: np.ndarray, c: float) -> dict[str, np.ndarray]:
    from sklearn.linear_model import LogisticRegression

    z = np.sqrt(np.maximum(x, 0.0))
    mean, scale = z.mean(axis=0), z.std(axis=0)
    scale = np.where(scale > 1e-8, scale, 1.0)
    m = LogisticRegression(C=c, max_iter=5000).fit((z - mean) / scale, y)
    return {"mean": mean, "scale": scale, "coef": m.coef_.reshape(-1), "intercept": np.array(m.intercept_[:1])}


def _head_finetune(x: np.ndarray, y: np.ndarray, w0: np.ndarray, b0: float, epochs: int) -> tuple[np.ndarray, float]:
    """The parent's head trained ``epochs`` full-batch Adam steps further on (x, y), class-balanced."""
    xt, yt = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    w = torch.tensor(w0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor([b0], dtype=torch.float64, requires_grad=True)
    pos = float(yt.mean())
    weight = torch.where(yt > 0, 0.5 / max(pos, 1e-6), 0.5 / max(1 - pos, 1e-6))
    opt = torch.optim.Adam([w, b], lr=HEAD_LR)
    for _ in range(int(epochs)):
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt, weight=weight)
        loss.backward()
        opt.step()
    return w.detach().numpy(), float(b.detach()[0])


def _folds(y: np.ndarray, groups: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified, grouped folds (as many as the smaller class allows, at most ``k``)."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_splits = int(min(k, np.bincount(y, minlength=2).min(), len(np.unique(groups))))
    if n_splits < 2:
        raise DatasetError("Too few images of one class (or too few distinct patients) to cross-validate.")
    return list(StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(y, y, groups))


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    return ev.roc_auc(y, s)


@dataclass
class _Problem:
    """What the candidates see: labels, groups, features per network and the parent's logits."""

    y: np.ndarray
    groups: np.ndarray
    feats: list[np.ndarray]
    parent_idx: list[int]  # which networks are the parent's
    heads: list[tuple[np.ndarray, float]]  # every network's own head
    folds: int
    seed: int
    tail_acts: np.ndarray | None = None  # the parent's activations at its tail's input (finetune_blocks)
    tail_model: nn.Module | None = None  # the parent network whose tail is fine-tuned
    _probes: dict[tuple, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)

    def probe(self, net: int, rows: np.ndarray, c: float) -> dict[str, np.ndarray]:
        """A probe of network ``net`` fitted on ``rows`` (memoised: the candidates share their folds)."""
        key = (net, c, rows.tobytes())
        if key not in self._probes:
            self._probes[key] = _probe_fit(self.feats[net][rows], self.y[rows], c)
        return self._probes[key]

    @property
    def parent_logit(self) -> np.ndarray:
        """The parent's raw output: its head on its features, averaged over its networks."""
        return np.mean([self.feats[i] @ self.heads[i][0] + self.heads[i][1] for i in self.parent_idx], axis=0)


@dataclass
class _Fitted:
    """A candidate fitted on some rows: how to score rows, and what to store."""

    method: str
    score: Callable[[np.ndarray], np.ndarray]  # row indices -> logits
    params: dict[str, Any] = field(default_factory=dict)


def _inner_choice(prob: _Problem, rows: np.ndarray, grid: Sequence[Any],
                  fit_score: Callable[[np.ndarray, np.ndarray, Any], np.ndarray]) -> tuple[Any, float]:
    """The grid value with the best inner-CV AUC on ``rows`` (``fit_score(train, test, value)``)."""
    y = prob.y[rows]
    folds = _folds(y, prob.groups[rows], prob.folds, prob.seed + 1)
    best: tuple[float, Any] | None = None
    for value in grid:
        oof = np.zeros(len(rows))
        for tr, te in folds:
            oof[te] = fit_score(rows[tr], rows[te], value)
        auc = _auc(y, oof)
        if best is None or auc > best[0] + 1e-12:
            best = (auc, value)
    assert best is not None
    return best[1], best[0]


def _fit_probes(prob: _Problem, rows: np.ndarray, nets: Sequence[int], with_parent: bool) -> _Fitted:
    """One probe per network (C by inner CV), scores averaged after scaling each to unit spread on
    ``rows`` (and the parent's logit as one more voter when ``with_parent``)."""
    probes, cs, scales = [], [], []
    for i in nets:
        x = prob.feats[i]

        def fit_score(tr: np.ndarray, te: np.ndarray, c: float, x: np.ndarray = x, i: int = i) -> np.ndarray:
            return _probe_score(prob.probe(i, tr, c), x[te])

        c, _ = _inner_choice(prob, rows, PROBE_CS, fit_score)
        p = prob.probe(i, rows, c)
        probes.append(p)
        cs.append(c)
        scales.append(float(np.std(_probe_score(p, x[rows]))) or 1.0)
    parent_scale = float(np.std(prob.parent_logit[rows])) or 1.0
    k = len(probes) + (1 if with_parent else 0)
    weights = [1.0 / (k * s) for s in scales]
    parent_weight = 1.0 / (k * parent_scale) if with_parent else 0.0

    def score(idx: np.ndarray) -> np.ndarray:
        s = sum(w * _probe_score(p, prob.feats[i][idx]) for w, p, i in zip(weights, probes, nets, strict=True))
        return s + parent_weight * prob.parent_logit[idx]

    return _Fitted("", score, {"nets": list(nets), "probes": probes, "C": cs, "weights": weights,
                               "parent_weight": parent_weight})


def _fit_candidate(method: str, prob: _Problem, rows: np.ndarray) -> _Fitted:
    """``method`` fitted on ``rows``; a ``bn_`` method is its base method on a problem whose features
    come from networks with site statistics (the caller passes that problem)."""
    base = method.removeprefix(BN_PREFIX)
    if base != method:
        fitted = _fit_candidate(base, prob, rows)
        fitted.method = method
        return fitted
    if method == "recalibrate":
        fitted = _Fitted(method, lambda idx: prob.parent_logit[idx])
    elif method == "finetune_head":
        if len(prob.parent_idx) != 1:
            raise BoneAIError("Head fine-tuning needs a single-network parent.")
        i = prob.parent_idx[0]
        w0, b0 = prob.heads[i]
        x = prob.feats[i]

        def fit_score(tr: np.ndarray, te: np.ndarray, epochs: int) -> np.ndarray:
            w, b = _head_finetune(x[tr], prob.y[tr], w0, b0, epochs)
            return x[te] @ w + b

        epochs, _ = _inner_choice(prob, rows, HEAD_EPOCHS, fit_score)
        w, b = _head_finetune(x[rows], prob.y[rows], w0, b0, epochs)
        fitted = _Fitted(method, lambda idx: x[idx] @ w + b, {"epochs": int(epochs), "weight": w, "bias": b, "net": i})
    elif method == "finetune_blocks":
        fitted = _fit_tail(prob, rows)
    elif method == "linear_probe":
        fitted = _fit_probes(prob, rows, prob.parent_idx, with_parent=False)
    elif method == "multi_probe":
        fitted = _fit_probes(prob, rows, list(range(len(prob.feats))), with_parent=False)
    elif method == "multi_probe_parent":
        fitted = _fit_probes(prob, rows, list(range(len(prob.feats))), with_parent=True)
    else:
        raise BoneAIError(f"Unknown adaptation method {method!r}; choose from {', '.join(METHODS)}.")
    fitted.method = method
    return fitted


def _fit_tail(prob: _Problem, rows: np.ndarray) -> _Fitted:
    """``finetune_blocks``: the epochs by inner CV (one run per inner fold, scored at each checkpoint
    of :data:`boneai.site_tail.TAIL_EPOCHS`), then a run on all ``rows`` to that epoch."""
    from boneai.site_tail import TAIL_EPOCHS, TAIL_INNER_FOLDS, tail_logits, train_tail

    if prob.tail_acts is None or prob.tail_model is None:
        raise BoneAIError("Block fine-tuning needs the parent's tail activations (a single-network parent).")
    acts, y = prob.tail_acts, prob.y
    inner = _folds(y[rows], prob.groups[rows], min(prob.folds, TAIL_INNER_FOLDS), prob.seed + 1)
    oof = {e: np.zeros(len(rows)) for e in TAIL_EPOCHS}
    for k, (tr, te) in enumerate(inner):
        _, scores = train_tail(prob.tail_model, acts[rows[tr]], y[rows[tr]], TAIL_EPOCHS, acts[rows[te]],
                               seed=prob.seed + k)
        for e in TAIL_EPOCHS:
            oof[e][te] = scores[e]
    epochs = max(TAIL_EPOCHS, key=lambda e: (_auc(y[rows], oof[e]), -e))
    tail, _ = train_tail(prob.tail_model, acts[rows], y[rows], (epochs,), seed=prob.seed)
    return _Fitted("finetune_blocks", lambda idx: tail_logits(tail, acts[idx]),
                   {"epochs": int(epochs), "tail": tail})


def _nested_oof(method: str, prob: _Problem, outer: list[tuple[np.ndarray, np.ndarray]],
                fold_problems: Sequence[_Problem] | None = None) -> tuple[np.ndarray, list[Any]]:
    """Out-of-fold logits of a candidate whose own choices are made inside each outer training part
    (``fold_problems``: one problem per outer fold, for features that depend on the training part)."""
    oof = np.zeros(len(prob.y))
    chosen = []
    for fold, (tr, te) in enumerate(outer):
        fitted = _fit_candidate(method, fold_problems[fold] if fold_problems is not None else prob, tr)
        oof[te] = fitted.score(te)
        chosen.append({k: v for k, v in fitted.params.items() if k in ("C", "epochs")})
    return oof, chosen


def _choose(y: np.ndarray, oofs: Mapping[str, np.ndarray], seed: int = 0) -> tuple[str, dict[str, float]]:
    """The preferred candidate (:data:`PREFERENCE`) among those tied with the best by cross-validated
    AUC: within one standard error of the paired bootstrap of the AUC difference (the "one standard
    error" rule; with ~100 images, differences of a few hundredths are noise). Returns the choice and
    each candidate's standard error of the difference to the best."""
    aucs = {m: _auc(y, s) for m, s in oofs.items()}
    best = max(aucs, key=lambda m: aucs[m])
    rng = np.random.default_rng(seed)
    diffs: dict[str, list[float]] = {m: [] for m in oofs}
    for _ in range(TIE_BOOT):
        idx = rng.integers(0, len(y), len(y))
        if y[idx].min() == y[idx].max():
            continue
        ref = _auc(y[idx], oofs[best][idx])
        for m, s in oofs.items():
            diffs[m].append(ref - _auc(y[idx], s[idx]))
    se = {m: float(np.std(d)) for m, d in diffs.items()}
    tied = [m for m in oofs if aucs[best] - aucs[m] <= se[m]]
    return next(m for m in PREFERENCE if m in tied), se


# -- adapt ------------------------------------------------------------------------------------------
def adapt(data: str | Path, out: str | Path, parent: str = "fracture", feature_models: Sequence[str] | None = None,
          methods: Sequence[str] = METHODS, folds: int = 5, seed: int = 0, cache: str | Path | None = None,
          command: str = "", weights_dir: str | Path | None = None,
          log: Callable[[str], None] | None = None) -> ModelCard:
    """Make a site model from ``parent`` and the labelled folder ``data``; write it to ``out``.

    Args:
        data: class folders (``fractured/``, ``not_fractured/``) or the FracAtlas layout.
        out: the model folder to write (``card.json``, ``model.safetensors``, ``val_predictions.csv``).
        parent: model name, task or folder (default: `fracture`, the single-network classifier whose
            pooled features the probes read; a localiser or a site model cannot be a parent).
        feature_models: other models whose networks add probes (default: the other single-network
            fracture classifiers in ``weights/``; ``[]`` for the parent's only).
        methods: candidates to compare (see :data:`METHODS`).
        folds: outer and inner cross-validation folds (fewer when a class is small).
        cache: folder for the feature cache (reruns on the same files skip the networks).

    Raises:
        DatasetError: fewer than :data:`MIN_PER_CLASS` images of a class.
    """
    log = log or (lambda _m: None)
    t0 = time.time()
    site = read_site(data)
    y = site.frame["label"].to_numpy().astype(int)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if min(n_pos, n_neg) < MIN_PER_CLASS:
        raise DatasetError(f"{data} has {n_pos} fractured and {n_neg} not-fractured images; site adaptation needs "
                           f"at least {MIN_PER_CLASS} of each to choose anything by cross-validation.")
    log(f"site: {site.n} images ({n_pos} fractured), {site.frame['group'].nunique()} groups")
    if site.skipped:
        log(f"left out {len(site.skipped)} unreadable file(s), e.g. {site.skipped[0]['error']}")
    nets = feature_nets(parent, True, weights_dir)
    extra = default_feature_models(parent, weights_dir) if feature_models is None else list(feature_models)
    for m in extra:
        nets += feature_nets(m, False, weights_dir)
    feature_cache = FeatureCache(cache)
    feats = site_features(nets, site.frame["path"].tolist(), feature_cache, log=log,
                          digests=site.frame["sha256"].tolist())
    heads = [_head(n) for n in nets]
    prob = _Problem(y=y, groups=site.frame["group"].to_numpy(), feats=feats,
                    parent_idx=[i for i, n in enumerate(nets) if n.is_parent], heads=heads, folds=folds, seed=seed)
    methods = [m for m in methods if not (m in SINGLE_NETWORK_METHODS and len(prob.parent_idx) != 1)]
    if "finetune_blocks" in methods:
        prob.tail_model = nets[prob.parent_idx[0]].predictor.model
        prob.tail_acts = site_tail_inputs(nets[prob.parent_idx[0]], site.frame["path"].tolist(), feature_cache,
                                          log=log, digests=site.frame["sha256"].tolist())
    if len(nets) == len(prob.parent_idx):  # no other networks: the multi probes equal the parent's probe
        methods = [m for m in methods if m != "multi_probe"] if len(prob.parent_idx) == 1 else methods
    outer = _folds(y, prob.groups, folds, seed)
    paths, digests = site.frame["path"].tolist(), site.frame["sha256"].tolist()

    def with_site_statistics(rows: np.ndarray) -> tuple[list[FeatureNet], _Problem]:
        bn = site_bn_nets(nets, paths, rows, digests, feature_cache, log=log)
        return bn, replace(prob, feats=site_features(bn, paths, feature_cache, log=log, digests=digests),
                           tail_acts=None, tail_model=None, _probes={})

    fold_problems = ([with_site_statistics(tr)[1] for tr, _ in outer]
                     if any(m.startswith(BN_PREFIX) for m in methods) else None)
    candidates: dict[str, dict[str, Any]] = {}
    oofs: dict[str, np.ndarray] = {}
    for m in methods:
        oof, chosen = _nested_oof(m, prob, outer, fold_problems if m.startswith(BN_PREFIX) else None)
        oofs[m] = oof
        candidates[m] = {"cv_auc": _auc(y, oof), "inner_choices": chosen}
        log(f"candidate {m}: cross-validated AUC {candidates[m]['cv_auc']:.3f}")
    method, se = _choose(y, oofs, seed)
    for m, v in se.items():
        candidates[m]["se_of_difference_to_best"] = v
    log(f"chosen: {method}")
    if method.startswith(BN_PREFIX):  # the site statistics of the whole folder
        nets, final_prob = with_site_statistics(np.arange(len(y)))
    else:
        final_prob = prob
    final = _fit_candidate(method, final_prob, np.arange(len(y)))
    oof = oofs[method]
    preds = pd.DataFrame({"image": [str(Path(p).relative_to(site.root)) for p in site.frame["path"]],
                          "label": y, "logit": oof})
    fields, prob_oof = ev.classifier_validation(preds, has_region=False)
    preds["probability"] = prob_oof
    validation = dict(fields["validation"])
    validation["note"] = (f"cross-validated inside the site folder: out-of-fold predictions of {len(outer)} "
                          "stratified, grouped folds, every choice made inside each training part")
    parent_dir = Path(nets[0].source)
    site_section = {
        "parent": ModelCard.from_dir(parent_dir).name, "parent_dir": str(parent_dir),
        "parent_weights_sha256": nets[0].weights_sha256,
        "data": site.provenance(), "method": method,
        "method_params": {k: v for k, v in final.params.items() if k in ("C", "epochs", "weights", "parent_weight")},
        "candidates": candidates,
        "choice_rule": "among candidates within one bootstrap standard error of the best cross-validated AUC, "
                       "the first of " + ", ".join(PREFERENCE),
        "parent_cv_auc": _auc(y, prob.parent_logit),
        "site_batchnorm": ({"images": int(len(y)), "what": "batch-norm running statistics of every network "
                            "re-estimated on the folder's images and their mirrors (AdaBN); weights unchanged"}
                           if method.startswith(BN_PREFIX) else None),
        "feature_networks": [{"source": n.source, "prefix": n.prefix, "weights_sha256": n.weights_sha256,
                              "parent": n.is_parent} for n in nets],
        "folds": len(outer), "seed": seed, "command": command, "seconds": round(time.time() - t0, 1),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    card = _write_site_model(out, method, final, nets, fields, validation, site_section)
    preds.to_csv(out / "val_predictions.csv", index=False)
    log(f"wrote {out} ({time.time() - t0:.0f} s)")
    return card


def _write_site_model(out: Path, method: str, final: _Fitted, nets: Sequence[FeatureNet], fields: dict[str, Any],
                      validation: dict[str, Any], site_section: dict[str, Any]) -> ModelCard:
    from safetensors.torch import load_file, save_file

    parent_dir = Path(nets[0].source)
    parent_card = ModelCard.from_dir(parent_dir).to_dict()
    common = {"temperature": fields["temperature"], "logit_offset": fields["logit_offset"],
              "calibration": "p = sigmoid(logit / temperature + logit_offset), fitted on the site folder's "
                             "cross-validated (out-of-fold) logits",
              "operating_points": fields["operating_points"], "default_operating_point": DEFAULT_OPERATING_POINT,
              "validation": validation}
    drop = ("test", "validation_before_protocol", "revalidation", "protocol")
    base = method.removeprefix(BN_PREFIX)
    if base in ("recalibrate", *SINGLE_NETWORK_METHODS):
        card = {k: v for k, v in parent_card.items() if k not in drop}
        card.update(common)
        card["name"] = out.name
        card["description"] = (f"{parent_card.get('name')} adapted to a site ({method.replace('_', ' ')}): "
                               + str(parent_card.get("description") or ""))
        state = load_file(str(parent_dir / parent_card.get("weights_file", WEIGHTS_FILE)))
        for net in nets:  # site batch-norm statistics, where the candidate has them
            if net.is_parent:
                for k, v in _site_statistics(net).items():
                    state[net.prefix + k] = v.to(state[net.prefix + k].dtype)
        if method == "finetune_head":
            dtype = state["classifier.weight"].dtype
            state["classifier.weight"] = torch.tensor(final.params["weight"]).reshape(1, -1).to(dtype)
            state["classifier.bias"] = torch.tensor([final.params["bias"]]).to(dtype)
        if method == "finetune_blocks":
            for k, v in final.params["tail"].state_for_parent().items():
                if k not in state:
                    raise BoneAIError(f"The tuned tail's {k!r} is not in the parent's weights.")
                state[k] = v.to(state[k].dtype)
        # The logits were fitted (calibration, head) on mirror-averaged features; a linear head makes
        # that the same as the predictor's mirror averaging of logits.
        card["tta_hflip"] = True
        card["weights_file"] = WEIGHTS_FILE
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / WEIGHTS_FILE))
    else:
        state: dict[str, torch.Tensor] = {}
        members = []
        used = final.params["nets"]
        sources: dict[str, dict[str, torch.Tensor]] = {}
        for j, i in enumerate(used):
            net = nets[i]
            if net.source not in sources:
                src_card = ModelCard.from_dir(net.source)
                sources[net.source] = load_file(str(Path(net.source) / src_card.weights_file))
            for k, v in sources[net.source].items():
                if k.startswith(net.prefix):
                    state[f"m{j}.{k[len(net.prefix):]}"] = v.contiguous()
            for k, v in _site_statistics(net).items():
                state[f"m{j}.{k}"] = v.to(state[f"m{j}.{k}"].dtype).contiguous()
            p = final.params["probes"][j]
            for name in ("mean", "scale", "coef", "intercept"):
                state[f"probe.{j}.{name}"] = torch.tensor(np.asarray(p[name], dtype=np.float32))
            member_card = net.predictor.card.to_dict()
            members.append({**{k: member_card[k] for k in ("architecture", "input_size", "mean", "std", "pipeline",
                                                            "description") if k in member_card},
                            "tta_hflip": True, "prefix": f"m{j}.", "source": net.source, "source_prefix": net.prefix,
                            "parent": net.is_parent, "weights_sha256": net.weights_sha256,
                            "site_batchnorm": bool(net.bn_images)})
        save_file(state, str(out / WEIGHTS_FILE))
        first = members[0]
        card = {"name": out.name, "task": "fracture", "kind": "site_probe", "architecture": "site_probe",
                "description": (f"Site model: {'parent logit + ' if final.params['parent_weight'] else ''}"
                                "L2 logistic probes on the pooled, mirror-averaged features of "
                                + ", ".join(nets[i].label for i in used)
                                + (", with batch-norm statistics re-estimated on the site's images"
                                   if method.startswith(BN_PREFIX) else "")),
                "input_size": first["input_size"], "mean": first["mean"], "std": first["std"],
                "pipeline": first["pipeline"], "tta_hflip": True, "weights_file": WEIGHTS_FILE,
                "members": members,
                "probe": {"features": "sqrt of pooled encoder features, mirror-averaged, standardised",
                          "weights": [float(w) for w in final.params["weights"]],
                          "parent_weight": float(final.params["parent_weight"]),
                          "parent_members": [j for j, i in enumerate(used) if nets[i].is_parent],
                          "C": [float(c) for c in final.params["C"]]},
                **common}
    card["site"] = _jsonable(site_section)
    card["training"] = {"command": site_section["command"], "commands": [site_section["command"]],
                        "n_train": site_section["data"]["n"], "n_val": site_section["data"]["n"],
                        "train_seconds": site_section["seconds"]}
    card["data"] = {"site": site_section["data"]}
    typed = ModelCard.from_dict(json.loads(json.dumps(card, default=_json_default)), out)
    typed.write(out)
    return typed


def _site_statistics(net: FeatureNet) -> dict[str, torch.Tensor]:
    """The batch-norm running statistics a network with site statistics stores ({} for the others)."""
    from boneai.site_bn import batchnorm_buffers

    return batchnorm_buffers(net.predictor.model) if net.bn_images else {}


def _json_default(o: Any) -> Any:

    return json_default(o)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=_json_default))


def cached_logits(model: str | Path, paths: Sequence[str], cache: str | Path) -> np.ndarray:
    """A site or parent model's raw logits from features already in ``cache`` (no forward pass).

    For benchmarks that score many fitted models on the same images: the logits equal those of the
    loaded model's ``predict_many`` (mirror-averaged) to float32 rounding; ``bench/site_adapt.py``
    checks that on its first repeat. Works for ``site_probe`` models and single-network classifiers
    (a recalibrated or head-fine-tuned parent, whose backbone is the parent's).
    """

    folder = model_dir(model)
    card = ModelCard.from_dir(folder)
    if (card.get("site") or {}).get("site_batchnorm"):
        raise BoneAIError(f"{card.name} has site batch-norm statistics: its features are not the cached ones; "
                          "score it with a forward pass (predict_many).")
    store = FeatureCache(cache)
    digests = [file_sha256(p) for p in paths]

    def feats(weights_sha256: str, prefix: str) -> np.ndarray:
        key = hashlib.sha256(f"{weights_sha256}:{prefix}".encode()).hexdigest()[:16]
        found = store.get(key)
        missing = [d for d in digests if d not in found]
        if missing:
            raise BoneAIError(f"{len(missing)} images have no cached features for {card.name}; run adapt first.")
        return np.stack([found[d] for d in digests]).astype(np.float64)

    weights = read_weights(folder / card.weights_file)
    if card.model_kind == "site_probe":
        spec = card["probe"]
        score = np.zeros(len(paths))
        parent = np.zeros(len(paths))
        parents = [int(j) for j in spec.get("parent_members", [0])]
        for j, m in enumerate(card["members"]):
            x = feats(m["weights_sha256"], m.get("source_prefix", ""))
            probe = {k: weights[f"probe.{j}.{k}"].double().numpy() for k in ("mean", "scale", "coef", "intercept")}
            score += float(spec["weights"][j]) * _probe_score(probe, x)
            if j in parents:
                w = weights[f"m{j}.classifier.weight"].double().numpy().reshape(-1)
                parent += (x @ w + float(weights[f"m{j}.classifier.bias"].reshape(-1)[0])) / len(parents)
        return score + float(spec.get("parent_weight", 0.0)) * parent
    if card.model_kind != "classifier":
        raise BoneAIError(f"cached_logits: {card.name} is a {card.model_kind} model; use predict_many.")
    if (card.get("site") or {}).get("method") == "finetune_blocks":  # its tail, on the parent's cached tail inputs
        from boneai.site_tail import TAIL_BLOCKS, Tail, tail_logits

        key = hashlib.sha256(f"{card['site']['parent_weights_sha256']}:".encode()).hexdigest()[:16]
        found = store.get(f"{key}-tail{TAIL_BLOCKS}")
        if any(d not in found for d in digests):
            raise BoneAIError(f"Some images have no cached tail inputs for {card.name}; run adapt first.")
        return tail_logits(Tail(load_model(folder).model), np.stack([found[d] for d in digests]))
    sha = card["site"]["parent_weights_sha256"] if "site" in card else file_sha256(folder / card.weights_file)
    x = feats(sha, "")
    w = weights["classifier.weight"].double().numpy().reshape(-1)
    return x @ w + float(weights["classifier.bias"].reshape(-1)[0])
