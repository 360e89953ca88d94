"""The Chromium the browser tests drive.

``make browser`` (run by ``make test``) downloads Playwright's own build; when that download
fails (a machine without access to Playwright's download host) it installs the
distribution's ``chromium`` instead. The tests take, in this order: ``TASKCTX_CHROMIUM`` (an
executable), Playwright's own build when it was downloaded, the distribution's
``chromium``; the first that starts. With none, the test is skipped.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

DISTRIBUTION_CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu"]


def candidates(pw: Any) -> list[str | None]:
    """Executables to try, best first (``None``: Playwright's own build)."""
    explicit = os.environ.get("TASKCTX_CHROMIUM")
    if explicit:
        return [explicit]
    found: list[str | None] = []
    if Path(pw.chromium.executable_path).exists():
        found.append(None)
    distribution = shutil.which("chromium") or DISTRIBUTION_CHROMIUM
    if Path(distribution).exists():
        found.append(distribution)
    return found


def launch_chromium(pw: Any) -> Any:
    """A headless Chromium browser (``pw``: a started sync Playwright); skips without one."""
    errors = []
    for executable in candidates(pw):
        try:
            return pw.chromium.launch(executable_path=executable, args=ARGS)
        except Exception as exc:  # e.g. Playwright's build without its system libraries
            errors.append(f"{executable or 'Playwright chromium'}: {str(exc).splitlines()[0]}")
    pytest.skip("no Chromium starts (make browser): " + ("; ".join(errors) or "none is installed"))
