"""Scope and familiarity figures (issue 12, parts 1 and 2) of the shipped scope model ``weights/scope``.

Scope (is the view a musculoskeletal radiograph of a trained region?):
  * held-out negatives: whole sources (package images, synthetic generators) never fitted on, each
    with its augmented variants, judged on their pixels alone (as a PNG export, no header): how many
    are flagged out of scope;
  * the original package files end to end (DICOM header included), e.g. pydicom's CT/MR test files;
  * FracAtlas test split (never fitted on, never used for a choice): how many are wrongly flagged;
  * the 40 full-resolution RSNA hands (other hospitals): in scope by definition, how many flagged;
  * in-scope radiographs as other sites export them (``boneai.site_sim``): the FracAtlas test split with
    a drawn look per image, and the validation split through the simulated site's harsh chain.
Familiarity (how like the fracture model's training images?):
  * AUC of separating FracAtlas validation images from the 40 full-resolution RSNA hands;
  * how many FracAtlas test (and validation) images are called unfamiliar;
  * the number of principal components, chosen on a development proxy that is not the measured set:
    FracAtlas validation vs 300 RSNA hands of the 100x100 copy (other images than the 40).
Familiarity of a set of views (``boneai.scope.set_familiarity``): how often random sets of N views of
one source are called unfamiliar. FracAtlas sets are drawn as whole near-duplicate groups of the split
(a patient's views together), the other sources' views one by one. The rule was chosen on FracAtlas
validation and the 100x100 RSNA hands; the FracAtlas test split, the 40 full-resolution hands and the
re-imaged radiographs only measure it.

Usage:
  OMP_NUM_THREADS=1 .venv/bin/python bench/scope_familiarity.py --data ../shared/data/fracatlas \\
      --boneage ../shared/data/boneage
Writes bench/results/scope_familiarity.json. Features are cached (runs/scope/features_MODEL.npz, MODEL the
scope card's feature model, shared with ``python -m boneai train-scope``), so a rerun takes seconds.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import warnings
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from boneai.evaluate import bootstrap_auc_ci, roc_auc  # noqa: E402
from boneai.io import read_radiograph  # noqa: E402
from boneai.scope import (  # noqa: E402
    LOW_FAMILIARITY,
    SET_CONFIDENCE,
    SET_SHARE_BOUND,
    ScopeModel,
    set_familiarity,
)
from boneai.scope_train import (  # noqa: E402
    CLASSES,
    DEFAULT_FEATURE_CACHE,
    FeatureCache,
    Item,
    fit_familiarity,
    negative_items,
    chest_items,
    network_feature_cache,
    other_chain_items,
    radiograph_items,
)
from boneai.site_sim import HARSH  # noqa: E402

#: First seed of the measured test images' looks (train-scope --other-chain draws from 100,000 on).
MEASURED_LOOK_SEED = 200_000


def _share(flags: np.ndarray) -> dict:
    return {"n": int(len(flags)), "flagged": int(flags.sum()), "share": float(flags.mean()) if len(flags) else None}


def _read(path: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_radiograph(path)


def pydicom_files_end_to_end(model: ScopeModel) -> dict:
    """Every readable image among pydicom's test files, with its header, through the whole check."""
    from pydicom.data import get_testdata_files

    rows = []
    for path in sorted(set(get_testdata_files())):
        try:
            rg = _read(path)
        except Exception:  # noqa: BLE001 - not an image we read (too small, no pixels, ...)
            continue
        res = model.check([rg])[0]
        rows.append({"file": Path(path).name, "modality": rg.metadata.get("modality"),
                     "body_part": rg.metadata.get("body_part"), "in_scope": res.in_scope, "source": res.source,
                     "reason": res.reason})
    by_modality: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        by_modality[str(r["modality"])].append(not r["in_scope"])
    return {"files": rows, "by_modality": {m: _share(np.array(v)) for m, v in sorted(by_modality.items())}}


#: Set sizes and random draws per size of the set-level figures.
SET_SIZES = (2, 4, 10, 20, 40)
SET_DRAWS = 1000


