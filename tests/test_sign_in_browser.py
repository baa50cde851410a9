"""Sign-in end to end: a real OpenID Connect provider, the real app, headless Chromium.

The provider is ``oidc-provider-mock`` running in a thread of this test; its authorization form
offers two predefined users, a reviewer and an admin (role claim ``roles``). The app gets its own
secrets file (``--secrets.files``) in a temporary folder, so nothing is written into the repository.
Nothing about ``st.user`` is mocked: Streamlit runs its own login, callback and cookie.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _app_server import CHROMIUM, REPO, AppServer, launch_chromium  # noqa: E402

pytestmark = pytest.mark.browser

ARTIFACTS = REPO / "test-artifacts"
REVIEWER = ("rita", {"email": "rita@hospital.example", "name": "Rita Reviewer", "roles": ["boneai-reviewer"]})
ADMIN = ("adam", {"email": "adam@hospital.example", "name": "Adam Admin", "roles": ["boneai-admin"]})


def _secrets(path: Path, app_port: int, provider_port: int) -> None:
    path.write_text(
        "[auth]\n"
        # localhost, not 127.0.0.1, everywhere: the login cookie belongs to the redirect URI's origin.
        f'redirect_uri = "http://localhost:{app_port}/oauth2callback"\n'
        'cookie_secret = "test-cookie-secret-0123456789abcdef"\n'
        'client_id = "boneai-review"\n'
        'client_secret = "test-client-secret"\n'
        f'server_metadata_url = "http://localhost:{provider_port}/.well-known/openid-configuration"\n'
        "[boneai]\n"
        'role_claim = "roles"\n'
        'admin_role = "boneai-admin"\n')


def _sign_in(browser, url: str, sub: str, shots: str):
    """A fresh browser context (no cookies), through the app's Sign in button and the provider's form."""
    context = browser.new_context(viewport={"width": 1400, "height": 1200}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(120_000)  # a busy 2-core machine: first loads can be slow
    page.goto(url)
    page.get_by_role("button", name="Sign in").click()
    # The provider's authorization form: one button per predefined user.
    page.get_by_role("button", name=sub, exact=True).click()
    page.get_by_role("heading", name="Study review").wait_for(timeout=180_000)
    page.screenshot(path=str(ARTIFACTS / f"sign_in_{shots}.png"))
    return context, page


def _open(page, link: str) -> None:
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=120_000)
    page.get_by_role("link", name=link).click()
    page.get_by_role("heading", name=link, exact=True).wait_for(timeout=120_000)


def _reviews_shown(page) -> str:
    metric = page.locator('[data-testid="stMetric"]').filter(has_text="Reviews shown").first
    metric.wait_for(timeout=60_000)
    return metric.locator('[data-testid="stMetricValue"]').inner_text().strip()


def test_reviewer_and_admin_sign_in_through_a_real_provider(tmp_path: Path) -> None:
    if not CHROMIUM.is_file():
        pytest.skip(f"Chromium not installed at {CHROMIUM} (run `make browser-deps` or apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="python package playwright not installed")
    oidc = pytest.importorskip("oidc_provider_mock", reason="python package oidc-provider-mock not installed")
    pytest.importorskip("authlib", reason="python package Authlib (needed by st.login) not installed")
    from boneai.store import ReviewStore

    ARTIFACTS.mkdir(exist_ok=True)
    db = tmp_path / "reviews.sqlite"
    store = ReviewStore(db)
    for study, who in (("S-rita", REVIEWER[1]["email"]), ("S-otto", "otto@hospital.example")):
        store.add(study_id=study, views=["a.png"], model_name="fracture", model_version="v", task="fracture",
                  view_probabilities=[0.5], reviewer_decision="agree", reviewer=who)
    env = {"BONEAI_REVIEW_DB": str(db), "BONEAI_JOBS_DIR": str(tmp_path / "jobs")}
    users = [oidc.User(sub=sub, claims=claims) for sub, claims in (REVIEWER, ADMIN)]

    with oidc.run_server_in_thread(user_claims=users) as provider:
        secrets = tmp_path / "secrets.toml"
        server = AppServer(env, log_path=ARTIFACTS / "sign_in_server.log", args=["--secrets.files", str(secrets)])
        _secrets(secrets, server.port, provider.server_port)  # the app's port is known before it starts
        url = f"http://localhost:{server.port}"
        with server, sync_api.sync_playwright() as pw:
            browser = launch_chromium(pw)
            try:
                # Reviewer: no Training in the menu, nor by its address; only their own review; no export.
                context, page = _sign_in(browser, url, REVIEWER[0], "reviewer")
                page.get_by_text("rita@hospital.example (reviewer)").wait_for()
                nav = page.locator('[data-testid="stSidebarNav"]')
                nav.get_by_role("link", name="Review log").wait_for()
                assert nav.get_by_role("link", name="Training").count() == 0
                _open(page, "Review log")
                assert _reviews_shown(page) == "1"
                page.wait_for_function(  # the grid fills its accessible cells after it appears
                    "() => document.querySelector('[data-testid=\"stDataFrame\"]')?.textContent?.includes('S-rita')")
                assert "S-otto" not in page.locator('[data-testid="stDataFrame"]').text_content()
                assert page.get_by_role("button", name="Export CSV").count() == 0
                page.screenshot(path=str(ARTIFACTS / "sign_in_reviewer_log.png"))
                page.goto(url + "/training")  # a deep link is no way in either
                page.get_by_role("heading", name="Study review").wait_for()
                assert page.get_by_role("heading", name="Training").count() == 0
                assert page.get_by_role("button", name="Start training").count() == 0
                context.close()

                # Admin: Training and the whole log with its export.
                context, page = _sign_in(browser, url, ADMIN[0], "admin")
                page.get_by_text("adam@hospital.example (admin)").wait_for()
                _open(page, "Training")
                page.get_by_role("button", name="Start training").wait_for()
                _open(page, "Review log")
                assert _reviews_shown(page) == "2"
                page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=120_000)
                with page.expect_download(timeout=60_000) as download:
                    page.get_by_role("button", name="Export CSV").click()
                csv = Path(download.value.path()).read_text()
                assert "S-rita" in csv and "S-otto" in csv
                page.screenshot(path=str(ARTIFACTS / "sign_in_admin_log.png"))
                context.close()
            finally:
                browser.close()

    audit = ReviewStore(db).audit_log()
    lines = set(map(tuple, audit[["actor", "action"]].values.tolist()))
    assert ("rita@hospital.example", "sign-in") in lines and ("adam@hospital.example", "sign-in") in lines
    assert ("adam@hospital.example", "export") in lines
    assert not any(actor == "rita@hospital.example" and action == "export" for actor, action in lines)
