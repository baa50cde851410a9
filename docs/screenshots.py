"""Screenshots of every page for the README, taken from the real app in headless Chromium.

    .venv/bin/python docs/screenshots.py [--out docs/screenshots] [--no-job]

Uses the models in the weights folder (``BONEAI_WEIGHTS_DIR`` or weights/). The review log and jobs
live in a temporary folder: one review is recorded through the Study review page first, and, unless
``--no-job``, a two-epoch training job on a few dozen samples runs so the Training page shows results.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
from _app_server import CHROMIUM, EVIDENCE_CAPTION, AppServer, launch_chromium  # noqa: E402

WIDTH = 1400


def shoot(page, path: Path) -> None:
    """Screenshot the whole page (Streamlit scrolls inside its main area, so size the viewport to it)."""
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(1500)  # widgets load lazily and charts animate in
    content = page.evaluate(
        "() => document.querySelector('[data-testid=\"stMainBlockContainer\"]').getBoundingClientRect().height")
    page.set_viewport_size({"width": WIDTH, "height": int(min(max(900, content + 120), 4000))})
    page.wait_for_timeout(800)
    page.screenshot(path=str(path))
    page.set_viewport_size({"width": WIDTH, "height": 1000})
    print("wrote", path.relative_to(REPO) if path.is_relative_to(REPO) else path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "screenshots"))
    parser.add_argument("--no-job", action="store_true", help="skip the short training job")
    args = parser.parse_args()
    if not CHROMIUM.is_file():
        print(f"Chromium not found at {CHROMIUM}; run `make browser-deps`.", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    from boneai import inference

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="boneai-shots-"))
    env = {"BONEAI_REVIEW_DB": str(tmp / "reviews.sqlite"), "BONEAI_JOBS_DIR": str(tmp / "jobs"),
           "BONEAI_WEIGHTS_DIR": str(inference.WEIGHTS_DIR)}
    if not args.no_job:
        sys.path.insert(0, str(REPO / "tests"))
        from _fixtures_train import fracture_folder

        from boneai.jobs import JobRunner, TrainRequest

        data = fracture_folder(tmp / "data", per_class=16)
        runner = JobRunner(tmp / "jobs")
        job = runner.start(TrainRequest(task="fracture", data=str(data), epochs=3, batch_size=8, image_size=160))
        status = runner.wait(job.id, timeout=900)
        print("training job:", status.state)

    with AppServer(env) as url, sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page(viewport={"width": WIDTH, "height": 1000})
            page.goto(url)
            # the default model's evidence: a localiser's boxes, or a classifier's heatmap
            page.get_by_text(re.compile(EVIDENCE_CAPTION)).first.wait_for(timeout=300_000)
            form = page.locator('[data-testid="stForm"]')
            form.get_by_text("Agree", exact=True).click()
            form.locator("textarea").fill("Cortical break at the distal radius on both views.")
            form.get_by_role("button", name="Save to review log").click()
            page.get_by_text(re.compile(r"Saved to the review log")).wait_for(timeout=60_000)
            shoot(page, out / "study_review.png")

            page.goto(url + "/preprocessing")
            page.get_by_text("What the model sees").wait_for(timeout=120_000)
            page.get_by_text("CLAHE", exact=True).click()
            page.get_by_text("Segmentation overlay", exact=True).click()
            page.get_by_text(re.compile(r"mask covers")).first.wait_for(timeout=60_000)
            shoot(page, out / "preprocessing.png")

            page.goto(url + "/performance")
            page.get_by_text("Sensitivity").first.wait_for(timeout=120_000)
            page.locator(".js-plotly-plot").nth(2).wait_for(timeout=60_000)
            shoot(page, out / "performance.png")

            page.goto(url + "/training")
            page.get_by_role("heading", name="Training", exact=True).wait_for(timeout=60_000)
            if not args.no_job:
                page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
            shoot(page, out / "training.png")

            page.goto(url + "/review_log")
            page.get_by_text("Reviews shown").wait_for(timeout=60_000)
            page.locator('[data-testid="stDataFrame"]').first.wait_for(timeout=60_000)
            shoot(page, out / "review_log.png")
        finally:
            browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
