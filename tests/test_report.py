"""Study reports: self-contained HTML, a PDF, escaped user strings, and every required section."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from boneai.report import INTENDED_USE, StudyReport, ViewReport, png_bytes, to_html, to_pdf
from boneai.store import ReviewStore, to_csv_bytes, view_label
from tests.conftest import pdf_text

EVIL_NAME = '<img src=x onerror="alert(1)">wrist.png'
LATERAL = view_label(2, b"pixels of the lateral view")


@pytest.fixture
def report(sample_gray) -> StudyReport:
    gray = sample_gray("fracatlas/IMG0000351.jpg")
    heat = np.dstack([gray, np.zeros_like(gray), 255 - gray])
    views = [
        ViewReport(name=EVIL_NAME, image=gray, heatmap=heat, heatmap_method="gradcam", probability=0.8123,
                   finding="fracture suspected", metadata={"modality": "DX", "body_part": "HAND"}),
        ViewReport(name=LATERAL, image=gray, probability=0.4, finding="no fracture seen",
                   metadata={"projection": "lateral ü → ✓"}, warnings=["file is truncated"]),
    ]
    return StudyReport(study_id="S-20250101-abcdef", task="fracture", model_name="fracture", model_version="0123abcd4567",
                       model_card="weights/fracture/card.json", views=views, operating_point="sensitive",
                       threshold=0.3141, aggregation="mean", study_probability=0.60615,
                       study_finding="fracture suspected", reviewer_decision="disagree", note="Note with <b>tags</b> & ü")


def test_html_is_self_contained_and_complete(report: StudyReport) -> None:
    page = to_html(report)
    assert INTENDED_USE in page
    for text in ("S-20250101-abcdef", "0123abcd4567", "weights/fracture/card.json", "sensitive (threshold 0.314)",
                 "0.606, mean of 2 views", "disagree", "0.812", "gradcam", "DX", "file is truncated"):
        assert text in page, text
    # No external resource of any kind: every image is a data URI.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page)
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3  # two radiographs, one heatmap
    decoded = Image.open(io.BytesIO(base64.b64decode(images[0])))
    assert max(decoded.size) <= 512


def test_html_escapes_file_names_and_notes(report: StudyReport) -> None:
    page = to_html(report)
    assert "<img src=x" not in page
    # A file name given where a view label belongs is left out altogether, escaped or not.
    assert "wrist.png" not in page and "onerror" not in page
    assert "<h2>View 1</h2>" in page and f"<h2>View 2 · sha256:{LATERAL[-12:]}</h2>" in page
    assert "<b>tags</b>" not in page and "&lt;b&gt;tags&lt;/b&gt; &amp; ü" in page




def test_pdf_has_images_and_findings(report: StudyReport) -> None:
    pdf = to_pdf(report)
    assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")
    text = pdf_text(pdf)
    for needle in ("S-20250101-abcdef", "0123abcd4567", "sensitive (threshold 0.314)", "disagree", "0.812",
                   "Intended use", "research and education", f"View 2 · sha256:{LATERAL[-12:]}"):
        assert needle in text, needle
    assert len(re.findall(r"/I\d+ Do", text)) == 3  # two radiographs and one heatmap drawn
    # Non-Latin-1 text does not break the PDF (core fonts): it is replaced, not raised.
    assert "lateral" in text
    assert "wrist.png" not in text


def test_the_study_familiarity_note_is_in_both_reports_only_when_given(report: StudyReport) -> None:
    from dataclasses import replace

    note = "Taken together, these views are unlike the model's training images: 2 of 2 views ..."
    assert "Familiarity" not in to_html(report) and "Familiarity" not in pdf_text(to_pdf(report))
    flagged = replace(report, familiarity_note=note)
    assert "Familiarity" in to_html(flagged) and "these views are unlike" in to_html(flagged)
    assert "these views are unlike" in pdf_text(to_pdf(flagged)).replace("\n", " ")


def test_a_patient_file_name_is_in_neither_the_log_nor_the_reports(tmp_path, sample_gray) -> None:
    """The page's path for an upload named after the patient: label from the bytes, log, CSV, reports."""
    name, data = "Doe_Jane_MRN123.dcm", b"\x00DICM wrist of the patient"
    label = view_label(1, data)
    assert re.fullmatch(r"view 1 · sha256:[0-9a-f]{12}", label)
    db = tmp_path / "reviews.sqlite"
    store = ReviewStore(db)
    # The label as the page passes it, and the raw name as a careless caller might.
    store.add(study_id="S-1", views=[label, name], model_name="fracture", model_version="v", task="fracture",
              view_probabilities=[0.8, 0.3], reviewer_decision="agree", reviewer="local")
    gray = sample_gray("fracatlas/IMG0000351.jpg")
    rep = StudyReport(study_id="S-1", task="fracture", model_name="fracture", model_version="v",
                      views=[ViewReport(name=label, image=gray, probability=0.8),
                             ViewReport(name=name, image=gray, probability=0.3)], reviewer_decision="agree")
    html_bytes, pdf = to_html(rep).encode("utf-8"), to_pdf(rep)
    for blob in (db.read_bytes(), to_csv_bytes(store.query()), html_bytes, pdf, pdf_text(pdf).encode("latin-1")):
        assert b"Doe_Jane" not in blob and b"MRN123" not in blob
    assert f"View 1 · sha256:{label[-12:]}" in pdf_text(pdf)
    assert f"View 1 · sha256:{label[-12:]}".encode() in html_bytes


def test_bone_age_report_shows_months_and_sex(sample_gray) -> None:
    gray = sample_gray("boneage/1685.png")
    rep = StudyReport(study_id="S-2", task="boneage", model_name="boneage", model_version="v1", sex="female",
                      views=[ViewReport(name="hand.png", image=gray, boneage_months=130.0)])
    page = to_html(rep)
    assert "130.0 months (10.8 years)" in page and "female" in page and "Bone age estimation" in page
    assert "not recorded" in page  # no reviewer decision yet
    assert "130.0 months" in pdf_text(to_pdf(rep))


def test_png_bytes_keeps_small_images_and_shrinks_large_ones() -> None:
    small = np.zeros((100, 80), np.uint8)
    assert Image.open(io.BytesIO(png_bytes(small))).size == (80, 100)
    large = np.zeros((2000, 1000, 3), np.uint8)
    assert Image.open(io.BytesIO(png_bytes(large))).size == (256, 512)