def set_level(fam: np.ndarray, src: np.ndarray, group: np.ndarray, seed: int = 0) -> dict:
    """Share of random sets of each size called unfamiliar, per source. ``group``: items drawn together
    (a FracAtlas near-duplicate group), or "" to draw the item alone."""
    rng = np.random.default_rng(seed)
    out: dict = {}
    for source in sorted(set(src)):
        idx = np.flatnonzero(src == source)
        units = defaultdict(list)
        for i in idx:
            units[group[i] or f"#{i}"].append(i)
        units = list(units.values())
        row = {"n_views": int(len(idx)), "views_under_low_familiarity": float(np.mean(fam[idx] < LOW_FAMILIARITY))}
        for n in SET_SIZES:
            if n > len(idx):
                continue
            hits = 0
            for _ in range(SET_DRAWS):
                chosen: list[int] = []
                for u in rng.permutation(len(units)):
                    chosen += units[u]
                    if len(chosen) >= n:
                        break
                hits += set_familiarity(fam[chosen[:n]].tolist()).unfamiliar
            row[f"sets_of_{n}_unfamiliar"] = hits / SET_DRAWS
        out[source] = row
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/fracatlas")
    ap.add_argument("--split", default="weights/splits/fracatlas.csv")
    ap.add_argument("--boneage", default="../shared/data/boneage")
    ap.add_argument("--full-resolution", default=None, help="default: BONEAGE/full_resolution")
    ap.add_argument("--scope", default=str(REPO / "weights" / "scope"))
    ap.add_argument("--cache", default=None,
                    help="default: runs/scope/features_MODEL.npz (the scope card's feature model)")
    ap.add_argument("--chest-held-out", default=str(REPO / "runs" / "chest" / "held_out"),
                    help="chest radiographs never fitted on (bench/chest_films.py); measured when the folder exists")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "scope_familiarity.json"))
    args = ap.parse_args(argv)

    model = ScopeModel.load(args.scope)
    feature_model = Path(model.card["feature_model"]["dir"]).name
    args.cache = args.cache or str(REPO / DEFAULT_FEATURE_CACHE.format(model=feature_model))
    d = model.card["data"]
    rad = radiograph_items(args.data, args.split, args.boneage, d["n_boneage"], d["seed"])
    panels = [it.path for it in rad if it.source == "fracatlas:train"][::50]
    neg = negative_items(d["n_variants"], d["n_synthetic"], d["seed"], panels)
    if d.get("chest"):  # the fitted chest films, as train-scope built them
        if not Path(d["chest"]).is_dir():
            raise SystemExit(f"The scope model's chest films ({d['chest']}) are not here: run "
                             "`python bench/chest_films.py` first.")
        neg += chest_items(d["chest"], d["n_variants"], d["seed"], held_out=False,
                           chain_share=d.get("chest_chain_share", 0.0))
    chest_held: list[Item] = []
    if args.chest_held_out and Path(args.chest_held_out).is_dir():  # exports as they are, then through other chains
        chest_held = chest_items(args.chest_held_out, d["n_variants"], d["seed"], held_out=True, chain_share=0.0)
        chest_held += [it for it in chest_items(args.chest_held_out, d["n_variants"], d["seed"], held_out=True,
                                                chain_share=1.0) if not it.id.endswith("#0")]
    neg += chest_held
    full_dir = Path(args.full_resolution or Path(args.boneage) / "full_resolution") / "images"
    full = [Item(f"rsnafull:{p.name}", "radiograph", "rsna:full_resolution", (lambda p=p: _read(str(p))), True, str(p))
            for p in sorted(full_dir.glob("*.png"))]
    # In-scope radiographs as other sites export them (boneai.site_sim), never fitted on: the test split,
    # each image with its own drawn look (seeds apart from train-scope --other-chain's), and the validation
    # split through the simulated site's fixed harsh chain (bench/site_adapt.py).
    other = (other_chain_items(args.data, args.split, "test", None, MEASURED_LOOK_SEED, "fracatlas:test_other_chain",
                               held_out=True)
             + other_chain_items(args.data, args.split, "val", None, 0, "fracatlas:val_harsh_site", held_out=True,
                                 look=HARSH))
    items = rad + neg + full + other
    store = FeatureCache(args.cache, model.card["feature_model"]["sha256"])
    pooled, colour = store.features(items, model.extractor, log=lambda m: print(m, file=sys.stderr))
    scope_pooled = None
    if model.scope_network:  # the classifier reads an ImageNet network's features (train-scope --imagenet-features)
        store_net, _ = network_feature_cache(args.cache, model.scope_network,
                                             model.card["classifier"].get("features_input"))
        scope_pooled, _ = store_net.features(items, model.scope_extractor, log=lambda m: print(m, file=sys.stderr))
    src = np.array([it.source for it in items])
    cls = np.array([it.cls for it in items])
    held = np.array([it.held_out for it in items])

    results = model.decide(pooled, colour, [{}] * len(items), scope_pooled)  # pixels only: a PNG export, no header
    flagged = np.array([not r.in_scope for r in results])
    decider = np.array([r.source for r in results])
    is_neg = cls != "radiograph"

    scope: dict = {"note": "pixels only (no DICOM header): the image model and the colour rule"}
    original = np.array([it.id.endswith("#0") and not it.source.startswith("synthetic") for it in items])
    scope["held_out_negatives"] = _share(flagged[is_neg & held])
    scope["held_out_negatives_by_class"] = {c: _share(flagged[(cls == c) & held]) for c in CLASSES[1:]}
    chest_reason = model.card["classifier"]["reasons"].get("chest")
    called_chest = np.array([bool(chest_reason) and (r.reason or "").startswith(chest_reason) for r in results])
    chest_src = np.char.startswith(src.astype(str), "chest_held_out:")
    scope["chest_held_out"] = {
        "note": "real chest films from other packages than the fitted ones (bench/chest_films.py), pixels only; "
                "each original with its exports",
        "flagged": _share(flagged[chest_src]),
        "called_chest": _share(called_chest[chest_src]),
        "originals_flagged": _share(flagged[chest_src & original]),
        "exports_flagged": _share(flagged[chest_src & ~original & np.array([":chain0#" in it.id for it in items])]),
        "exports_through_other_chains_flagged": _share(
            flagged[chest_src & np.array([":chain1#" in it.id for it in items])]),
        "originals": [{"file": it.path and Path(it.path).name, "in_scope": r.in_scope, "reason": r.reason,
                       "class_probabilities": r.extras.get("class_probabilities")}
                      for it, r in zip(items, results) if it.source.startswith("chest_held_out:")
                      and it.id.endswith("#0")],
    }
    # FracAtlas test views whose region holds part of the chest (shoulder): wrongly called chest?
    scope["fracatlas_test_called_chest"] = _share(called_chest[src == "fracatlas:test"])
    scope["held_out_negatives_by_source"] = {
        s: {**_share(flagged[src == s]), "class": str(cls[src == s][0]),
            "flagged_by_colour_rule": int(((decider == "colour") & flagged & (src == s)).sum())}
        for s in sorted(set(src[is_neg & held]))}
    scope["held_out_package_originals"] = _share(flagged[is_neg & held & original])  # unaugmented files
    scope["fitted_negatives_in_sample"] = _share(flagged[is_neg & ~held])
    for part in ("train", "val", "test"):
        scope[f"fracatlas_{part}_wrongly_flagged"] = _share(flagged[src == f"fracatlas:{part}"])
    scope["fracatlas_test_flagged_files"] = [{"image": it.id.split(":", 1)[1], "reason": r.reason}
                                             for it, r, f in zip(items, results, flagged)
                                             if f and it.source == "fracatlas:test"]
    scope["rsna_full_resolution_flagged"] = _share(flagged[src == "rsna:full_resolution"])
    scope["fracatlas_test_other_chains_wrongly_flagged"] = _share(flagged[src == "fracatlas:test_other_chain"])
    scope["fracatlas_val_harsh_site_chain_wrongly_flagged"] = _share(flagged[src == "fracatlas:val_harsh_site"])
    scope["rsna_100px_fitted_flagged_in_sample"] = _share(flagged[src == "rsna:train"])
    scope["targets"] = {"out_of_scope_flagged_min": 0.95, "fracatlas_test_flagged_max": 0.01}
    scope["end_to_end_pydicom_test_files"] = pydicom_files_end_to_end(model)

    fam = np.array([r.familiarity for r in results])
    dist = model.distances(pooled)
    unfamiliar = np.array([bool(r.unfamiliar) for r in results])
    val, test, fullres, dev = (src == "fracatlas:val", src == "fracatlas:test", src == "rsna:full_resolution",
                               src == "rsna:train")
    y = np.r_[np.zeros(val.sum()), np.ones(fullres.sum())]
    s = np.r_[dist[val], dist[fullres]]
    familiarity: dict = {
        "method": model.card["familiarity"]["method"], "threshold": model.familiarity_threshold,
        "auc_val_vs_rsna_full_resolution": roc_auc(y, s),
        "auc_ci95": list(bootstrap_auc_ci(y, s)),
        "n_val": int(val.sum()), "n_rsna_full_resolution": int(fullres.sum()),
        "fracatlas_test_unfamiliar": _share(unfamiliar[test]),
        "fracatlas_val_unfamiliar": _share(unfamiliar[val]),
        "rsna_full_resolution_unfamiliar": _share(unfamiliar[fullres]),
        "median_familiarity": {"fracatlas_test": float(np.median(fam[test])),
                               "rsna_full_resolution": float(np.median(fam[fullres]))},
        "target_auc_min": 0.90,
    }
    # The component count: chosen on the development proxy (val vs 100x100 RSNA hands), reported for all.
    train_feats = pooled[src == "fracatlas:train"]
    choice = []
    for k in (4, 8, 16, 32, 64, 128, 256):
        stats = fit_familiarity(train_feats, pooled[val], k)
        probe = ScopeModel.__new__(ScopeModel)
        probe.a = stats
        dd = probe.distances(pooled)
        choice.append({"components": k,
                       "dev_auc_val_vs_rsna_100px": roc_auc(np.r_[np.zeros(val.sum()), np.ones(dev.sum())],
                                                            np.r_[dd[val], dd[dev]]),
                       "auc_val_vs_rsna_full_resolution_not_used_for_choice": roc_auc(y, np.r_[dd[val], dd[fullres]])})
    familiarity["components_used"] = int(model.a["fam_components"].shape[0])
    familiarity["component_choice"] = choice

    groups = pd.read_csv(args.split).set_index("image_id")["group"].to_dict()
    group = np.array([groups.get(it.id.rsplit(":", 1)[-1], "") if it.source.startswith("fracatlas:") else ""
                      for it in items])
    measured = {"fracatlas:val": "chosen on", "rsna:train": "chosen on", "fracatlas:train": "in-sample features",
                "fracatlas:test": "measured", "rsna:full_resolution": "measured",
                "fracatlas:test_other_chain": "measured", "fracatlas:val_harsh_site": "measured"}
    keep = np.isin(src, list(measured))
    familiarity["sets"] = {
        "rule": f"a set is unfamiliar when the one-sided {SET_CONFIDENCE:.0%} lower bound of its share of views "
                f"under {LOW_FAMILIARITY} exceeds {SET_SHARE_BOUND} (boneai.scope.set_familiarity)",
        "draws": SET_DRAWS, "role": measured,
        "by_source": set_level(fam[keep], src[keep], group[keep]),
    }

    report = {"command": "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]))] + sys.argv[1:]),
              "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "scope_model": {"training_command": model.card["training"]["command"],
                              "classifier_features": model.scope_network or model.card["feature_model"]["name"],
                              "radiograph_threshold": model.radiograph_threshold,
                              "feature_model": model.card["feature_model"]["name"]},
              "scope": scope, "familiarity": familiarity}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=float))
    summary = {"held_out_negatives_flagged": scope["held_out_negatives"]["share"],
               "held_out_negatives_by_class": {k: v["share"] for k, v in scope["held_out_negatives_by_class"].items()},
               "chest_held_out": {k: scope["chest_held_out"][k]["share"] for k in
                                  ("originals_flagged", "exports_flagged", "exports_through_other_chains_flagged")},
               "fracatlas_test_wrongly_flagged": scope["fracatlas_test_wrongly_flagged"]["share"],
               "rsna_full_resolution_flagged": scope["rsna_full_resolution_flagged"]["share"],
               "test_other_chains_flagged": scope["fracatlas_test_other_chains_wrongly_flagged"]["share"],
               "val_harsh_site_flagged": scope["fracatlas_val_harsh_site_chain_wrongly_flagged"]["share"],
               "familiarity_auc": familiarity["auc_val_vs_rsna_full_resolution"],
               "fracatlas_test_unfamiliar": familiarity["fracatlas_test_unfamiliar"],
               "sets_of_4_unfamiliar": {k: v.get("sets_of_4_unfamiliar")
                                        for k, v in familiarity["sets"]["by_source"].items()},
               "sets_of_10_unfamiliar": {k: v.get("sets_of_10_unfamiliar")
                                         for k, v in familiarity["sets"]["by_source"].items()}}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
