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

Usage:
  OMP_NUM_THREADS=1 .venv/bin/python bench/site_adapt.py --data ../shared/data/fracatlas --repeats 10
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
from boneai.data import read_fracatlas, read_split_file  # noqa: E402
from boneai.evaluate import roc_auc  # noqa: E402
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


def build_site(data: str, split: str, out: Path, n_neg: int, look: SiteLook, seed: int) -> pd.DataFrame:
    df = read_fracatlas(data).merge(read_split_file(split)[["image_id", "split"]], on="image_id")
    val = df[df["split"] == "val"]  # never "test": no choice, not even this bench's, sees test rows
    rows = pd.concat([val[val["label"] == 1], val[val["label"] == 0].sample(n_neg, random_state=seed)])
    if out.exists():
        shutil.rmtree(out)
    return write_site(rows.reset_index(drop=True), out, look, seed=seed)


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
    ap.add_argument("--look", choices=["harsh", "drawn"], default="harsh",
                    help="harsh: the fixed chain above; drawn: SiteLook.draw(--seed)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--only", default=None,
                    help="comma-separated repeat numbers to run (the others' halvings are drawn and skipped, so "
                         "these get the same halves as in a full run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/boneai_site_bench")
    ap.add_argument("--out", default=str(REPO / "bench/results/site_adapt.json"))
    args = ap.parse_args()
    t0 = time.time()
    work = Path(args.work)
    cache = work / "cache"
    look = HARSH if args.look == "harsh" else SiteLook.draw(args.seed)
    site = build_site(args.data, args.split, work / "site", args.n_neg, look, args.seed)
    y = site["label"].to_numpy().astype(int)
    print(f"site: {len(site)} images ({y.sum()} fractured) from FracAtlas validation rows, look {look}", flush=True)
    nets = feature_nets(args.parent, True)
    for m in default_feature_models(args.parent):
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
               "site": {"source": "FracAtlas validation rows (not train, not test)", "n": int(len(y)),
                        "n_positive": int(y.sum()), "look": {k: (list(v) if isinstance(v, tuple) else v)
                                                             for k, v in look.__dict__.items()}},
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
        card = adapt(work / "half_a", work / "model", parent=args.parent, cache=cache, seed=rep)
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
