"""The sample in headless Chromium at ``--serve``'s default pace: a refusal that names the
holding job, the fan-out page, powercrud's progress endpoint signed out, and the styled pages.

Same live server + qcluster as ``tests/test_sample_browser.py`` (its ``live_sample`` fixture).
Screenshots go to ``artifacts/``.
"""

from __future__ import annotations

import re
import sqlite3

from tests import test_sample_browser
from tests.browser import launch_chromium
from tests.test_sample_browser import ARTIFACTS, htmx_idle

pytestmark = test_sample_browser.pytestmark
live_sample = test_sample_browser.live_sample  # the fixture: --serve on a fresh database
PROGRESS_URL = "/powercrud/powercrud/async/progress/"


def sign_in(page, base: str) -> None:
    page.goto(f"{base}/accounts/login/")
    page.get_by_test_id("demo-login").click()
    page.wait_for_url(f"{base}/")


def select_rows(page, base: str, path: str, ids: list[int]) -> None:
    """Tick the rows of ``ids`` on a powercrud list page (``Bulk Edit N`` then shows)."""
    from playwright.sync_api import expect

    page.goto(f"{base}{path}")
    page.wait_for_function("() => window.htmx !== undefined")
    page.wait_for_load_state("networkidle")
    for count, pk in enumerate(ids, 1):
        row = page.locator("tbody tr").filter(has=page.locator(f'a[href="{path}{pk}/"]'))
        htmx_idle(page)
        with page.expect_response(lambda r: "/toggle-selection/" in r.url):
            row.locator("input[type=checkbox]").check()
        htmx_idle(page)
        expect(page.get_by_role("link", name=re.compile(rf"Bulk Edit\s+{count}"))).to_be_visible()


def bulk_edit(page, field: str, choice: str) -> str:
    """Open the bulk-edit form, set ``field`` to ``choice``, apply; returns the job's key."""
    import json

    from playwright.sync_api import expect

    page.get_by_role("link", name=re.compile(r"Bulk Edit")).click()
    form = page.locator("#bulk-edit-form")
    expect(form).to_be_visible()
    form.locator(f"input[name=fields_to_update][value={field}]").check()
    form.locator(f"select[name={field}]").locator("xpath=..").locator(".ts-wrapper").click()
    page.locator(".ts-dropdown .option", has_text=choice).first.click()
    form.get_by_role("button", name="Apply Changes").click()
    expect(
        page.locator("#powercrudModalContent").get_by_text("Bulk Operation Queued")
    ).to_be_visible()
    return json.loads(page.locator("#progress-display").get_attribute("hx-vals"))["task_name"]


def test_refusal_names_the_holder_and_fan_out_page(live_sample):
    from playwright.sync_api import expect, sync_playwright

    base, database = live_sample
    ARTIFACTS.mkdir(exist_ok=True)
    expect.set_options(timeout=15_000)
    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            # signed out: powercrud's progress endpoint is refused (a made-up key too)
            anonymous = browser.new_context()
            answer = anonymous.request.get(f"{base}{PROGRESS_URL}?task_name=made-up-key")
            assert answer.status == 403, answer.text()
            assert "Completed successfully" not in answer.text()
            anonymous.close()

            page = browser.new_page(viewport={"width": 1280, "height": 820})
            page.set_default_timeout(20_000)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            sign_in(page, base)

            # a second signed-in session (its own selection) ticks all six books; the first
            # launches a job on them; the second's bulk edit is then refused, by name
            other = browser.new_page(viewport={"width": 1280, "height": 820})
            other.set_default_timeout(20_000)
            sign_in(other, base)
            books = [1, 2, 3, 4, 5, 6]
            select_rows(other, base, "/library/book/", books)
            select_rows(page, base, "/library/book/", books)
            task_key = bulk_edit(page, "status", "In review")
            signed_in = page.request.get(f"{base}{PROGRESS_URL}?task_name={task_key}")
            assert signed_in.status in (200, 286), signed_in.text()
            other.get_by_role("link", name=re.compile(r"Bulk Edit\s+6")).click()
            refusal = other.locator("[data-powercrud-bulk-outcome=conflict]")
            expect(refusal).to_contain_text("Books 1, 2, 3, 4, 5 and 1 more are held by job")
            holder = refusal.locator(f'[data-holder="{task_key}"] a')
            expect(holder).to_have_text(f"{task_key[:8]}…")
            assert holder.get_attribute("href") == f"/taskctx/job/{task_key}/"
            other.screenshot(path=str(ARTIFACTS / "sample-refusal.png"))
            # the holder's link opens the job's trace
            holder.click()
            expect(other).to_have_url(re.compile(rf"/taskctx/job/{task_key}/$"))

            # the fan-out switch: the "Albums (fan-out)" page, powercrud's own bulk edit
            with sqlite3.connect(database) as db:
                tiers = dict(db.execute("SELECT id, price_tier FROM library_album").fetchall())
            albums = sorted(tiers)[:3]
            target = "premium" if sum(tiers[a] != "premium" for a in albums) >= 2 else "budget"
            changed = sum(tiers[a] != target for a in albums)
            page.goto(f"{base}/")
            page.get_by_role("link", name="Albums (fan-out)").first.click()
            expect(page).to_have_url(re.compile(r"/library/album-fan-out/$"))
            select_rows(page, base, "/library/album-fan-out/", albums)
            fan_key = bulk_edit(page, "price_tier", target.capitalize())
            expect(page.locator("#async-status-heading")).to_have_text(
                "Bulk Operation Completed", timeout=60_000
            )
            page.screenshot(path=str(ARTIFACTS / "sample-fan-out.png"))
            fan_out_trace(page, base, fan_key, changed)
            assert not errors, errors
        finally:
            browser.close()
    with sqlite3.connect(database) as db:
        children = db.execute(
            "SELECT count(*) FROM django_q_task"
            " WHERE func = 'sample.library.tasks.reprice_album_tracks_fanned_out' AND success"
        ).fetchone()[0]
    assert children == changed  # one child job per album whose tier changed


