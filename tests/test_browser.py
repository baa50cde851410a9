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

pytestmark = pytest.mark.browser

ARTIFACTS = REPO / "test-artifacts"
SAMPLE = REPO / "samples" / "fracatlas" / "IMG0000019.jpg"


def test_upload_review_and_find_it_in_the_log(tmp_path: Path) -> None:
    if not CHROMIUM.is_file():
        pytest.skip(f"Chromium not installed at {CHROMIUM} (run `make browser-deps` or apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="python package playwright not installed")
    from boneai import inference
    from boneai.io import read_radiograph

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
            page.goto(url)
            page.get_by_role("heading", name="Study review").wait_for(timeout=120_000)

            page.get_by_text("Upload files", exact=True).click()
            page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(str(SAMPLE))
            page.get_by_text(f"View 1: {SAMPLE.name}").wait_for(timeout=120_000)

            # The probability shown is the predictor's, and a heatmap image is drawn.
            metric = page.locator('[data-testid="stMetric"]').filter(has_text="Probability").first
            metric.wait_for(timeout=60_000)
            assert metric.locator('[data-testid="stMetricValue"]').inner_text().strip() == f"{expected:.3f}"
            page.get_by_text(re.compile(r"^Heatmap \(gradcam\), hottest point")).wait_for(timeout=120_000)
            image = page.locator('[data-testid="stImage"] img').first
            image.wait_for(timeout=60_000)
            assert page.evaluate("(img) => img.complete && img.naturalWidth > 100", image.element_handle())

            # Record a decision.
            form = page.locator('[data-testid="stForm"]')
            form.get_by_text("Agree", exact=True).click()
            form.locator("textarea").fill("browser test: agree")
            form.get_by_role("button", name="Save to review log").click()
            page.get_by_text(re.compile(r"Saved to the review log as review #1")).wait_for(timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "browser_study_review.png"))

            # Both reports download, with the decision just recorded.
            with page.expect_download(timeout=120_000) as html_download:
                page.get_by_role("button", name="Download report (HTML)").click()
            report = Path(html_download.value.path()).read_text()
            assert SAMPLE.name in report and "agree" in report and "data:image/png;base64," in report
            with page.expect_download(timeout=120_000) as pdf_download:
                page.get_by_role("button", name="Download report (PDF)").click()
            assert Path(pdf_download.value.path()).read_bytes().startswith(b"%PDF-")

            # Find it on the review-log page.
            page.get_by_role("link", name="Review log").click()
            page.get_by_role("heading", name="Review log").wait_for(timeout=60_000)
            shown = page.locator('[data-testid="stMetric"]').filter(has_text="Reviews shown").first
            shown.wait_for(timeout=60_000)
            assert shown.locator('[data-testid="stMetricValue"]').inner_text().strip() == "1"
            grid = page.locator('[data-testid="stDataFrame"]')
            grid.wait_for(timeout=60_000)
            # The grid draws on a canvas; its accessible cells carry the text.
            page.wait_for_function(
                "(name) => document.querySelector('[data-testid=\"stDataFrame\"]').textContent.includes(name)",
                arg=SAMPLE.name, timeout=30_000)
            assert "agree" in grid.text_content()
            page.screenshot(path=str(ARTIFACTS / "browser_review_log.png"))
        finally:
            browser.close()

    from boneai.store import ReviewStore

    rows = ReviewStore(db).query()
    assert rows["views"].tolist() == [[SAMPLE.name]]
    assert rows["reviewer_decision"].tolist() == ["agree"]
    assert rows["view_probabilities"].iloc[0] == pytest.approx([expected], abs=1e-6)
