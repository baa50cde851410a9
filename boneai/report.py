"""Study reports: one self-contained HTML file (images embedded as base64) or a PDF (fpdf2).

A report shows, per view, the radiograph and its heatmap with the model's finding, then the study
finding, the model name, version and card, the operating point, the reviewer's decision and note,
and the intended-use note. A view is named by its number and content hash (``View 1 ·
sha256:3f2a9c1b0d4e``, from :func:`boneai.store.view_label`), never by its file name: upload names
often carry the patient's name or record number, so a name that is not a view label is left out.
Every other string from outside (notes, DICOM values) is escaped in HTML and drawn as plain text in
the PDF.

Example:
    >>> import numpy as np
    >>> from boneai.report import StudyReport, ViewReport, to_html
    >>> from boneai.store import view_label
    >>> view = ViewReport(name=view_label(1, b"pixels"), image=np.zeros((64, 64), np.uint8), probability=0.8,
    ...                   finding="fracture")
    >>> rep = StudyReport(study_id="S-1", task="fracture", model_name="fracture", model_version="abc",
    ...                   views=[view], study_probability=0.8, study_finding="fracture")
    >>> "fracture" in to_html(rep)
    True
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
from PIL import Image

from boneai.store import VIEW_LABEL_RE

__all__ = ["INTENDED_USE", "ViewReport", "StudyReport", "to_html", "to_pdf", "png_bytes", "view_heading"]

#: Shown on every screen and in every report.
INTENDED_USE = ("For research and education only. Not a medical device: not for diagnosis or treatment "
                "decisions. A qualified clinician must read every image.")

_REPORT_IMAGE_SIDE = 512  # px; keeps a 4-view report to a few hundred kB


@dataclass
class ViewReport:
    """One view of the study as the report shows it."""

    name: str  # boneai.store.view_label(); any other text (a file name) is not printed
    image: np.ndarray  # grey (H, W) or RGB (H, W, 3) uint8
    heatmap: np.ndarray | None = None  # RGB overlay uint8, same framing as ``image``
    heatmap_method: str | None = None
    probability: float | None = None
    boneage_months: float | None = None
    anomaly_score: float | None = None
    finding: str | None = None  # e.g. "fracture", "no fracture", "abnormal"
    metadata: dict[str, Any] = field(default_factory=dict)  # safe metadata only
    warnings: list[str] = field(default_factory=list)


@dataclass
class StudyReport:
    """Everything one study report holds."""

    study_id: str
    task: str
    model_name: str
    model_version: str
    views: list[ViewReport]
    model_card: str | None = None  # link or path to the model card
    operating_point: str | None = None
    threshold: float | None = None
    aggregation: str | None = None
    study_probability: float | None = None
    study_finding: str | None = None
    sex: str | None = None  # bone age: "male"/"female"
    reviewer_decision: str | None = None
    note: str = ""
    familiarity_note: str | None = None  # the views taken together are unlike the training images
    created_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    intended_use: str = INTENDED_USE

    def summary_rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs of the study section, shared by the HTML and PDF layouts."""
        rows = [("Study", self.study_id), ("Created (UTC)", self.created_at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M")),
                ("Task", _TASK_NAMES.get(self.task, self.task)),
                ("Model", f"{self.model_name} (version {self.model_version})")]
        if self.model_card:
            rows.append(("Model card", self.model_card))
        if self.operating_point is not None:
            thr = f" (threshold {self.threshold:.3f})" if self.threshold is not None else ""
            rows.append(("Operating point", f"{self.operating_point}{thr}"))
        if self.sex:
            rows.append(("Sex", self.sex))
        if self.study_probability is not None:
            how = f", {self.aggregation} of {len(self.views)} views" if self.aggregation else ""
            rows.append(("Study probability", f"{self.study_probability:.3f}{how}"))
        if self.study_finding:
            rows.append(("Study finding", self.study_finding))
        if self.familiarity_note:
            rows.append(("Familiarity", self.familiarity_note))
        rows.append(("Reviewer decision", self.reviewer_decision or "not recorded"))
        if self.note:
            rows.append(("Reviewer note", self.note))
        return rows


_TASK_NAMES = {"fracture": "Fracture detection", "boneage": "Bone age estimation", "anomaly": "Anomaly detection"}


def view_heading(index: int, name: str) -> str:
    """``View 1 · sha256:3f2a9c1b0d4e`` when ``name`` is a view label, else ``View 1``: the report
    never prints a file name, which may carry a patient identifier."""
    match = VIEW_LABEL_RE.fullmatch(str(name).strip())
    return f"View {index} · sha256:{match.group(2)}" if match else f"View {index}"


def _view_rows(view: ViewReport) -> list[tuple[str, str]]:
    rows = []
    if view.probability is not None:
        rows.append(("Probability", f"{view.probability:.3f}"))
    if view.boneage_months is not None:
        rows.append(("Bone age", f"{view.boneage_months:.1f} months ({view.boneage_months / 12:.1f} years)"))
    if view.anomaly_score is not None:
        rows.append(("Anomaly score", f"{view.anomaly_score:.4f}"))
    if view.finding:
        rows.append(("Finding", view.finding))
    if view.heatmap is not None and view.heatmap_method:
        rows.append(("Heatmap", view.heatmap_method))
    for key, value in view.metadata.items():
        if value not in (None, "", []):
            text = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            rows.append((key.replace("_", " "), text))
    for note in view.warnings:
        rows.append(("Warning", note))
    return rows


def png_bytes(image: np.ndarray, max_side: int = _REPORT_IMAGE_SIDE) -> bytes:
    """PNG of a uint8 grey or RGB image, shrunk so its longer side is at most ``max_side``."""
    img = Image.fromarray(np.ascontiguousarray(image))
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _img_tag(image: np.ndarray, alt: str) -> str:
    data = base64.b64encode(png_bytes(image)).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt, quote=True)}">'


