"""Site validation: how does a model do on a hospital's own labelled radiographs, and may it be used there?

``python -m boneai validate-site --task fracture --data DIR [--model NAME] --out FILE.json`` scores
the model on a labelled local folder (the layouts ``evaluate`` reads) and reports, each with a
percentile bootstrap interval over images: ROC-AUC, sensitivity and specificity at every operating
point of the card, calibration (ECE) and the familiarity distribution of the views (from
``boneai.scope``). It writes ``FILE.html`` next to ``FILE.json`` and gives a plain verdict:

* **do not use** when the lower 95 % bound of the AUC is under :data:`MIN_AUC_LOWER` (poor
  discrimination cannot be excluded) or the sensitivity at the card's most sensitive operating
  point is under :data:`MIN_SENSITIVITY` (that point was chosen for 0.90 on the validation split);
* **not enough cases** when a class has fewer than :data:`MIN_CASES_PER_CLASS` images (the interval
  would be too wide to tell);
* **usable** otherwise, with a caution when many views are unfamiliar (one by one, or the views taken
  together: :func:`boneai.scope.set_familiarity`) or calibration is off.

This module also unpacks a site zip for the app safely (:func:`extract_site_zip`).
"""

from __future__ import annotations

import html
import json
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np

from boneai import evaluate as ev
from boneai._json import json_default
from boneai.errors import BoneAIError, DatasetError

__all__ = [
    "MIN_AUC_LOWER",
    "MIN_SENSITIVITY",
    "MIN_CASES_PER_CLASS",
    "MAX_UNFAMILIAR_SHARE",
    "MAX_ECE",
    "validate_site",
    "verdict",
    "report_html",
    "write_report",
    "extract_site_zip",
    "find_site_root",
    "ZIP_MAX_FILES",
    "ZIP_MAX_BYTES",
    "ZIP_MAX_FILE_BYTES",
]

#: Below this lower 95 % bound of the ROC-AUC, discrimination may be poor (< 0.70, Hosmer and
#: Lemeshow's "acceptable" threshold) at this site: do not use.
MIN_AUC_LOWER = 0.70
#: The card's most sensitive operating point was set for 0.90 sensitivity on the validation split;
#: under 0.80 at the site, the model misses too many fractures to be used as a safety net.
MIN_SENSITIVITY = 0.80
#: With fewer images of a class, the intervals are too wide to decide either way.
MIN_CASES_PER_CLASS = 20
#: Cautions (not a refusal): many unfamiliar views, or calibration off by this much.
MAX_UNFAMILIAR_SHARE = 0.25
MAX_ECE = 0.10

ZIP_MAX_FILES = 5000
ZIP_MAX_BYTES = 2 * 1024**3
ZIP_MAX_FILE_BYTES = 64 * 1024**2


def _bootstrap(n: int, stat: Callable[[np.ndarray], float], n_boot: int, seed: int) -> list[float]:
    """95 % percentile interval of ``stat(indices)`` over image resamples (NaN draws skipped)."""
    rng = np.random.default_rng(seed)
    values = [stat(rng.integers(0, n, n)) for _ in range(n_boot)]
    values = [v for v in values if np.isfinite(v)]
    if not values:
        return [float("nan"), float("nan")]
    return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]


def _with_ci(value: float, ci: list[float]) -> dict[str, Any]:
    return {"value": float(value), "ci95": ci}


