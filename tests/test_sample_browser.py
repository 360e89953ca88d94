"""A person's bulk edit in powercrud's own UI, in headless Chromium, on a live server + qcluster.

``taskctx_demo --serve`` starts runserver and a real qcluster on a fresh sample database; the
browser signs in, ticks several books, runs an async bulk edit, watches powercrud's progress
modal (fed by the nested saves) reach completion, and the chapters are checked afterwards.
Screenshots go to ``artifacts/``; ``TASKCTX_DOCS_SCREENSHOTS=1`` also refreshes
``docs/img/sample.png`` (the one in the docs).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.browser import launch_chromium
from tests.test_demo import REPO_ROOT, sample_env

ARTIFACTS = REPO_ROOT / "artifacts"
DOCS_IMAGE = REPO_ROOT / "docs" / "img" / "sample.png"
#: powercrud's progress bar once filled: its value, its and its track's width, the message
BAR_STATE = """() => {
  const display = document.getElementById("progress-display");
  const bar = display && display.querySelector(".progress-bar[aria-valuenow]");
  if (!bar || !/\\(\\d+%\\)/.test(display.innerText)) return null;
  return {
    text: display.innerText,
    now: Number(bar.getAttribute("aria-valuenow")),
    width: bar.getBoundingClientRect().width,
    track: bar.parentElement.getBoundingClientRect().width,
    colour: getComputedStyle(bar).backgroundColor,
  };
}"""
OLDER_JOB = "0ld0ld00-0000-4000-8000-000000000000"
OLDER_JOB_SQL = (
    "INSERT INTO library_asynctaskrecord (task_name, status, message, progress_payload,"
    " user_label, affected_objects, result_payload, cleaned_up, created_at, updated_at)"
    " VALUES (?, 'success', '', '', 'demo', '', '', 0, datetime('now', '-1 hour'),"
    " datetime('now', '-1 hour'))"
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.cluster,
    pytest.mark.skipif(
        os.environ.get("TASKCTX_STACK", "embedded") != "embedded",
        reason="the browser test runs on the embedded stack",
    ),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise AssertionError(
                f"--serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer in {timeout}s:\n{log.read_text()[-3000:]}")


def htmx_idle(page, quiet: float = 0.4) -> None:
    """Wait until no HTMX request has been in flight for ``quiet`` seconds."""
    deadline = time.monotonic() + 20
    calm_since = None
    while time.monotonic() < deadline:
        busy = page.evaluate("() => document.querySelectorAll('.htmx-request').length > 0")
        if busy:
            calm_since = None
        elif calm_since is None:
            calm_since = time.monotonic()
        elif time.monotonic() - calm_since >= quiet:
            return
        time.sleep(0.05)


@pytest.fixture
def live_sample(tmp_path):
    """``taskctx_demo --serve`` on a free port; yields (base url, sqlite path); stops it."""
    port = free_port()
    log = tmp_path / "serve.log"
    env = sample_env(tmp_path)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable, "sample/manage.py", "taskctx_demo", "--serve",
                "--port", str(port), "--books", "6", "--chapters", "3",
                "--albums", "3", "--tracks", "2",  # at --serve's default pace
            ],
            cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/accounts/login/", proc, log)
        yield base, Path(env["SAMPLE_VAR_DIR"]) / "sample.sqlite3"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # --serve stops runserver and the cluster
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
    text = log.read_text(errors="replace")
    assert "stopping" in text, text[-3000:]
    assert "Traceback" not in text, text[-5000:]


def test_async_bulk_edit_in_powercrud_ui(live_sample, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    base, database = live_sample
    # a job launched an hour earlier: the dashboard must list the new one above it
    with sqlite3.connect(database.with_name("runtime.sqlite3")) as db:
        db.execute(OLDER_JOB_SQL, (OLDER_JOB,))
    ARTIFACTS.mkdir(exist_ok=True)
    expect.set_options(timeout=15_000)  # a busy 2-core CI machine
    picked = [2, 3, 4]  # book ids of a fresh database
    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 820})
            page.set_default_timeout(20_000)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))

            page.goto(f"{base}/")
            assert "/accounts/login/" in page.url
            page.get_by_test_id("demo-login").click()
            expect(
                page.get_by_role("heading", name="Nested bulk edits, safe and visible")
            ).to_be_visible()

            page.goto(f"{base}/library/book/")
            page.wait_for_function("() => window.htmx !== undefined")
            page.wait_for_load_state("networkidle")
            for count, pk in enumerate(picked, 1):
                row = page.locator("tbody tr").filter(
                    has=page.locator(f'a[href="/library/book/{pk}/"]')
                )
                htmx_idle(page)  # powercrud refreshes the table after a toggle: let it land
                with page.expect_response(lambda r: "/toggle-selection/" in r.url):
                    row.locator("input[type=checkbox]").check()
                htmx_idle(page)
                expect(
                    page.get_by_role("link", name=re.compile(rf"Bulk Edit\s+{count}"))
                ).to_be_visible()

            page.get_by_role("link", name=re.compile(r"Bulk Edit")).click()
            form = page.locator("#bulk-edit-form")
            expect(form).to_be_visible()
            form.locator("input[name=fields_to_update][value=status]").check()
            form.locator(".ts-wrapper").first.click()  # powercrud's searchable select
            page.locator(".ts-dropdown .option", has_text="Published").first.click()
            assert form.locator("select[name=status]").input_value() == "published"
            form.get_by_role("button", name="Apply Changes").click()

            modal = page.locator("#powercrudModalContent")
            expect(modal.get_by_text("Bulk Operation Queued")).to_be_visible()
            # the key of the job just launched, as the modal polls its progress with it
            task_key = json.loads(page.locator("#progress-display").get_attribute("hx-vals"))[
                "task_name"
            ]
            # progress from the nested saves, shown by powercrud's own modal
            progress = page.locator("#progress-display")
            expect(progress).to_contain_text(re.compile(r"Book #\d+ .*chapter \d/3 synced"))
            # the bar shows the JOB's fraction the message carries: books done plus chapters
            # of the current book (report_progress(done=, total=)), with its percentage
            bar = page.wait_for_function(BAR_STATE, timeout=20_000).json_value()
            shown = re.search(r"\(book (\d)/3\): chapter (\d)/3 synced \((\d+)%\)", bar["text"])
            assert shown, bar
            book, chapter, percent = (int(g) for g in shown.groups())
            assert bar["now"] == percent == ((book - 1) * 3 + chapter) * 100 // 9
            assert bar["track"] > 0 and abs(bar["width"] - bar["track"] * bar["now"] / 100) < 2
            assert bar["colour"] not in ("transparent", "rgba(0, 0, 0, 0)"), bar
            page.screenshot(path=str(ARTIFACTS / "sample-bulk-edit-progress.png"))
            if os.environ.get("TASKCTX_DOCS_SCREENSHOTS") == "1" or not DOCS_IMAGE.exists():
                DOCS_IMAGE.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(DOCS_IMAGE))
            expect(page.locator("#async-status-heading")).to_have_text(
                "Bulk Operation Completed", timeout=60_000
            )
            expect(progress).to_contain_text("Completed successfully")
            page.screenshot(path=str(ARTIFACTS / "sample-bulk-edit-done.png"))

            # the list shows the new status; powercrud's dashboard shows the finished job
            page.goto(f"{base}/library/book/")
            for pk in picked:
                row = page.locator("tbody tr").filter(
                    has=page.locator(f'a[href="/library/book/{pk}/"]')
                )
                expect(row).to_contain_text("published")
            page.goto(f"{base}/library/jobs/")
            job_row = page.locator("tbody tr", has=page.get_by_text(task_key, exact=True))
            expect(job_row).to_contain_text("success")
            # newest first: the job just launched above the older one
            rows = page.locator("tbody tr")
            expect(rows).to_have_count(2)
            expect(rows.nth(0)).to_contain_text(task_key)
            expect(rows.nth(1)).to_contain_text(OLDER_JOB)
            page.screenshot(path=str(ARTIFACTS / "sample-dashboard.png"))
            # the task name opens the job's tree in otel_taskctx's viewer
            job_row.locator("a[href*='/trace/']").click()
            expect(page).to_have_url(re.compile(rf"/taskctx/job/{task_key}/$"))
            # (3 chapters of each of the 3 books, locked under the job's key)
            expect(page.locator("body")).to_contain_text(re.compile(r"Descendants locked\s*9"))
            expect(page.locator("body")).to_contain_text("bulk_update_task")
            # each Book.save row names its book (the span's taskctx.label)
            page.wait_for_selector('#taskctx-job[data-ready="1"]')
            run = page.locator(".tc-row[data-depth='1']", has_text="bulk_update_task")
            if run.get_attribute("aria-expanded") == "false":
                run.locator(".tc-toggle").click()
            for pk in picked:
                save = page.locator(".tc-row", has=page.locator(".tc-name", has_text="Book.save"))
                book = save.locator(".tc-what", has_text=re.compile(rf"^Book #{pk} '"))
                expect(book).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "sample-job-tree.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()

    # the descendants changed, inside the job
    with sqlite3.connect(database) as db:
        rows = db.execute(
            "SELECT book_id, status, synced_at FROM library_chapter WHERE book_id IN (?, ?, ?)",
            picked,
        ).fetchall()
        untouched = db.execute(
            "SELECT count(*) FROM library_chapter WHERE book_id NOT IN (?, ?, ?) AND status = 'published'",
            picked,
        ).fetchone()[0]
    assert len(rows) == 9
    assert {status for _, status, _ in rows} == {"published"}
    assert all(synced for _, _, synced in rows)
    assert untouched == 0