def _table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:60em;color:#1b1f24}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccd}
.note{background:#fff4e5;border-left:4px solid #e8a33d;padding:.6em 1em;margin:1em 0}
table{border-collapse:collapse;margin:.5em 0}th,td{text-align:left;padding:.2em .8em .2em 0;vertical-align:top}
th{color:#555;font-weight:600}.images{display:flex;gap:1em;flex-wrap:wrap}.images figure{margin:0}
.images img{max-width:28em;width:100%;border:1px solid #ccd}figcaption{color:#555;font-size:.9em}
"""


def to_html(report: StudyReport) -> str:
    """The report as one HTML document with no external resources (images inlined as base64)."""
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        # No scripts, no remote loads: the file can be archived or mailed and opens the same anywhere.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">",
        f"<title>BoneAI Review report {html.escape(report.study_id)}</title><style>{_CSS}</style></head><body>",
        f"<h1>BoneAI Review: study report</h1><p class=\"note\"><strong>Intended use.</strong> {html.escape(report.intended_use)}</p>",
        "<h2>Study</h2>", _table(report.summary_rows()),
    ]
    for i, view in enumerate(report.views, 1):
        parts.append(f"<h2>{html.escape(view_heading(i, view.name))}</h2><div class=\"images\">")
        parts.append(f"<figure>{_img_tag(view.image, f'View {i} radiograph')}<figcaption>Radiograph</figcaption></figure>")
        if view.heatmap is not None:
            label = f"Heatmap ({view.heatmap_method})" if view.heatmap_method else "Heatmap"
            parts.append(f"<figure>{_img_tag(view.heatmap, f'View {i} heatmap')}<figcaption>{html.escape(label)}"
                         "</figcaption></figure>")
        parts.append("</div>" + _table(_view_rows(view)))
    parts.append("<p class=\"note\">Heatmaps show where the model looked, not where a fracture is; "
                 "they can highlight normal anatomy or miss the finding.</p></body></html>")
    return "".join(parts)


def _pdf_text(text: str) -> str:
    """fpdf2's core fonts are Latin-1; anything else becomes '?' rather than failing the download."""
    return str(text).encode("latin-1", errors="replace").decode("latin-1")


def to_pdf(report: StudyReport) -> bytes:
    """The report as a PDF (A4 portrait): summary page, then the views two images side by side."""
    from fpdf import FPDF

    pdf = FPDF(orientation="P", unit="mm", format="A4")
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.set_title(_pdf_text(f"BoneAI Review report {report.study_id}"))
    pdf.set_creator("BoneAI Review")
    pdf.add_page()
    width = pdf.w - pdf.l_margin - pdf.r_margin

    def heading(text: str, size: int = 13) -> None:
        pdf.set_font("Helvetica", "B", size)
        pdf.multi_cell(width, 7, _pdf_text(text), new_x="LMARGIN", new_y="NEXT")
        pdf.ln(1)

    def rows(items: list[tuple[str, str]]) -> None:
        for key, value in items:
            pdf.set_font("Helvetica", "B", 9)
            pdf.cell(42, 5, _pdf_text(key))
            pdf.set_font("Helvetica", "", 9)
            pdf.multi_cell(width - 42, 5, _pdf_text(value), new_x="LMARGIN", new_y="NEXT")

    heading("BoneAI Review: study report", 16)
    pdf.set_fill_color(255, 244, 229)
    pdf.set_font("Helvetica", "", 9)
    pdf.multi_cell(width, 5, _pdf_text("Intended use. " + report.intended_use), fill=True, new_x="LMARGIN", new_y="NEXT")
    pdf.ln(3)
    heading("Study")
    rows(report.summary_rows())
    for i, view in enumerate(report.views, 1):
        images = [view.image] + ([view.heatmap] if view.heatmap is not None else [])
        img_w = (width - 6) / 2
        heights = [img_w * im.shape[0] / im.shape[1] for im in images]
        needed = 12 + max(heights) + 6 * (len(_view_rows(view)) + 1)
        if pdf.get_y() + min(needed, 200) > pdf.h - pdf.b_margin:
            pdf.add_page()
        pdf.ln(4)
        heading(view_heading(i, view.name), 11)
        top = pdf.get_y()
        for k, (im, h) in enumerate(zip(images, heights)):
            pdf.image(Image.open(io.BytesIO(png_bytes(im))), x=pdf.l_margin + k * (img_w + 6), y=top, w=img_w, h=h)
        pdf.set_y(top + max(heights) + 2)
        rows(_view_rows(view))
    pdf.ln(4)
    pdf.set_font("Helvetica", "I", 8)
    pdf.multi_cell(width, 4, _pdf_text("Heatmaps show where the model looked, not where a fracture is; they can "
                                       "highlight normal anatomy or miss the finding."), new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())
