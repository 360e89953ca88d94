"""``make browser`` falls back to the distribution's chromium when Playwright's download fails.

The download is made to fail for real: Playwright's download host is pointed at a closed local
port, and its browsers folder is an empty one, so nothing is there from an earlier download.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest

from tests.browser import candidates, launch_chromium
from tests.test_demo import REPO_ROOT

pytestmark = [pytest.mark.browser]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nobody listens there once the socket is closed


def test_make_browser_uses_the_distribution_chromium_when_the_download_fails(tmp_path, monkeypatch):
    browsers = tmp_path / "playwright-browsers"
    env = {k: v for k, v in os.environ.items() if k != "TASKCTX_CHROMIUM"}
    env.update(
        PLAYWRIGHT_BROWSERS_PATH=str(browsers),
        PLAYWRIGHT_DOWNLOAD_HOST=f"http://127.0.0.1:{closed_port()}",
    )
    out = subprocess.run(
        ["make", "--no-print-directory", "browser"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "browser: Playwright's download failed (" in out.stdout
    assert "): using the distribution's chromium" in out.stdout
    distribution = shutil.which("chromium")
    assert distribution is not None

    # the tests then drive the distribution's chromium, and it starts
    from playwright.sync_api import sync_playwright

    monkeypatch.delenv("TASKCTX_CHROMIUM", raising=False)
    monkeypatch.setenv("PLAYWRIGHT_BROWSERS_PATH", str(browsers))
    with sync_playwright() as pw:
        assert candidates(pw) == [distribution]
        browser = launch_chromium(pw)
        try:
            page = browser.new_page()
            page.set_content("<p id='answer'>it runs</p>")
            assert page.inner_text("#answer") == "it runs"
        finally:
            browser.close()
