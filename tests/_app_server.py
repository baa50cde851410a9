"""Start the real app (`streamlit run app.py`) on a free port, and headless Chromium to drive it.

Shared by tests/test_browser.py and bench/app_bench.py. Chromium comes from the Debian package
(`make browser-deps`); Playwright's own browser download is never used.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from boneai.pacs_server import free_port  # noqa: E402  (one helper for every local server we start)

CHROMIUM = Path(os.environ.get("BONEAI_CHROMIUM", "/usr/bin/chromium"))
#: The caption Study review writes under a view's evidence: a classifier's heatmap, or a localiser's boxes
#: (or none passing); a regular expression that Python and JavaScript read alike.
EVIDENCE_CAPTION = r"^(Heatmap \(|\d+ box\(es\): |No box passes)"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


class AppServer:
    """``with AppServer(env) as url:`` runs the app until the block ends; ``started_s`` is the time to healthy.

    ``args`` go on the ``streamlit run`` command line (e.g. ``--secrets.files`` for a test's own sign-in
    settings); ``port`` is chosen here, so a test can put it into those settings before starting.
    """

    def __init__(self, env: dict[str, str] | None = None, log_path: Path | None = None,
                 args: list[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path
        self.args = list(args or [])
        self.proc: subprocess.Popen | None = None
        self.started_s: float | None = None
        self.t0 = 0.0

    def __enter__(self) -> str:
        log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(REPO / "app.py"), "--server.port", str(self.port),
             "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
             "--server.fileWatcherType", "none"] + self.args + ([] if not os.environ.get("BONEAI_APP_DEBUG") else ["--logger.level", "debug"]),
            cwd=str(REPO), env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with status {self.proc.returncode}")
            try:
                with urllib.request.urlopen(self.url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        self.started_s = time.perf_counter() - self.t0
                        return self.url
            except OSError:
                time.sleep(0.2)
        self.__exit__(None, None, None)
        raise RuntimeError("streamlit did not become healthy within 120 s")

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def launch_chromium(playwright: Any) -> Any:
    """Headless Debian Chromium through Playwright's Chromium driver."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