def fan_out_trace(page, base: str, key: str, children: int) -> None:
    """The fan-out job's trace, in the sample's navigation: open on its children's runs, each
    naming its album and its worker, their steps and progress counted."""
    from playwright.sync_api import expect

    runs = page.locator(".tc-row", has=page.locator(".tc-fan"))
    for _ in range(20):  # the children's spans reach the store when their batch is flushed
        page.goto(f"{base}/taskctx/job/{key}/")
        page.wait_for_selector('#taskctx-job[data-ready="1"]')
        if runs.count() == children:
            break
        page.wait_for_timeout(500)
    expect(page.locator("nav[aria-label='Sample navigation']")).to_be_visible()
    expect(page.locator("[data-nav=traces]")).to_be_visible()
    assert runs.count() == children  # visible without expanding anything
    for i in range(children):
        expect(runs.nth(i)).to_be_visible()
        expect(runs.nth(i).locator(".tc-what")).to_have_text(re.compile(r"^Album #\d+ '"))
        expect(runs.nth(i).locator(".tc-worker")).to_have_text(re.compile(r"^worker \d+$"))
    expect(page.locator("#tc-steps")).to_have_text(str(children))
    expect(page.locator("#tc-progress li", has_text="repriced").first).to_be_visible()
    # each progress line links to the run it came from, named with its album
    link = page.locator("#tc-progress li a", has_text=re.compile(r"\u00b7 Album #\d+ '"))
    expect(link.first).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "sample-fan-out-trace.png"), full_page=True)


def test_pages_are_styled_and_the_dashboard_fits(live_sample):
    from playwright.sync_api import expect, sync_playwright

    base, database = live_sample
    ARTIFACTS.mkdir(exist_ok=True)
    # a finished job with the long texts a real one has, for the dashboard's table
    long_text = "Book #80 'The Burning Harbour 80' (book 20/20): chapter 5/5 synced (100%) " * 2
    with sqlite3.connect(database.with_name("runtime.sqlite3")) as db:
        db.execute(
            "INSERT INTO library_asynctaskrecord (task_name, status, message, progress_payload,"
            " user_label, affected_objects, result_payload, cleaned_up, created_at, updated_at,"
            " completed_at) VALUES (?, 'success', '', ?, 'demo', ?, '', 0, datetime('now'),"
            " datetime('now'), datetime('now'))",
            (test_sample_browser.OLDER_JOB, long_text, long_text),
        )
    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 820})
            page.goto(f"{base}/accounts/login/")
            for name in ("username", "password"):
                border = page.locator(f"input[name={name}]").evaluate(
                    "e => { const s = getComputedStyle(e);"
                    " return [parseFloat(s.borderTopWidth), s.borderTopColor]; }"
                )
                assert border[0] >= 1 and border[1] not in ("transparent", "rgba(0, 0, 0, 0)")
            page.screenshot(path=str(ARTIFACTS / "sample-login.png"))
            sign_in(page, base)
            heading = page.get_by_role("heading", name="Nested bulk edits, safe and visible")
            sizes = heading.evaluate(
                "h => [parseFloat(getComputedStyle(h).fontSize),"
                " parseFloat(getComputedStyle(document.body).fontSize)]"
            )
            assert sizes[0] > sizes[1] * 1.3, sizes
            bullets = page.locator("main ul").first.evaluate(
                "u => getComputedStyle(u).listStyleType"
            )
            assert bullets == "disc"
            page.screenshot(path=str(ARTIFACTS / "sample-home.png"))
            page.goto(f"{base}/library/jobs/")
            header = page.locator("thead th", has_text="Completed at")
            expect(header).to_be_visible()
            right = header.evaluate("h => h.getBoundingClientRect().right")
            assert right <= page.evaluate("() => document.documentElement.clientWidth")
            page.screenshot(path=str(ARTIFACTS / "sample-dashboard-fits.png"))
        finally:
            browser.close()
