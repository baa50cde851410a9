"""CPU inference latency of a shipped model: one view (read + preprocessing + forward) and batch throughput.

Usage:  .venv/bin/python bench/inference_latency.py [--model fracture] [--repeats 30] [--runs 5 --pause 10] [--scope]
Prints a table and writes bench/results/inference_latency.json (or ``--out``). Run it on an idle
machine: other processes on the same cores inflate every figure. ``BONEAI_INFERENCE_DTYPE=bfloat16``
measures the bfloat16 forward pass (see boneai.inference.inference_dtype); ``BONEAI_FOLD_BN=0`` the
forward pass without batch norms folded into the convolutions. ``--scope`` times each view as ``predict``
and the app run it: read, prediction, then the scope and familiarity check (``boneai.scope.check_views``,
which reuses the prediction's pooled features and adds the ImageNet network's pass).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

from boneai.inference import load_model  # noqa: E402
from boneai.io import read_radiograph  # noqa: E402
from boneai.scope import check_views  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fracture")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--runs", type=int, default=1,
                        help="repeat the per-view measurement N times, --pause seconds apart (shared machines drift)")
    parser.add_argument("--pause", type=float, default=10.0)
    parser.add_argument("--scope", action="store_true", help="include the scope and familiarity check per view")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "inference_latency.json"))
    args = parser.parse_args()
    files = sorted((REPO / "samples" / "fracatlas").glob("*.jpg"))
    data = [f.read_bytes() for f in files]
    t0 = time.perf_counter()
    predictor = load_model(args.model)
    load_s = time.perf_counter() - t0
    members = getattr(predictor, "members", [predictor])

    def one_view(raw: bytes) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rg = read_radiograph(raw, name="bench")
            pred = predictor.predict(rg)
            if args.scope:  # as predict and the app: the scope check on the prediction's features
                check_views([rg], predictor=predictor, predictions=[pred])

    for raw in data[:3]:  # warm-up: first calls allocate and pick kernels
        one_view(raw)
    per_view, pre_only, forward_only, run_medians = [], [], [], []
    for i in range(args.repeats * args.runs):
        if i and i % args.repeats == 0:
            run_medians.append(round(statistics.median(per_view[-args.repeats:]), 1))
            time.sleep(args.pause)
        raw = data[i % len(data)]
        t = time.perf_counter()
        if args.scope:  # the whole path of a view, as one_view runs it
            one_view(raw)
            per_view.append((time.perf_counter() - t) * 1000)
            continue
        rg = read_radiograph(raw, name="bench")
        if hasattr(predictor, "views"):
            # A localiser: file bytes to probability and boxes in the file's pixels, as the app shows them.
            predictor.predict(rg)
            t_end = time.perf_counter()
            t_pre = time.perf_counter()
            predictor.input_image(rg)  # preprocessing alone, timed apart (not part of the view's time)
            pre_ms = (time.perf_counter() - t_pre) * 1000
            per_view.append((t_end - t) * 1000)
            pre_only.append(pre_ms)
            forward_only.append(per_view[-1] - pre_ms)
            continue
        tensors = [m.input_tensor(rg) for m in members]  # each ensemble member has its own pipeline
        t_pre = time.perf_counter()
        for m, tensor in zip(members, tensors):
            m.raw_outputs(tensor)
        t_end = time.perf_counter()
        per_view.append((t_end - t) * 1000)
        pre_only.append((t_pre - t) * 1000)
        forward_only.append((t_end - t_pre) * 1000)
    run_medians.append(round(statistics.median(per_view[-args.repeats:]), 1))
    images = [read_radiograph(data[i % len(data)], name="bench") for i in range(args.batch)]
    predictor.predict_many(images[:2])
    t = time.perf_counter()
    reps = 3
    for _ in range(reps):
        predictor.predict_many(images)
    throughput = reps * args.batch / (time.perf_counter() - t)
    result = {
        "model": predictor.name, "architecture": predictor.card.get("architecture"),
        "input_size": [m.card.get("input_size") for m in members] if len(members) > 1 else predictor.card.get("input_size"),
        "tta_hflip": predictor.card.get("tta_hflip"),
        "per_view_ms_median": round(statistics.median(per_view), 1),
        "per_view_ms_p90": round(sorted(per_view)[int(0.9 * (len(per_view) - 1))], 1),
        "per_view_ms_median_of_each_run": run_medians,
        "scope_check": bool(args.scope),
        "preprocess_ms_median": round(statistics.median(pre_only), 1) if pre_only else None,
        "forward_ms_median": round(statistics.median(forward_only), 1) if forward_only else None,
        "batch_size": args.batch, "batch_images_per_s": round(throughput, 1),
        "model_load_s": round(load_s, 2), "repeats": args.repeats, "runs": args.runs,
        "inference_dtype": str(getattr(predictor, "dtype", torch.float32)).replace("torch.", ""),
        "batchnorm_folded": predictor.batchnorm_folded,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "torch": torch.__version__,
    }
    for k, v in result.items():
        print(f"{k:22s} {v}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
