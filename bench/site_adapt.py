"""Site adaptation on a simulated other site (issue 12, part 3): parent vs ``adapt`` over random halvings.

The site: FracAtlas *validation* rows (never trained on by any shipped model; never the test rows),
every positive plus a seeded draw of negatives (~190 images), re-imaged with another site's look
(``boneai.site_sim``: lower resolution, another contrast curve, edge enhancement, collimator
shutters with a burnt-in marker, noise, JPEG). Each repeat splits the site in two stratified halves,
runs ``adapt`` (``boneai.site.adapt``, every choice by cross-validation inside the half) on one half,
and scores the parent, a plain logistic regression on the parent's pooled features (``adapt
--methods linear_probe``, the issue's baseline), the parent with the adapting half's batch-norm
statistics alone (``--methods bn_recalibrate``) and the adapted model on the other half. Models with
site statistics are scored with a forward pass (their features are not the cached ones).

Features are computed once per image and network (``--work``/cache); a repeat then costs only the
cross-validation. The first repeat also scores the adapted model end to end (``evaluate`` on the
other half's files) and checks it equals the cached-feature score.

A held-out region instead of another imaging chain (``--region hand --look none``): the site is that
region's train and validation rows as they are, and the parent a classifier trained without the region
(``--write-training-data DIR`` writes its training folder and prints the command; the benchmark checks
from the parent's card that it never saw a site image). Only the parent's network is then used: the
shipped ones saw every region (``--feature-models none``).

Usage:
  OMP_NUM_THREADS=1 .venv/bin/python bench/site_adapt.py --data ../shared/data/fracatlas --repeats 10
  .venv/bin/python bench/site_adapt.py --data ../shared/data/fracatlas --region hand --write-training-data /tmp/nohand
  .venv/bin/python bench/site_adapt.py --data ../shared/data/fracatlas --region hand --look none --n-pos 66 \
      --feature-models none --parent /tmp/parent_nohand --out bench/results/site_adapt_heldout_hand.json
Writes bench/results/site_adapt.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from boneai.batch import evaluate_folder  # noqa: E402
from boneai.card import ModelCard  # noqa: E402
from boneai.data import read_classification_dir, read_fracatlas, read_split_file  # noqa: E402
from boneai.evaluate import roc_auc  # noqa: E402
from boneai.inference import model_dir  # noqa: E402
from boneai.site import (  # noqa: E402
    METHODS,
    FeatureCache,
    adapt,
    cached_logits,
    default_feature_models,
    feature_nets,
    site_features,  # noqa: E402
    site_tail_inputs,
)
from boneai.site_sim import HARSH, SiteLook, write_site  # noqa: E402


def build_site(data: str, split: str, out: Path, n_neg: int, look: SiteLook | None, seed: int,
               region: str | None = None, n_pos: int | None = None) -> pd.DataFrame:
    """The site's rows, re-imaged with ``look`` (``None``: the files as they are, by symlink).

    Without ``region``: FracAtlas validation rows. With it: that region's train and validation rows,
    for a parent trained without the region (``check_region_unseen``). Never the test rows: no choice,
    not even this bench's, sees them."""
    df = read_fracatlas(data).merge(read_split_file(split)[["image_id", "split"]], on="image_id")
    pool = df[df["split"].isin(["train", "val"]) & (df["region"] == region)] if region else df[df["split"] == "val"]
    pos = pool[pool["label"] == 1]
    if n_pos is not None:
        pos = pos.sample(n_pos, random_state=seed)
    rows = pd.concat([pos, pool[pool["label"] == 0].sample(n_neg, random_state=seed)]).reset_index(drop=True)
    if out.exists():
        shutil.rmtree(out)
    if look is not None:
        return write_site(rows, out, look, seed=seed)
    out.mkdir(parents=True)
    rows["site_path"] = [str(out / f"{i:04d}_{Path(p).name}") for i, p in enumerate(rows["path"])]
    for src, dst in zip(rows["path"], rows["site_path"], strict=True):
        Path(dst).symlink_to(Path(src).resolve())
    return rows


def write_training_data(data: str, split: str, region: str, out: Path) -> int:
    """A FracAtlas-layout folder (symlinks) of every train and validation row outside ``region``: what a
    parent for a held-out-region site trains on (never the test rows). Returns its image count."""
    src = Path(data).resolve()
    rows = read_split_file(split)
    keep = set(rows.loc[(rows["region"] != region) & (rows["split"] != "test"), "image_id"])
    if out.exists():
        shutil.rmtree(out)
    meta = pd.read_csv(src / "dataset.csv")
    out.mkdir(parents=True)
    meta[meta["image_id"].isin(keep)].to_csv(out / "dataset.csv", index=False)
    n = 0
    for folder in ("Fractured", "Non_fractured"):
        (out / "images" / folder).mkdir(parents=True)
        for f in sorted((src / "images" / folder).iterdir()):
            if f.name in keep:
                (out / "images" / folder / f.name).symlink_to(f)
                n += 1
    return n


