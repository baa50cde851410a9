"""Method development for ``adapt``'s ``finetune_blocks`` candidate: does fine-tuning the parent's last
block stage beat a linear probe on its pooled features, at which learning rate and after how many epochs?

Runs on the simulated site that ``bench/site_adapt.py`` builds (run that first: it writes the site and
the feature cache under ``--work``). Five random stratified halvings; each fits on one half and scores
the other. This is a development look (it chose :data:`boneai.site_tail.TAIL_LR` and the epoch grid),
not a held-out figure: ``bench/site_adapt.py`` measures ``adapt`` itself.

Usage:
  OMP_NUM_THREADS=1 .venv/bin/python bench/site_tail_dev.py
Writes bench/results/site_tail_dev.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import boneai.site_tail as tail_mod  # noqa: E402
from boneai.evaluate import roc_auc  # noqa: E402
from boneai.site import FeatureCache, _probe_fit, feature_nets, site_features, site_tail_inputs  # noqa: E402
from boneai.site_model import probe_score  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/boneai_site_bench", help="bench/site_adapt.py's work folder")
    ap.add_argument("--parent", default="fracture")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "bench/results/site_tail_dev.json"))
    args = ap.parse_args()
    work = Path(args.work)
    paths = sorted(str(p) for p in (work / "site").rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not paths:
        raise SystemExit(f"No site in {work}/site: run bench/site_adapt.py first.")
    y = np.array([0 if "/not_fractured/" in p else 1 for p in paths])
    net = feature_nets(args.parent, True)[0]
    cache = FeatureCache(work / "cache")
    feats = site_features([net], paths, cache)[0]
    acts = site_tail_inputs(net, paths, cache)
    clf = net.predictor.model.get_classifier()
    w, b = clf.weight.detach().numpy().reshape(-1), float(clf.bias.detach()[0])
    rng = np.random.default_rng(0)
    results = {}
    for lr in (1e-4, 3e-4):
        tail_mod.TAIL_LR = lr
        rows = []
        for rep in range(args.repeats):
            a = np.concatenate([rng.permutation(np.where(y == c)[0])[: (y == c).sum() // 2] for c in (0, 1)])
            other = np.setdiff1d(np.arange(len(y)), a)
            row = {"parent": roc_auc(y[other], feats[other] @ w + b)}
            for c in (3e-4, 1e-3, 3e-3):
                row[f"probe_C{c}"] = roc_auc(y[other], probe_score(_probe_fit(feats[a], y[a], c), feats[other]))
            t0 = time.time()
            _, scores = tail_mod.train_tail(net.predictor.model, acts[a], y[a], (2, 5, 10, 20), acts[other], seed=rep)
            for e, s in scores.items():
                row[f"tail_{e}_epochs"] = roc_auc(y[other], s)
            row["tail_seconds"] = time.time() - t0
            rows.append(row)
            print(lr, {k: round(v, 3) for k, v in row.items()}, flush=True)
        results[str(lr)] = {"runs": rows, "median": pd.DataFrame(rows).median().round(4).to_dict()}
        print(lr, "median", results[str(lr)]["median"], flush=True)
    out = {"command": "OMP_NUM_THREADS=1 .venv/bin/python bench/site_tail_dev.py " + " ".join(sys.argv[1:]),
           "site": str(work / "site"), "n": len(y), "n_positive": int(y.sum()), "by_learning_rate": results}
    Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
