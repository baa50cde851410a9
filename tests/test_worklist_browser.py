"""End to end in a real browser against a real archive: the Worklist lists Orthanc's studies, opening one
shows its views on Study review, and saving the review stores the AI report and the reviewer's SR in
the archive. Headless Debian Chromium (Playwright) and Orthanc from Debian; skipped without either."""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _app_server import CHROMIUM, REPO, AppServer, launch_chromium  # noqa: E402
from _orthanc import running_orthanc  # noqa: E402

pytestmark = pytest.mark.browser

ARTIFACTS = REPO / "test-artifacts"


def test_worklist_opens_an_archive_study_and_the_review_goes_back_to_the_archive(tmp_path: Path) -> None:
    if not CHROMIUM.is_file():
        pytest.skip(f"Chromium not installed at {CHROMIUM} (run `make browser-deps` or apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="python package playwright not installed")
    import io

    from boneai import inference
    from boneai.io import read_radiograph
    from boneai.pacs import ArchiveClient, ArchiveSettings
    from boneai.pacs_server import sample_study_datasets

    for orthanc in running_orthanc(tmp_path / "orthanc"):
        samples = sample_study_datasets()
        client = ArchiveClient(ArchiveSettings(url=orthanc.dicomweb_url))
        client.store(samples)
        newest = client.search_studies()[0]  # the two-view sample study has the latest date
        views = [ds for ds in samples if ds.StudyInstanceUID == newest.study_uid]
        assert len(views) == 2
        predictor = inference.load_model(inference.default_model_name("fracture"))  # the page's model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            images = []
            for ds in views:
                buffer = io.BytesIO()
                ds.save_as(buffer, enforce_file_format=True)
                images.append(read_radiograph(buffer.getvalue()))
        expected = [p.probability for p in predictor.predict_many(images)]

        ARTIFACTS.mkdir(exist_ok=True)
        env = {"BONEAI_REVIEW_DB": str(tmp_path / "reviews.sqlite"), "BONEAI_JOBS_DIR": str(tmp_path / "jobs"),
               "BONEAI_WEIGHTS_DIR": str(inference.WEIGHTS_DIR), "BONEAI_PACS_URL": orthanc.dicomweb_url,
               "BONEAI_PACS_LOCK_DIR": str(tmp_path / "locks")}
        with AppServer(env, log_path=ARTIFACTS / "worklist_server.log") as url, sync_api.sync_playwright() as pw:
            browser = launch_chromium(pw)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1800})
                page.set_default_timeout(120_000)
                page.goto(url + "/worklist")
                page.get_by_role("heading", name="Worklist").wait_for(timeout=120_000)
                # Newest first: the first row is the two-view study, new, and no patient name anywhere.
                page.get_by_text("2026-11-30", exact=True).wait_for(timeout=120_000)
                page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=120_000)
                main = page.locator('[data-testid="stMain"]')
                text = main.inner_text()
                assert "2026-11-30" in text and "SAMPLE" not in text
                dates = re.findall(r"\d{4}-\d{2}-\d{2}", text)
                assert dates == sorted(dates, reverse=True) and len(dates) == len(client.search_studies())
                main.get_by_role("button", name="Open").first.click()  # the first row's

                page.get_by_role("heading", name="Study review").wait_for(timeout=120_000)
                page.get_by_text("View 2: view 2").wait_for(timeout=120_000)
                probs = page.locator('[data-testid="stMetric"]').filter(has_text=re.compile(r"^Probability"))
                probs.nth(1).wait_for(timeout=120_000)
                shown = [float(probs.nth(k).locator('[data-testid="stMetricValue"]').inner_text()) for k in range(2)]
                assert shown == pytest.approx(expected, abs=6e-4)

                form = page.locator('[data-testid="stForm"]')
                form.get_by_text("Uncertain", exact=True).click()
                form.get_by_role("button", name="Save to review log").click()
                page.get_by_text(re.compile(r"Stored in the archive: AI report")).wait_for(timeout=300_000)
                page.screenshot(path=str(ARTIFACTS / "browser_worklist_review.png"))

                # The archive now holds our AI report and the reviewer's SR on it ...
                study = client.study(newest.study_uid)
                [(ai, _)] = client.ai_results(study)
                assert ai.probability == pytest.approx(np.mean(expected), abs=1e-6)
                [review] = client.reviews(study)
                assert (review.decision, review.ai_result_uid, review.reviewer) == ("uncertain", ai.sop_instance_uid,
                                                                                    "local")
                # ... and the Worklist says so.
                page.get_by_role("link", name="Worklist").click()
                page.get_by_role("button", name="Refresh").click()
                page.get_by_text("reviewed", exact=True).first.wait_for(timeout=120_000)
                assert "uncertain" in main.inner_text()
            finally:
                browser.close()
