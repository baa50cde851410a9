"""In a real browser: the localiser's fracture boxes are drawn on an uploaded view, where ``predict`` puts
them, and the reviewer can zoom into one. Headless Debian Chromium driven by Playwright."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _app_server import CHROMIUM, REPO, AppServer, launch_chromium  # noqa: E402

pytestmark = pytest.mark.browser

ARTIFACTS = REPO / "test-artifacts"
FRACTURED = [REPO / "samples" / "fracatlas" / f"IMG{n}.jpg"
             for n in ("0000019", "0000351", "0000479", "0002180", "0002621")]


def _box_pixels(rgb: np.ndarray) -> np.ndarray:
    """Where a drawn box is: clearly coloured pixels (the radiograph itself is grey)."""
    rgb = rgb.astype(np.int16)
    spread = rgb.max(axis=2) - rgb.min(axis=2)
    return (spread > 80) & (rgb[..., 0] > 180)


def test_boxes_are_drawn_on_an_uploaded_view_and_can_be_zoomed(tmp_path: Path) -> None:
    if not CHROMIUM.is_file():
        pytest.skip(f"Chromium not installed at {CHROMIUM} (run `make browser-deps` or apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="python package playwright not installed")
    import cv2

    from boneai import inference
    from boneai.io import read_radiograph

    cards = {c["name"]: c for c in inference.available_models("fracture")}
    name = next((n for n, c in cards.items() if c.get("kind") == "localiser"), None)
    if name is None:
        pytest.skip(f"no fracture localiser in {inference.WEIGHTS_DIR}")
    predictor = inference.load_model(cards[name]["dir"])
    sample, boxes = None, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in FRACTURED:  # the first fractured sample on which the localiser draws a box
            boxes = predictor.predict(read_radiograph(path)).extras["boxes"]
            if boxes:
                sample = path
                break
    assert sample is not None, "the localiser draws no box on any fractured sample"
    height, width = read_radiograph(sample).pixels.shape[:2]
    caption = f"{len(boxes)} box(es): " + ", ".join(
        f"#{k} {b['score']:.2f} ({'solid' if b['operating_point'] == 'balanced' else 'dashed'})"
        for k, b in enumerate(boxes, 1))

    ARTIFACTS.mkdir(exist_ok=True)
    env = {"BONEAI_REVIEW_DB": str(tmp_path / "reviews.sqlite"), "BONEAI_JOBS_DIR": str(tmp_path / "jobs"),
           "BONEAI_WEIGHTS_DIR": str(inference.WEIGHTS_DIR)}
    with AppServer(env, log_path=ARTIFACTS / "browser_boxes_server.log") as url, sync_api.sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.set_default_timeout(120_000)
            page.goto(url)
            page.get_by_role("heading", name="Study review").wait_for(timeout=120_000)

            # Choose the localiser in the sidebar, then upload one view.
            sidebar = page.locator('[data-testid="stSidebar"]')
            sidebar.locator('[data-testid="stSelectbox"]').filter(has_text="Fracture").first.click()
            page.get_by_role("option", name=name, exact=True).click()
            page.get_by_text("Upload files", exact=True).click()
            page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(str(sample))
            page.get_by_text(f"View 1: {sample.name}").wait_for(timeout=120_000)

            # The boxes listed are predict's, in its order and with its scores.
            page.get_by_text(caption, exact=True).wait_for(timeout=120_000)
            page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=60_000)

            # The view shown carries them: coloured pixels where predict's first box is, none elsewhere far off.
            img = page.locator('[data-testid="stMain"] [data-testid="stImage"] img').first
            shown = page.request.get(page.url.rstrip("/") + "/" + img.get_attribute("src").lstrip("/")
                                     if not img.get_attribute("src").startswith("http") else img.get_attribute("src"))
            rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(shown.body(), np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            assert rgb.shape[:2] == (height, width)  # shown in the file's own pixels
            ys, xs = np.nonzero(_box_pixels(rgb))
            assert xs.size > 50, "no box drawn on the view"
            edge = max(6, round(max(height, width) / 100))
            near_any = np.zeros(xs.shape, bool)
            for b in boxes:
                near_any |= ((xs >= b["x0"] - edge) & (xs <= b["x1"] + edge)
                             & (ys >= b["y0"] - edge - 30) & (ys <= b["y1"] + edge))  # 30: the rank label above
            assert near_any.mean() > 0.95, "coloured pixels away from predict's boxes"
            first = boxes[0]
            on_first = ((xs >= first["x0"] - edge) & (xs <= first["x1"] + edge)
                        & (ys >= first["y0"] - edge) & (ys <= first["y1"] + edge))
            assert on_first.sum() >= 0.5 * ((first["x1"] - first["x0"]) + (first["y1"] - first["y0"]))

            # Zoom into the first box.
            page.locator('[data-testid="stSelectbox"]').filter(has_text="Zoom into box").first.click()
            page.get_by_role("option", name="#1", exact=True).click()
            page.get_by_text(f"Box #1, score {first['score']:.2f}").wait_for(timeout=60_000)
            page.wait_for_function(  # the zoomed crop is a second image in the view, loaded
                "() => { const imgs = document.querySelectorAll('[data-testid=\"stMain\"] [data-testid=\"stImage\"] img');"
                " return imgs.length >= 2 && imgs[1].complete && imgs[1].naturalWidth > 10; }", timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "browser_fracture_boxes.png"))
        finally:
            browser.close()
