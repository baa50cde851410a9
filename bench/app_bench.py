"""App figures in a real browser: start to first page, and a 4-view study from upload to its numbers and evidence.

    .venv/bin/python bench/app_bench.py [--repeats 5] [--starts 3] [--out bench/results/app_bench.json]

1. *Start to first page*: ``streamlit run app.py`` is started cold; the clock stops when the Study
   review page shows the bundled sample study's probabilities (model loaded, prediction made,
   evidence drawn). Median over ``--starts`` cold starts. Target <= 10 s.
2. *4-view study*: in the warm app, four radiographs are uploaded through the file input, evidence on
   (the default); one clock stops when the last of the four views shows its probability (target
   <= 3 s on 2 cores), another when all four views' evidence is drawn with its caption (a
   localiser's boxes, or a classifier's heatmap; it may follow the probabilities: no target). Every
   repeat uploads files never seen before (re-encoded with a one-pixel change), so no cache helps. Median over ``--repeats``.

Uses headless Debian Chromium (``make browser-deps``) and the models in the weights folder
(``BONEAI_WEIGHTS_DIR`` or weights/). Run it on an otherwise idle machine: the figures are wall clock.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from _app_server import CHROMIUM, EVIDENCE_CAPTION, AppServer, launch_chromium  # noqa: E402

VIEWS = ["fracatlas/IMG0000351.jpg", "fracatlas/IMG0000479.jpg", "fracatlas/IMG0002180.jpg", "fracatlas/IMG0000597.jpg"]
TARGET_STUDY_S = 3.0
TARGET_START_S = 10.0


def unseen_copies(folder: Path, repeat: int) -> list[Path]:
    """The four views re-encoded as PNG with one pixel changed: same image, new file contents."""
    out = []
    for i, rel in enumerate(VIEWS):
        img = np.asarray(Image.open(REPO / "samples" / rel).convert("L")).copy()
        img[0, 0] = (int(img[0, 0]) + 1 + repeat) % 256
        path = folder / f"r{repeat}_view{i + 1}.png"
        Image.fromarray(img).save(path)
        out.append(path)
    return out


def wait_first_page(page, url: str, timeout_ms: int = 180_000) -> None:
    page.goto(url)
    page.get_by_text(re.compile(EVIDENCE_CAPTION)).first.wait_for(timeout=timeout_ms)
    page.locator('[data-testid="stMetric"]').filter(has_text="Study probability").first.wait_for(timeout=timeout_ms)


#: True once the page shows the four views of the upload whose names start with ``prefix`` and, for
#: each, a loaded image and its evidence caption, none of them left over from the previous run.
STUDY_DRAWN_JS = """([prefix, caption]) => {
    const fresh = (el) => !el.closest('[data-stale="true"]');
    const names = [...document.querySelectorAll('[data-testid="stText"]')]
        .filter(t => fresh(t) && t.innerText.startsWith('View ') && t.innerText.includes(prefix));
    const captions = [...document.querySelectorAll('[data-testid="stCaptionContainer"]')]
        .filter(c => fresh(c) && new RegExp(caption).test(c.innerText));
    const images = [...document.querySelectorAll('[data-testid="stMain"] [data-testid="stImage"] img')]
        .filter(i => fresh(i) && i.complete && i.naturalWidth > 0);
    return names.length === 4 && captions.length === 4 && images.length === 4;
}"""


#: True once each of the four views of the upload whose names start with ``prefix`` shows its
#: probability (the metric in the view's own container), none of them left over from the previous run.
PROBABILITIES_DRAWN_JS = """(prefix) => {
    const fresh = (el) => !el.closest('[data-stale="true"]');
    const names = [...document.querySelectorAll('[data-testid="stText"]')]
        .filter(t => fresh(t) && t.innerText.startsWith('View ') && t.innerText.includes(prefix));
    return names.length === 4 && names.every(t => {
        const block = t.closest('[data-testid="stVerticalBlock"]');
        return block && [...block.querySelectorAll('[data-testid="stMetric"]')]
            .some(m => fresh(m) && m.innerText.startsWith('Probability') && /\\d\\.\\d{3}/.test(m.innerText));
    });
}"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "app_bench.json"))
    args = parser.parse_args()
    if not CHROMIUM.is_file():
        print(f"Chromium not found at {CHROMIUM}; run `make browser-deps`.", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    from boneai import inference

    model = inference.default_model_name("fracture")
    tmp = Path(tempfile.mkdtemp(prefix="boneai-bench-"))
    env = {"BONEAI_REVIEW_DB": str(tmp / "reviews.sqlite"), "BONEAI_JOBS_DIR": str(tmp / "jobs"),
           "BONEAI_WEIGHTS_DIR": str(inference.WEIGHTS_DIR)}
    load_before = os.getloadavg()
    start_s, healthy_s, study_s, probability_s = [], [], [], []
    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            for _ in range(args.starts):
                server = AppServer(env)
                with server as url:
                    page = browser.new_page(viewport={"width": 1400, "height": 2400})
                    wait_first_page(page, url)
                    start_s.append(time.perf_counter() - server.t0)
                    healthy_s.append(server.started_s)
                    print(f"start to first page: {start_s[-1]:.2f} s (server healthy after {server.started_s:.2f} s)")
                    if len(start_s) == args.starts:  # the last server stays up for the study figure
                        for r in range(args.repeats + 1):  # the first is a warm-up (CAM objects, code paths)
                            wait_first_page(page, url)  # a fresh session: the uploader starts empty
                            page.get_by_text("Upload files", exact=True).click()
                            uploader = page.locator('[data-testid="stFileUploader"] input[type="file"]')
                            uploader.wait_for(state="attached", timeout=60_000)
                            files = unseen_copies(tmp, r)
                            t0 = time.perf_counter()
                            uploader.set_input_files([str(f) for f in files])
                            page.wait_for_function(PROBABILITIES_DRAWN_JS, arg=f"r{r}_", timeout=180_000, polling=20)
                            to_probability = time.perf_counter() - t0
                            page.wait_for_function(STUDY_DRAWN_JS, arg=[f"r{r}_", EVIDENCE_CAPTION],
                                                   timeout=180_000, polling=20)
                            elapsed = time.perf_counter() - t0
                            if r > 0:
                                study_s.append(elapsed)
                                probability_s.append(to_probability)
                            print(f"4-view study {'(warm-up) ' if r == 0 else ''}upload to last probability: "
                                  f"{to_probability:.2f} s, to all evidence: {elapsed:.2f} s")
                    page.close()
        finally:
            browser.close()

    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/app_bench.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "model": model,
        "weights_dir": str(inference.WEIGHTS_DIR),
        "torch_threads_in_app": "BONEAI_TORCH_THREADS or min(4, cpus // 2)",
        "study_upload_to_last_probability_s": {"median": round(statistics.median(probability_s), 3),
                                               "runs": [round(x, 3) for x in probability_s], "views": len(VIEWS),
                                               "evidence": "on", "target": TARGET_STUDY_S},
        "study_upload_to_all_evidence_s": {"median": round(statistics.median(study_s), 3),
                                           "runs": [round(x, 3) for x in study_s], "views": len(VIEWS),
                                           "target": None, "note": "boxes or heatmaps may follow the probabilities"},
        "app_start_to_first_page_s": {"median": round(statistics.median(start_s), 3),
                                      "runs": [round(x, 3) for x in start_s],
                                      "server_healthy_median": round(statistics.median(healthy_s), 3),
                                      "target": TARGET_START_S},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