def check_region_unseen(parent: str, site: pd.DataFrame) -> str:
    """The parent's training folder holds none of the site's images (a held-out region is only held out
    if the parent never saw it); returns that folder."""
    card = ModelCard.from_dir(model_dir(parent))
    data = (card.training.config or {}).get("data") if card.training is not None else None
    if not data:
        raise SystemExit(f"the parent {parent}'s card does not say what it trained on")
    seen = set(read_classification_dir(data)["image_id"])
    overlap = seen.intersection(site["image_id"])
    if overlap:
        raise SystemExit(f"the parent {parent} trained on {len(overlap)} of the site's images "
                         f"(e.g. {sorted(overlap)[0]})")
    return str(data)


def half_folder(rows: pd.DataFrame, dest: Path) -> None:
    """A class-folder copy of some site rows (symlinks: the feature cache keys by content)."""
    if dest.exists():
        shutil.rmtree(dest)
    for r in rows.itertuples():
        sub = dest / ("fractured" if r.label else "not_fractured")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / Path(r.site_path).name).symlink_to(r.site_path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="FracAtlas folder")
    ap.add_argument("--split", default=str(REPO / "weights/splits/fracatlas.csv"))
    ap.add_argument("--parent", default="fracture")
    ap.add_argument("--n-neg", type=int, default=124, help="negatives drawn (all validation positives are used)")
    ap.add_argument("--n-pos", type=int, default=None, help="positives drawn (default: all of the pool's)")
    ap.add_argument("--look", choices=["harsh", "drawn", "none"], default="harsh",
                    help="harsh: the fixed chain above; drawn: SiteLook.draw(--seed); none: the files as they are")
    ap.add_argument("--region", default=None,
                    help="a held-out region: the site is this region's train and validation rows, and the parent "
                         "must have trained without them (checked from its card)")
    ap.add_argument("--write-training-data", default=None, metavar="DIR",
                    help="with --region: write the parent's training folder (every train and validation row outside "
                         "the region, FracAtlas layout, symlinks) to DIR, print the train command and stop")
    ap.add_argument("--feature-models", default=None,
                    help="comma-separated networks for the probes besides the parent, or 'none' (default: adapt's, "
                         "the other shipped classifiers; these saw every region)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--only", default=None,
                    help="comma-separated repeat numbers to run (the others' halvings are drawn and skipped, so "
                         "these get the same halves as in a full run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/boneai_site_bench")
    ap.add_argument("--out", default=str(REPO / "bench/results/site_adapt.json"))
    args = ap.parse_args()
    if args.write_training_data:
        if not args.region:
            ap.error("--write-training-data needs --region")
        n = write_training_data(args.data, args.split, args.region, Path(args.write_training_data))
        print(f"{n} images in {args.write_training_data}; train the parent with:\n  python -m boneai train --task "
              f"fracture --data {args.write_training_data} --model efficientnet_lite0 "
              f"--out runs/parent_no_{args.region} --epochs 12 --image-size 224 --batch-size 32 --lr 1e-3 "
              "--freeze-blocks 2")
        return 0
    t0 = time.time()
    work = Path(args.work)
    cache = work / "cache"
    look = {"harsh": HARSH, "drawn": SiteLook.draw(args.seed), "none": None}[args.look]
    site = build_site(args.data, args.split, work / "site", args.n_neg, look, args.seed, args.region, args.n_pos)
    y = site["label"].to_numpy().astype(int)
    source = (f"FracAtlas {args.region} rows of train and validation, a region the parent never trained on "
              f"(its data: {check_region_unseen(args.parent, site)})" if args.region
              else "FracAtlas validation rows (not train, not test)")
    print(f"site: {len(site)} images ({y.sum()} fractured) from {source}, look {look}", flush=True)
    feature_models = (default_feature_models(args.parent) if args.feature_models is None
                      else [] if args.feature_models == "none" else args.feature_models.split(","))
    nets = feature_nets(args.parent, True)
    for m in feature_models:
        nets += feature_nets(m, False)
    site_features(nets, site["site_path"].tolist(), FeatureCache(cache))
    if "finetune_blocks" in METHODS:  # the parent's tail inputs, so that cached_logits scores a tuned tail
        site_tail_inputs(nets[0], site["site_path"].tolist(), FeatureCache(cache))
    print(f"features of {len(nets)} networks cached ({time.time() - t0:.0f} s)", flush=True)
    parent_all = cached_logits(args.parent, site["site_path"].tolist(), cache)
    rng = np.random.default_rng(args.seed)
    rows = []

    def summarise(rows: list[dict]) -> dict:
        table = pd.DataFrame(rows)

        def summary(col: str) -> dict[str, float]:
            v = table[col].to_numpy(dtype=float)
            return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}

        threads = os.environ.get("OMP_NUM_THREADS")
        out = {"command": (f"OMP_NUM_THREADS={threads} " if threads else "") + ".venv/bin/python "
                          + " ".join(shlex.quote(a) for a in sys.argv),
               "date": datetime.now(UTC).isoformat(timespec="seconds"),
               "site": {"source": source, "n": int(len(y)), "n_positive": int(y.sum()),
                        "look": None if look is None else {k: (list(v) if isinstance(v, tuple) else v)
                                                           for k, v in look.__dict__.items()}},
               "feature_models": feature_models,
               "parent": args.parent, "repeats": args.repeats, "repeats_done": len(rows),
               "methods": list(METHODS),
               "parent_auc": summary("parent_auc"), "plain_probe_auc": summary("plain_probe_auc"),
               "adapted_auc": summary("adapted_auc"), "cv_auc": summary("cv_auc"),
               "site_statistics_auc": summary("site_statistics_auc"),
               "methods_chosen": table["method"].value_counts().to_dict(),
               "seconds": round(time.time() - t0, 1), "runs": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2, default=float))
        return out

    only = None if args.only is None else {int(v) for v in args.only.split(",")}
    for rep in range(args.repeats):
        a_idx = np.concatenate([rng.permutation(np.where(y == c)[0])[: (y == c).sum() // 2] for c in (0, 1)])
        if only is not None and rep not in only:
            continue
        b_idx = np.setdiff1d(np.arange(len(y)), a_idx)
        half_folder(site.iloc[a_idx], work / "half_a")
        b_paths = site["site_path"].iloc[b_idx].tolist()
        res = {"repeat": rep, "n_adapt": len(a_idx), "n_eval": len(b_idx), "n_eval_positive": int(y[b_idx].sum()),
               "parent_auc": roc_auc(y[b_idx], parent_all[b_idx])}
        card = adapt(work / "half_a", work / "model", parent=args.parent, cache=cache, seed=rep,
                     feature_models=feature_models)
        res["method"] = card["site"]["method"]
        res["cv_auc"] = card["validation"]["auc"]
        res["candidates_cv_auc"] = {k: v["cv_auc"] for k, v in card["site"]["candidates"].items()}
        half_folder(site.iloc[b_idx], work / "half_b")
        if card["site"].get("site_batchnorm"):  # its own statistics: scored with a forward pass
            res["adapted_auc"] = evaluate_folder("fracture", work / "half_b", str(work / "model"))["auc"]
        else:
            res["adapted_auc"] = roc_auc(y[b_idx], cached_logits(work / "model", b_paths, cache))
        base = adapt(work / "half_a", work / "baseline", parent=args.parent, cache=cache, seed=rep,
                     methods=["linear_probe"], feature_models=[])
        res["plain_probe_auc"] = roc_auc(y[b_idx], cached_logits(work / "baseline", b_paths, cache))
        # The parent with the adapting half's batch-norm statistics and nothing else fitted (AdaBN alone).
        adapt(work / "half_a", work / "site_statistics", parent=args.parent, cache=cache, seed=rep,
              methods=["bn_recalibrate"], feature_models=[])
        res["site_statistics_auc"] = evaluate_folder("fracture", work / "half_b", str(work / "site_statistics"))["auc"]
        del base
        if rep == 0 and not card["site"].get("site_batchnorm"):  # the cached shortcut equals the model run end to end
            end_to_end = evaluate_folder("fracture", work / "half_b", str(work / "model"))["auc"]
            res["adapted_auc_end_to_end"] = end_to_end
            assert abs(end_to_end - res["adapted_auc"]) < 2e-3, (end_to_end, res["adapted_auc"])
        rows.append(res)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}), flush=True)
        out = summarise(rows)  # written after every repeat, so a stopped run keeps what it measured
    for k in ("parent_auc", "plain_probe_auc", "site_statistics_auc", "adapted_auc"):
        s = out[k]
        print(f"{k:16s} median {s['median']:.3f} (range {s['min']:.3f}-{s['max']:.3f})")
    print(f"methods chosen: {out['methods_chosen']}; {out['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
