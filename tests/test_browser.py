"""End to end in a real browser: upload a radiograph, see the probability and heatmap, record a
decision, find it in the review log. Headless Debian Chromium driven by Playwright."""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _app_server import CHROMIUM, REPO, AppServer, launch_chromium  # noqa: E402

from tests.conftest import pdf_text  # noqa: E402

pytestmark = pytest.mark.browser

ARTIFACTS = REPO / "test-artifacts"
SAMPLE = REPO / "samples" / "fracatlas" / "IMG0000019.jpg"


def _download(page, button: str, sync_api, attempts: int = 3) -> Path:
    """Click a download button once the app is idle; a click during a rerun hits a replaced element."""
    for attempt in range(attempts):
        page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=60_000)
        try:
            with page.expect_download(timeout=40_000) as download:
                page.get_by_role("button", name=button).click()
            return Path(download.value.path())
        except sync_api.TimeoutError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def test_upload_review_and_find_it_in_the_log(tmp_path: Path) -> None:
    if not CHROMIUM.is_file():
        pytest.skip(f"Chromium not installed at {CHROMIUM} (run `make browser-deps` or apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="python package playwright not installed")
    from boneai import inference
    from boneai.io import read_radiograph
    from boneai.store import view_label

    label = view_label(1, SAMPLE.read_bytes())  # what the log and the reports name the view by
    try:
        card = next(c for c in inference.available_models("fracture")
                    if c["name"] == inference.default_model_name("fracture"))
    except Exception:
        pytest.skip(f"no fracture model in {inference.WEIGHTS_DIR}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = inference.load_model(card["dir"]).predict(read_radiograph(SAMPLE)).probability

    ARTIFACTS.mkdir(exist_ok=True)
    db = tmp_path / "reviews.sqlite"
    env = {"BONEAI_REVIEW_DB": str(db), "BONEAI_JOBS_DIR": str(tmp_path / "jobs"),
           "BONEAI_WEIGHTS_DIR": str(inference.WEIGHTS_DIR)}
    with AppServer(env, log_path=ARTIFACTS / "browser_server.log") as url, sync_api.sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.set_default_timeout(120_000)  # a busy 2-core machine: first loads can be slow
            page.goto(url)
            page.get_by_role("heading", name="Study review").wait_for(timeout=120_000)

            page.get_by_text("Upload files", exact=True).click()
            page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(str(SAMPLE))
            page.get_by_text(f"View 1: {SAMPLE.name}").wait_for(timeout=120_000)

            # The probability shown is the predictor's, and its evidence is drawn: a localiser's boxes
            # (or the note that none passes), a classifier's heatmap.
            metric = page.locator('[data-testid="stMetric"]').filter(has_text="Probability").first
            metric.wait_for(timeout=60_000)
            assert metric.locator('[data-testid="stMetricValue"]').inner_text().strip() == f"{expected:.3f}"
            evidence = (r"^(\d+ box\(es\): |No box passes the sensitive box operating point)"
                        if card.get("kind") == "localiser" else r"^Heatmap \(\w+\), hottest point")
            page.get_by_text(re.compile(evidence)).first.wait_for(timeout=120_000)
            # The overlay replaces the plain radiograph once it is ready: wait for it to load.
            page.wait_for_function(
                "() => { const img = document.querySelector('[data-testid=\"stMain\"] [data-testid=\"stImage\"] img');"
                " return !!img && img.complete && img.naturalWidth > 100; }", timeout=60_000)

            # Record a decision.
            form = page.locator('[data-testid="stForm"]')
            form.get_by_text("Agree", exact=True).click()
            form.locator("textarea").fill("browser test: agree")
            form.get_by_role("button", name="Save to review log").click()
            page.get_by_text(re.compile(r"Saved to the review log as review #1")).wait_for(timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "browser_study_review.png"))

            # Both reports download, with the decision just recorded; the view is named by its number
            # and content hash, never by the upload's file name.
            report = _download(page, "Download report (HTML)", sync_api).read_text()
            assert f"View 1 · sha256:{label.rsplit(':', 1)[1]}" in report and SAMPLE.name not in report
            assert "agree" in report and "data:image/png;base64," in report
            assert _download(page, "Download report (PDF)", sync_api).read_bytes().startswith(b"%PDF-")

            # Find it on the review-log page.
            page.get_by_role("link", name="Review log").click()
            page.get_by_role("heading", name="Review log").wait_for(timeout=60_000)
            shown = page.locator('[data-testid="stMetric"]').filter(has_text="Reviews shown").first
            shown.wait_for(timeout=60_000)
            assert shown.locator('[data-testid="stMetricValue"]').inner_text().strip() == "1"
            grid = page.locator('[data-testid="stDataFrame"]').first  # the reviews; the audit log's is below
            grid.wait_for(timeout=60_000)
            # The grid draws on a canvas; its accessible cells carry the text.
            page.wait_for_function(
                "(name) => document.querySelector('[data-testid=\"stDataFrame\"]').textContent.includes(name)",
                arg=label, timeout=30_000)
            assert "agree" in grid.text_content() and SAMPLE.name not in grid.text_content()
            page.screenshot(path=str(ARTIFACTS / "browser_review_log.png"))
        finally:
            browser.close()

    from boneai.store import ReviewStore

    rows = ReviewStore(db).query()
    assert rows["views"].tolist() == [[label]]
    assert rows["reviewer_decision"].tolist() == ["agree"]
    assert rows["view_probabilities"].iloc[0] == pytest.approx([expected], abs=1e-6)




def test_a_patient_named_dicom_leaves_no_identifier_in_the_log_the_export_or_the_reports(
        tmp_path: Path, dicom_bytes, patient_identifiers, sample_gray) -> None:
    """``Doe_Jane_MRN123.dcm`` with the patient in its header: upload, save, both reports, the CSV export.

    The name is on screen during the session only; the database file, the CSV and the reports name
    the view ``view 1 · sha256:...`` and carry neither the file name nor the header's identifiers.
    """
    if not CHROMIUM.is_file():
        pytest.skip(f"Chromium not installed at {CHROMIUM} (run `make browser-deps` or apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="python package playwright not installed")
    from boneai import inference
    from boneai.store import view_label

    if not inference.available_models("fracture"):
        pytest.skip(f"no fracture model in {inference.WEIGHTS_DIR}")
    name = "Doe_Jane_MRN123.dcm"
    data = dicom_bytes(sample_gray("fracatlas/IMG0000019.jpg"), extra={"OtherPatientIDs": "MRN123"})
    assert b"Doe^Jane" in data and patient_identifiers["PatientID"].encode() in data  # the header has them
    upload = tmp_path / "upload" / name
    upload.parent.mkdir()
    upload.write_bytes(data)
    label = view_label(1, data)
    forbidden = ["Doe_Jane", "MRN123", patient_identifiers["PatientName"], patient_identifiers["PatientID"],
                 "Doe^Jane"]

    ARTIFACTS.mkdir(exist_ok=True)
    db = tmp_path / "db" / "reviews.sqlite"
    db.parent.mkdir()
    env = {"BONEAI_REVIEW_DB": str(db), "BONEAI_JOBS_DIR": str(tmp_path / "jobs"),
           "BONEAI_WEIGHTS_DIR": str(inference.WEIGHTS_DIR)}
    with AppServer(env, log_path=ARTIFACTS / "browser_identifiers_server.log") as url, \
            sync_api.sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:  # the default single-user mode: the local user is the admin, so the export is offered
            page = browser.new_page(viewport={"width": 1400, "height": 1800}, accept_downloads=True)
            page.set_default_timeout(120_000)
            page.goto(url)
            page.get_by_role("heading", name="Study review").wait_for(timeout=120_000)
            page.get_by_text("Upload files", exact=True).click()
            page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(str(upload))
            page.get_by_text(f"View 1: {name}").wait_for(timeout=120_000)  # on screen, this session only
            page.locator('[data-testid="stMetric"]').filter(has_text="Probability").first.wait_for(timeout=120_000)

            form = page.locator('[data-testid="stForm"]')
            form.get_by_text("Agree", exact=True).click()
            form.locator("textarea").fill("browser test: no identifiers")
            form.get_by_role("button", name="Save to review log").click()
            page.get_by_text(re.compile(r"Saved to the review log as review #1")).wait_for(timeout=120_000)

            html_report = _download(page, "Download report (HTML)", sync_api).read_bytes()
            pdf_report = _download(page, "Download report (PDF)", sync_api).read_bytes()

            page.get_by_role("link", name="Review log").click()
            page.get_by_role("heading", name="Review log").wait_for(timeout=60_000)
            csv_export = _download(page, "Export CSV", sync_api).read_bytes()
            page.screenshot(path=str(ARTIFACTS / "browser_no_identifiers.png"))
        finally:
            browser.close()

    # What was saved and printed is the view label, so the searches below look where the view went.
    heading = f"View 1 · sha256:{label.rsplit(':', 1)[1]}"
    drawn_text = pdf_text(pdf_report)
    assert heading.encode() in html_report and heading in drawn_text and label.encode() in csv_export
    database = b"".join(p.read_bytes() for p in sorted(db.parent.iterdir()) if p.name.startswith(db.name))
    assert label.split(" ")[-1].encode() in database  # the hash part: the views column is JSON (\u00b7)
    for where, blob in (("database file", database), ("CSV export", csv_export), ("HTML report", html_report),
                        ("PDF report", pdf_report), ("PDF report text", drawn_text.encode("latin-1"))):
        for needle in forbidden:
            assert needle.encode() not in blob, f"{needle!r} in the {where}"


def test_training_progress_updates_live_without_reload(tmp_path: Path) -> None:
    """The Training page polls a running job (st.fragment(run_every=...)): epochs appear as they finish."""
    if not CHROMIUM.is_file():
        pytest.skip(f"Chromium not installed at {CHROMIUM} (run `make browser-deps` or apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="python package playwright not installed")
    import json

    from boneai.jobs import JobRunner

    lines = [json.dumps({"epoch": e, "train_loss": 1 / e, "val_loss": 1.1 / e, "val_auc": 0.6 + e / 100})
             for e in (1, 2, 3)]
    go = tmp_path / "go"
    # A stand-in for the train command: epoch 1, then (once the page is up) epochs 2 and 3.
    code = (f"import os, time\nprint({lines[0]!r}, flush=True)\n"
            f"while not os.path.exists({str(go)!r}): time.sleep(0.2)\n"
            f"for l in {lines[1:]!r}:\n    time.sleep(3)\n    print(l, flush=True)\n")
    runner = JobRunner(tmp_path / "jobs")
    job = runner.start_command(["-c", code], epochs_total=3)
    env = {"BONEAI_REVIEW_DB": str(tmp_path / "reviews.sqlite"), "BONEAI_JOBS_DIR": str(tmp_path / "jobs")}
    metric_js = ("(text) => [...document.querySelectorAll('[data-testid=\"stMetric\"]')]"
                 ".some(m => m.innerText.includes(text))")
    try:
        with AppServer(env) as url, sync_api.sync_playwright() as pw:
            browser = launch_chromium(pw)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1400})
                page.set_default_timeout(180_000)
                page.goto(url + "/training")  # a deep link as the first request: routed through app.py
                page.wait_for_function(metric_js, arg="1 / 3")
                go.touch()
                page.wait_for_function(metric_js, arg="3 / 3", timeout=60_000)  # no reload in between
                page.wait_for_function(metric_js, arg="succeeded", timeout=60_000)
                assert page.get_by_role("heading", name="Register the new model").count() == 0  # no card: nothing to register
            finally:
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "browser_training_live.png"))
                browser.close()
    finally:
        runner.cancel(job.id)