def validate_site(data: str | Path, model: str | None = None, task: str = "fracture", n_boot: int = 1000,
                  seed: int = 0, batch_size: int = 16, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The site validation report (a JSON-ready dict) of ``model`` on the labelled folder ``data``."""
    from boneai.batch import read_files
    from boneai.inference import default_model_name, load_model
    from boneai.scope import check_views
    from boneai.site import read_site

    if task != "fracture":
        raise BoneAIError("Site validation is available for the fracture task.")
    predictor = load_model(model or default_model_name(task))
    if predictor.task != task:
        raise BoneAIError(f"Model {predictor.name!r} is a {predictor.task} model, not a {task} model.")
    site = read_site(data, near_duplicates=False)
    df = site.frame
    logits = np.full(len(df), np.nan)
    familiarity = np.full(len(df), np.nan)
    in_scope = np.ones(len(df), bool)
    reasons: dict[str, int] = {}
    skipped = []
    paths = df["path"].tolist()
    for start in range(0, len(paths), batch_size):
        read, errors = read_files(paths[start:start + batch_size], site.root)
        skipped += errors
        idx = [start + k for k, im in enumerate(read) if im is not None]
        images = [im for im in read if im is not None]
        if not images:
            continue
        preds = predictor.predict_many(images)
        for i, p in zip(idx, preds, strict=True):
            logits[i] = p.logit if p.logit is not None else np.nan
        for i, s in zip(idx, check_views(images, predictor=predictor, predictions=preds), strict=True):
            in_scope[i] = s.in_scope
            if s.familiarity is not None:
                familiarity[i] = s.familiarity
            if not s.in_scope:  # counted by kind: the image check's probability is left out
                why = (s.reason or "out of scope").split(" (image check")[0]
                reasons[why] = reasons.get(why, 0) + 1
        if log:
            log(f"validated {min(start + batch_size, len(paths))}/{len(paths)} images")
    ok = np.isfinite(logits)
    y = df["label"].to_numpy().astype(int)[ok]
    prob = predictor.calibrate(logits[ok])
    report: dict[str, Any] = {"task": task, "model": predictor.name, "model_dir": str(predictor.directory),
                              "data": site.provenance(), "n": int(ok.sum()), "n_positive": int(y.sum()),
                              "n_negative": int(len(y) - y.sum()), "skipped": skipped, "n_boot": n_boot}
    both = 0 < y.sum() < len(y)
    n = len(y)
    if both:
        report["auc"] = _with_ci(ev.roc_auc(y, prob), ev.bootstrap_auc_ci(y, prob, n_boot=n_boot, seed=seed))
    else:
        report["auc"] = {"value": float("nan"), "ci95": [float("nan"), float("nan")]}
    points = {}
    for name, thr in predictor.operating_points.items():
        m = ev.threshold_metrics(y, prob, thr)
        pos, neg = y == 1, y == 0

        def sens(idx: np.ndarray, thr: float = thr) -> float:
            yy, pp = y[idx], prob[idx]
            return float(np.mean(pp[yy == 1] >= thr)) if (yy == 1).any() else float("nan")

        def spec(idx: np.ndarray, thr: float = thr) -> float:
            yy, pp = y[idx], prob[idx]
            return float(np.mean(pp[yy == 0] < thr)) if (yy == 0).any() else float("nan")

        card_point = predictor.card.operating_points.get(name)
        points[name] = {
            "threshold": float(thr),
            "sensitivity": _with_ci(m["sensitivity"], _bootstrap(n, sens, n_boot, seed) if pos.any() else [np.nan] * 2),
            "specificity": _with_ci(m["specificity"], _bootstrap(n, spec, n_boot, seed) if neg.any() else [np.nan] * 2),
            "ppv": m["ppv"], "npv": m["npv"], "tp": m["tp"], "fp": m["fp"], "tn": m["tn"], "fn": m["fn"],
            "card_sensitivity": None if card_point is None else card_point.sensitivity,
            "card_specificity": None if card_point is None else card_point.specificity,
        }
    report["operating_points"] = points
    report["default_operating_point"] = predictor.card.default_operating_point
    report["ece"] = _with_ci(ev.expected_calibration_error(y, prob),
                             _bootstrap(n, lambda idx: ev.expected_calibration_error(y[idx], prob[idx]), n_boot, seed))
    report["calibration_curve"] = ev.calibration_curve(y, prob).to_dict(orient="records")
    report["observed_rate"] = float(y.mean()) if n else float("nan")
    report["mean_probability"] = float(prob.mean()) if n else float("nan")
    fam = familiarity[ok]
    known = np.isfinite(fam)
    if known.any():
        from boneai.scope import load_scope_model, set_familiarity

        scope = load_scope_model()
        thr = scope.familiarity_threshold if scope is not None else 0.01
        f = fam[known]
        report["familiarity"] = {
            "n": int(known.sum()), "threshold": float(thr),
            "quantiles": {str(q): float(np.quantile(f, q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95)},
            "median": _with_ci(float(np.median(f)),
                               _bootstrap(len(f), lambda idx: float(np.median(f[idx])), n_boot, seed)),
            "unfamiliar_share": _with_ci(float(np.mean(f < thr)),
                                         _bootstrap(len(f), lambda idx: float(np.mean(f[idx] < thr)), n_boot, seed)),
            "histogram": np.histogram(f, bins=10, range=(0.0, 1.0))[0].tolist(),
            "reference": "FracAtlas validation images: uniform on [0, 1] by construction (a conformal p-value)",
            "set": _set_summary(set_familiarity(f.tolist())),
        }
    else:
        report["familiarity"] = None
    report["scope"] = {"out_of_scope": int((~in_scope[ok]).sum()), "reasons": reasons}
    report["rule"] = {"min_auc_lower": MIN_AUC_LOWER, "min_sensitivity": MIN_SENSITIVITY,
                      "min_cases_per_class": MIN_CASES_PER_CLASS, "max_unfamiliar_share": MAX_UNFAMILIAR_SHARE,
                      "max_ece": MAX_ECE}
    report.update(verdict(report))
    return report


def _sensitive_point(report: dict[str, Any]) -> str | None:
    points = report.get("operating_points") or {}
    if not points:
        return None
    return min(points, key=lambda k: points[k]["threshold"])  # the lowest threshold is the most sensitive


def _set_summary(result: Any) -> dict[str, Any]:
    """The report's record of :func:`boneai.scope.set_familiarity` for the site's views."""
    return {**result.to_dict(), "message": result.message("views")}


def _set_caution(summary: dict[str, Any]) -> str:
    return (f"taken together, the views are unlike the model's training images ({summary['n_low']} of "
            f"{summary['n']} have familiarity under {summary['low_familiarity']:.2f}, against about "
            f"{summary['low_familiarity']:.0%} of the training source's images), so figures from its own "
            "validation do not carry over here")


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    """``{"verdict": usable | do_not_use | not_enough_cases, "verdict_text", "reasons", "cautions"}``."""
    reasons, cautions = [], []
    n_pos, n_neg = report["n_positive"], report["n_negative"]
    if min(n_pos, n_neg) < MIN_CASES_PER_CLASS:
        return {"verdict": "not_enough_cases", "reasons": [
            f"{n_pos} fractured and {n_neg} not-fractured images: at least {MIN_CASES_PER_CLASS} of each are "
            "needed to tell whether the model works here"], "cautions": [],
            "verdict_text": "Not enough cases to validate this model at this site. Do not use it until it has been "
                            "validated on more labelled images."}
    lower = report["auc"]["ci95"][0]
    if not np.isfinite(lower) or lower < MIN_AUC_LOWER:
        reasons.append(f"ROC-AUC {report['auc']['value']:.2f} (95 % CI {lower:.2f}-{report['auc']['ci95'][1]:.2f}): "
                       f"the lower bound is under {MIN_AUC_LOWER:.2f}, so poor discrimination cannot be excluded")
    name = _sensitive_point(report)
    if name is not None:
        s = report["operating_points"][name]["sensitivity"]["value"]
        if not np.isfinite(s) or s < MIN_SENSITIVITY:
            reasons.append(f"sensitivity {s:.2f} at the '{name}' operating point (under {MIN_SENSITIVITY:.2f}): "
                           "it misses too many fractures here")
    fam = report.get("familiarity")
    if fam and fam["unfamiliar_share"]["value"] > MAX_UNFAMILIAR_SHARE:
        cautions.append(f"{fam['unfamiliar_share']['value']:.0%} of the views are unfamiliar to the model")
    elif fam and fam.get("set", {}).get("unfamiliar"):
        cautions.append(_set_caution(fam["set"]))
    if report["ece"]["value"] > MAX_ECE:
        cautions.append(f"probabilities are miscalibrated here (ECE {report['ece']['value']:.2f}); recalibrate "
                        "or adapt the model before reading them as risks")
    if report["scope"]["out_of_scope"]:
        cautions.append(f"{report['scope']['out_of_scope']} views were out of scope")
    if report.get("skipped"):
        cautions.append(f"{len(report['skipped'])} file(s) could not be read and were left out (listed in the report)")
    if reasons:
        text = ("Do not use this model at this site: " + "; ".join(reasons)
                + ". Adapt it to this site (python -m boneai adapt) and validate the result on other cases.")
        return {"verdict": "do_not_use", "reasons": reasons, "cautions": cautions, "verdict_text": text}
    text = "The model meets the site-validation rule at this site."
    if cautions:
        text += " Cautions: " + "; ".join(cautions) + "."
    return {"verdict": "usable", "reasons": [], "cautions": cautions, "verdict_text": text}


def _fmt(v: Any) -> str:
    if isinstance(v, dict) and "value" in v:
        lo, hi = v["ci95"]
        return f"{v['value']:.3f} ({lo:.3f}-{hi:.3f})"
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape(str(v))


def _fmt_opt(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}"


def report_html(report: dict[str, Any]) -> str:
    """A self-contained HTML page of a site validation report (every outside string escaped)."""
    from boneai.report import INTENDED_USE

    e = html.escape
    colour = {"usable": "#1b5e20", "do_not_use": "#b71c1c", "not_enough_cases": "#e65100"}[report["verdict"]]
    rows = [("Model", e(str(report["model"]))), ("Data", e(str(report["data"]["path"]))),
            ("Data hash (sha256)", e(report["data"]["sha256"][:16]) + "..."),
            ("Images", f"{report['n']} ({report['n_positive']} fractured, {report['n_negative']} not fractured)"),
            ("ROC-AUC (95 % CI)", _fmt(report["auc"])), ("ECE (95 % CI)", _fmt(report["ece"])),
            ("Observed fracture rate / mean probability",
             f"{report['observed_rate']:.3f} / {report['mean_probability']:.3f}")]
    table = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    op_rows = "".join(
        f"<tr><td>{e(name)}</td><td>{p['threshold']:.4f}</td><td>{_fmt(p['sensitivity'])}</td>"
        f"<td>{_fmt(p['specificity'])}</td><td>{_fmt_opt(p['card_sensitivity'])}</td>"
        f"<td>{_fmt_opt(p['card_specificity'])}</td></tr>"
        for name, p in report["operating_points"].items())
    cal_rows = "".join(f"<tr><td>{r['bin']}</td><td>{r['mean_predicted']:.3f}</td><td>{r['observed_rate']:.3f}</td>"
                       f"<td>{r['count']}</td></tr>" for r in report["calibration_curve"])
    fam = report.get("familiarity")
    if fam:
        bars = "".join(f"<tr><td>{i / 10:.1f}-{(i + 1) / 10:.1f}</td><td>{c}</td>"
                       f"<td><div style='background:#1565c0;height:10px;width:{4 * c}px'></div></td></tr>"
                       for i, c in enumerate(fam["histogram"]))
        fam_html = (f"<p>Median familiarity {_fmt(fam['median'])}; unfamiliar (below {fam['threshold']:.2f}): "
                    f"{_fmt(fam['unfamiliar_share'])}. {e(fam['reference'])}.</p>"
                    + (f"<p>{e(fam['set']['message'])}</p>" if fam.get("set") else "") +
                    f"<table><tr><th>familiarity</th><th>views</th><th></th></tr>{bars}</table>")
    else:
        fam_html = "<p>No familiarity scores (no scope model installed).</p>"
    items = "".join(f"<li>{e(r)}</li>" for r in report["reasons"] + report["cautions"])
    skipped = report.get("skipped") or []
    skipped_html = ("<h2>Files left out</h2><table><tr><th>file</th><th>why</th></tr>"
                    + "".join(f"<tr><td>{e(str(r['file']))}</td><td>{e(str(r['error']))}</td></tr>" for r in skipped)
                    + "</table>") if skipped else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Site validation: {e(str(report['model']))}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}
.verdict{{color:white;background:{colour};padding:1em}}</style>
</head><body>
<h1>Site validation</h1>
<p class="verdict"><strong>{e(report['verdict_text'])}</strong></p>
<ul>{items}</ul>
<table>{table}</table>
<h2>Operating points</h2>
<table><tr><th>point</th><th>threshold</th><th>sensitivity (95 % CI)</th><th>specificity (95 % CI)</th>
<th>card sensitivity</th><th>card specificity</th></tr>{op_rows}</table>
<h2>Calibration</h2>
<table><tr><th>bin</th><th>mean predicted</th><th>observed rate</th><th>count</th></tr>{cal_rows}</table>
<h2>Familiarity</h2>{fam_html}
{skipped_html}
<h2>Rule</h2>
<p>Do not use when the lower 95 % bound of the AUC is under {MIN_AUC_LOWER:.2f} or the sensitivity at the most
sensitive operating point is under {MIN_SENSITIVITY:.2f}; not enough cases under {MIN_CASES_PER_CLASS} images of a
class. Intervals: percentile bootstrap over images ({report['n_boot']} resamples).</p>
<p><small>{e(INTENDED_USE)}</small></p>
</body></html>
"""


def write_report(report: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write ``out`` (JSON) and the HTML report next to it (same name, ``.html``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=json_default))
    page = out.with_suffix(".html")
    page.write_text(report_html(report))
    return out, page


# -- a site zip from the app ------------------------------------------------------------------------
def _is_image_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bool:
    """An image suffix, or DICOM bytes under another name or none (as PACS exports name them)."""
    from boneai.data import DICOM_MARKER, DICOM_MARKER_OFFSET, has_dicom_marker, is_image_name

    known = is_image_name(info.filename)
    if known is not None:
        return known
    with zf.open(info) as src:
        return has_dicom_marker(src.read(DICOM_MARKER_OFFSET + len(DICOM_MARKER)))


def extract_site_zip(source: str | Path | IO[bytes], dest: str | Path, max_files: int = ZIP_MAX_FILES,
                     max_bytes: int = ZIP_MAX_BYTES, max_file_bytes: int = ZIP_MAX_FILE_BYTES) -> dict[str, Any]:
    """Unpack the image and DICOM files of a zip into ``dest``, refusing anything unsafe.

    Refused (``DatasetError``, nothing kept): a member whose path is absolute or climbs out of the
    folder (``..``), a link, more than ``max_files`` images, an image over ``max_file_bytes``, or more
    than ``max_bytes`` in all, counted on the bytes actually written (a zip bomb's declared sizes may lie).
    Other files (documents, hidden files) are skipped and counted.
    """
    import shutil
    import stat

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written, files, skipped = 0, 0, 0
    try:
        with zipfile.ZipFile(source) as zf:
            members = zf.infolist()
            for info in members:
                name = info.filename.replace("\\", "/")
                parts = PurePosixPath(name).parts
                if name.startswith("/") or (parts and ":" in parts[0]) or ".." in parts:
                    raise DatasetError(f"The zip has a file outside its folder ({name!r}); it was not unpacked.")
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise DatasetError(f"The zip has a link ({name!r}); it was not unpacked.")
            for info in members:
                name = info.filename.replace("\\", "/")
                parts = PurePosixPath(name).parts
                if info.is_dir() or not parts:
                    continue
                if any(p.startswith(".") or p == "__MACOSX" for p in parts) or not _is_image_member(zf, info):
                    skipped += 1
                    continue
                files += 1
                if files > max_files:
                    raise DatasetError(f"The zip holds more than {max_files} images; split it.")
                if info.file_size > max_file_bytes:
                    raise DatasetError(f"{name!r} is over {max_file_bytes // 1024**2} MB; it was not unpacked.")
                target = dest.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                size = 0
                with zf.open(info) as src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):
                        size += len(chunk)
                        written += len(chunk)
                        if size > max_file_bytes or written > max_bytes:
                            raise DatasetError(f"The zip unpacks to more than allowed ({max_bytes // 1024**2} MB in "
                                               f"all, {max_file_bytes // 1024**2} MB a file); it was not unpacked.")
                        out.write(chunk)
    except zipfile.BadZipFile:
        shutil.rmtree(dest, ignore_errors=True)
        raise DatasetError("The upload is not a zip file.") from None
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    if not files:
        shutil.rmtree(dest, ignore_errors=True)
        raise DatasetError("The zip holds no image or DICOM files.")
    return {"dest": str(dest), "files": files, "bytes": written, "skipped": skipped}


def find_site_root(folder: str | Path) -> Path:
    """The labelled folder inside an unpacked zip: ``folder`` itself or the one folder it wraps."""
    from boneai.data import folder_label

    folder = Path(folder)
    for _ in range(3):
        subs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX"))]
        if (folder / "dataset.csv").is_file() or any(folder_label(p.name) is not None for p in subs):
            return folder
        if len(subs) != 1:
            break
        folder = subs[0]
    raise DatasetError("The zip has no class folders (fractured/ and not_fractured/) or FracAtlas layout.")
