"""The site model that ``python -m boneai adapt`` writes (kind ``site_probe``): probes on the pooled
features of one or more networks, averaged, optionally with the parent's own logit.

Only what loading and predicting need lives here, so that :mod:`boneai.inference` can register the
loader without importing the adaptation code (:mod:`boneai.site`), which itself resolves models by name
through :mod:`boneai.inference`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from boneai.card import ModelCard
from boneai.ensemble import EnsemblePredictor
from boneai.errors import ModelNotFoundError
from boneai.predictor import (
    Image,
    ModelResolver,
    Predictor,
    build_network,
    read_weights,
    register_loader,
)
from boneai.transforms import to_tensor

__all__ = ["SiteProbePredictor", "load_site_probe", "probe_score"]


def probe_score(p: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """A fitted probe's logit on pooled features (square-root, standardised, linear)."""
    z = (np.sqrt(np.maximum(x, 0.0)) - p["mean"]) / p["scale"]
    return z @ p["coef"] + float(np.ravel(p["intercept"])[0])



# -- the site model ---------------------------------------------------------------------------------
@register_loader("site_probe")
def load_site_probe(card: ModelCard | Mapping[str, Any], directory: str | Path,
                    resolve: ModelResolver | None = None) -> SiteProbePredictor:
    """A :class:`SiteProbePredictor` from a site model folder written by :func:`adapt`."""
    directory = Path(directory)
    card = ModelCard.coerce(card, directory)
    weights = directory / card.weights_file
    if not weights.is_file():
        raise ModelNotFoundError(f"Site model {card.name!r} has a card but no weights file ({weights.name}).")
    members = [Predictor(m.card(card), build_network(m.architecture, read_weights(weights, m.prefix)), directory)
               for m in card.members]
    arrays = read_weights(weights, "probe.")
    probes = [{k: arrays[f"{j}.{k}"].double().numpy() for k in ("mean", "scale", "coef", "intercept")}
              for j in range(len(members))]
    return SiteProbePredictor(card, members, probes, directory)


class SiteProbePredictor(EnsemblePredictor):
    """A site model: probes on its networks' pooled features (and optionally the parent's logit).

    Heatmaps, the input shown and ``model`` (for Grad-CAM) are the first network's, i.e. the parent's.
    """

    def __init__(self, card: ModelCard, members: Sequence[Predictor], probes: Sequence[Mapping[str, np.ndarray]],
                 directory: Path) -> None:
        super().__init__(card, members, directory)  # members, first-member inputs and Grad-CAM network
        self.probes = list(probes)
        self.task = "fracture"
        spec = self.card["probe"]
        self.weights = [float(w) for w in spec["weights"]]
        self.parent_weight = float(spec.get("parent_weight", 0.0))
        self.parent_members = [int(j) for j in spec.get("parent_members", [0])]

    def _outputs(self, images: Sequence[Image], sex: torch.Tensor | None
                 ) -> tuple[np.ndarray, list[np.ndarray], list[dict[str, Any]]]:
        score = np.zeros(len(images))
        parent = np.zeros(len(images))
        first_inputs: list[np.ndarray] = []
        for j, (m, p, w) in enumerate(zip(self.members, self.probes, self.weights, strict=True)):
            inputs = [m.input_image(im) for im in images]
            if j == 0:
                first_inputs = inputs
            feats = m.pooled_features(torch.stack([to_tensor(im, m.mean, m.std) for im in inputs]), mirror=True)
            score += w * probe_score(p, feats.astype(np.float64))
            if j in self.parent_members:
                clf = m.model.get_classifier()
                parent += (feats @ clf.weight.detach().reshape(-1).double().numpy()
                           + float(clf.bias.detach().reshape(-1)[0])) / len(self.parent_members)
        score += self.parent_weight * parent
        return score, first_inputs, [{} for _ in images]
