"""Headless Chromium against a live server, after real nested jobs ran in a real qcluster.

Screenshots go to ``artifacts/`` (and the job page to ``docs/img/viewer.png``).
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client
from powercrud.async_manager import AsyncManager

from otel_taskctx.models import TaskSpan
from tests.browser import launch_chromium
from tests.test_viewer_cluster import APPROVE, NESTED, run_job

pytestmark = [
    pytest.mark.browser,
    pytest.mark.cluster,
    pytest.mark.django_db(transaction=True),
]

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "artifacts"
SETTINGS_MODULE = os.environ.get("DJANGO_SETTINGS_MODULE") or "tests.settings"


@contextmanager
def chromium():
    """Headless Chromium (Playwright's sync API runs an event loop: do ORM work before)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            yield browser
        finally:
            browser.close()


def session_cookie(live_server):
    user = User.objects.create_superuser("admin", "admin@example.com", None)
    client = Client()
    client.force_login(user)
    value = client.cookies[settings.SESSION_COOKIE_NAME].value
    return [{"name": settings.SESSION_COOKIE_NAME, "value": value, "url": live_server.url}]


def signed_in_page(browser, cookies):
    """A page of a fresh 1400x900 browser context with the session cookies, and the list its
    JavaScript errors go to."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.add_cookies(cookies)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return page, errors


def bar_box(row):
    box = row.locator(".tc-bar").bounding_box()
    assert box is not None and box["width"] > 0 and box["height"] > 0
    return box


def test_job_tree_in_the_browser(cluster_factory, cache, live_server, tmp_path):
    # live_server wraps the settings (settings.SETTINGS_MODULE is then None): name the module
    cluster = cluster_factory(env={"DJANGO_SETTINGS_MODULE": SETTINGS_MODULE})
    ok_key, ok_task = run_job(cluster, count=3, lines=4)
    failed_key, failed_task = run_job(cluster, count=2, lines=3, fail_first=True)
    assert ok_task.success and not failed_task.success
    # a job that is still running when the browser opens its page: it runs until the test
    # releases it (a fixed 4 s, then 10 s, ended before a busy 2-core machine had the page)
    release = tmp_path / "release-slow-job"
    slow_key = AsyncManager().launch_async_task(
        "tests.test_viewer_cluster.slow_job", 50.0, release_path=str(release)
    )
    cluster.wait_for(
        lambda: TaskSpan.objects.filter(root_task_key=slow_key, name="slow step").exists(),
        what="the running job's rows",
    )
    cookies = session_cookie(live_server)
    ARTIFACTS.mkdir(exist_ok=True)
    with chromium() as browser:
        check_pages(browser, live_server, cookies, ok_key, failed_key, slow_key, release)


def test_a_running_job_of_short_steps_opens_at_the_step_it_is_in(
    cluster_factory, cache, live_server, tmp_path
):
    """Each step takes 50 ms, far less than the store's running delay (1 s): the page still
    opens down to the step the job is in now, and "now at" names it."""
    cluster = cluster_factory(env={"DJANGO_SETTINGS_MODULE": SETTINGS_MODULE})
    release = tmp_path / "release-stepping-job"
    key = AsyncManager().launch_async_task(
        "tests.test_viewer_cluster.stepping_job", 50.0, release_path=str(release)
    )
    cluster.wait_for(
        lambda: TaskSpan.objects.filter(root_task_key=key, kind="CONSUMER").exists(),
        what="the running job's run",
    )
    cookies = session_cookie(live_server)
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        with chromium() as browser:
            page, errors = signed_in_page(browser, cookies)
            page.goto(f"{live_server.url}/taskctx/job/{key}/")
            page.wait_for_selector('#taskctx-job[data-ready="1"]')
            assert page.locator("#tc-status").inner_text() == "running"
            # (the page refreshes itself every 2 s: the first load may precede the step's row)
            note = page.locator("#tc-target-note")
            note.wait_for()
            page.wait_for_function(
                "document.getElementById('tc-target-note').textContent"
                " === 'now at: save item \u203a sync lines'",
                timeout=15_000,
            )
            target = page.locator(".tc-row.tc-target")
            assert target.locator(".tc-name").inner_text() == "sync lines"
            assert target.get_attribute("data-state") == "running"
            run = page.locator(".tc-row", has=page.locator('.tc-name:text-matches("^process ")'))
            assert run.get_attribute("aria-expanded") == "true"
            # the steps already done are listed under the run
            assert page.locator(".tc-row[data-depth='2']").count() >= 1
            page.screenshot(path=str(ARTIFACTS / "viewer-running-steps.png"), full_page=True)
            assert errors == []
            page.context.close()
    finally:
        release.touch()
    cluster.wait_for(
        lambda: TaskSpan.objects.filter(
            root_task_key=key, kind="CONSUMER", end_ns__isnull=False
        ).exists(),
        what="the job's end",
    )


def check_pages(browser, live_server, cookies, ok_key, failed_key, slow_key, release):
    page, errors = signed_in_page(browser, cookies)

    # a running job: shown where it is now, and the page refreshes itself until it ends
    page.goto(f"{live_server.url}/taskctx/job/{slow_key}/")
    page.wait_for_selector('#taskctx-job[data-ready="1"]')
    assert page.locator("#tc-status").inner_text() == "running"
    assert page.locator("#tc-live").is_visible()
    target = page.locator(".tc-row.tc-target")
    assert target.locator(".tc-name").inner_text() == "slow step"
    assert target.get_attribute("data-state") == "running"
    page.screenshot(path=str(ARTIFACTS / "viewer-running.png"), full_page=True)
    release.touch()  # the job ends now; the page sees it without a reload
    page.wait_for_function(
        "document.getElementById('tc-status').textContent === 'ok'", timeout=30_000
    )
    assert not page.locator("#tc-live").is_visible()
    step = page.locator(".tc-row", has=page.locator('.tc-name:text-is("slow step")'))
    assert step.get_attribute("data-state") == "ok"

    # the list shows the jobs with their status; the link leads to the job page
    page.goto(f"{live_server.url}/taskctx/")
    rows = page.locator("tr.tc-tree-row")
    assert rows.count() == 3
    assert page.locator(f'tr[data-status="error"] a:text("{failed_key}")').count() == 1
    page.screenshot(path=str(ARTIFACTS / "viewer-list.png"), full_page=True)
    page.click(f'a:text("{ok_key}")')
    page.wait_for_selector('#taskctx-job[data-ready="1"]')
    assert page.url.endswith(f"/taskctx/job/{ok_key}/")

    # opened one level: the enqueue span and, under it, the worker run (collapsed)
    send = page.locator(".tc-row", has=page.locator(f'.tc-name:text-is("send {APPROVE}")'))
    run = page.locator(".tc-row", has=page.locator(f'.tc-name:text-is("process {APPROVE}")'))
    assert send.get_attribute("data-depth") == "0" and run.get_attribute("data-depth") == "1"
    assert run.get_attribute("aria-expanded") == "false"
    assert page.locator(".tc-row").count() == 2

    # expanding the worker run shows the nested steps under it, one level deeper
    run.locator(".tc-toggle").click()
    assert run.get_attribute("aria-expanded") == "true"
    steps = page.locator(".tc-row", has=page.locator(f'.tc-name:text-is("{NESTED}")'))
    assert steps.count() == 3
    for i in range(3):
        assert steps.nth(i).get_attribute("data-depth") == "2"
        assert "3" not in (steps.nth(i).get_attribute("data-state") or "")
    # document order: the steps come right after their parent row
    order = page.locator(".tc-row").evaluate_all("rows => rows.map(r => r.dataset.depth)")
    assert order == ["0", "1", "2", "2", "2"]

    # the waterfall: bars on a shared axis, each step inside the run, steps one after another
    run_box = bar_box(run)
    step_boxes = [bar_box(steps.nth(i)) for i in range(3)]
    for box in step_boxes:
        assert box["x"] >= run_box["x"] - 1
        assert box["x"] + box["width"] <= run_box["x"] + run_box["width"] + 1
    assert step_boxes[0]["x"] < step_boxes[1]["x"] < step_boxes[2]["x"]
    assert page.locator(".tc-bar.tc-critical").count() >= 2
    assert page.locator("#tc-axis span").count() == 5

    # a step's details: the descendants it locked
    steps.nth(0).locator(".tc-name").click()
    details = page.locator(".tc-details")
    assert "Descendants locked" in details.inner_text()
    assert "4 × testapp.invoiceline" in details.inner_text()

    # collapsing hides the steps again
    run.locator(".tc-toggle").click()
    assert page.locator(".tc-row").count() == 2
    run.locator(".tc-toggle").click()
    steps.nth(0).locator(".tc-name").click()  # close the details for the picture
    steps.nth(1).locator(".tc-name").click()
    page.screenshot(path=str(ARTIFACTS / "viewer-job.png"), full_page=True)
    docs_copy = REPO / "docs" / "img" / "viewer.png"
    if not docs_copy.exists() or os.environ.get("TASKCTX_DOCS_SCREENSHOTS") == "1":
        docs_copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ARTIFACTS / "viewer-job.png", docs_copy)

    # a failed job opens at the failure, with its error
    page.goto(f"{live_server.url}/taskctx/job/{failed_key}/")
    page.wait_for_selector('#taskctx-job[data-ready="1"]')
    target = page.locator(".tc-row.tc-target")
    assert target.count() == 1
    assert target.locator(".tc-name").inner_text() == NESTED
    assert target.get_attribute("data-state") == "error"
    assert "ValueError" in target.inner_text()
    error_box = page.locator(".tc-details .tc-errorbox")
    assert "refused" in error_box.first.inner_text()
    assert page.locator("#tc-status").inner_text() == "error"
    page.screenshot(path=str(ARTIFACTS / "viewer-failed.png"), full_page=True)

    # the JSON endpoint answers the same tree for the logged-in browser
    response = page.request.get(f"{live_server.url}/taskctx/api/job/{ok_key}")
    assert response.ok and response.json()["nested_steps"] == 3
    assert errors == []
    page.context.close()


def test_fanned_out_children_in_the_browser(cluster_factory, cache, live_server, tmp_path):
    """A job whose children fanned out: each child's run names its worker and is marked
    fan-out, the siblings' bars overlap, the child that ended last is on the critical path."""
    from otel_taskctx.spans import flush_span_store
    from tests.test_fan_out import PARENT, wait_for_completion
    from tests.testapp.fan_out import MARKED_CHILD

    cluster = cluster_factory(
        q_cluster={"workers": 3}, env={"DJANGO_SETTINGS_MODULE": SETTINGS_MODULE}
    )
    manager = AsyncManager()
    key = manager.launch_async_task(PARENT, "v", [[1], [2]], str(tmp_path), 0.6, child=MARKED_CHILD)
    wait_for_completion(manager, key)
    flush_span_store()
    cluster.wait_for(
        lambda: (
            TaskSpan.objects.filter(
                root_task_key=key, kind="CONSUMER", name=f"process {MARKED_CHILD}"
            ).count()
            == 2
        ),
        what="the children's runs",
    )
    cookies = session_cookie(live_server)
    with chromium() as browser:
        page, errors = signed_in_page(browser, cookies)
        page.goto(f"{live_server.url}/taskctx/job/{key}/")
        page.wait_for_selector('#taskctx-job[data-ready="1"]')
        for _ in range(6):  # open every row
            closed = page.locator('.tc-row[aria-expanded="false"] .tc-toggle')
            if not closed.count():
                break
            closed.first.click()
        name = f'.tc-name:text-is("process {MARKED_CHILD}")'
        runs = [page.locator(".tc-row", has=page.locator(name)).nth(i) for i in range(2)]
        assert page.locator(".tc-row", has=page.locator(name)).count() == 2
        for run in runs:
            worker = run.locator(".tc-worker").inner_text()
            assert worker.startswith("worker ") and worker.split()[1].isdigit()
            assert run.locator(".tc-fan").inner_text() == "fan-out"
        first, last = sorted(runs, key=lambda r: bar_box(r)["x"] + bar_box(r)["width"])
        first_box, last_box = bar_box(first), bar_box(last)
        # in parallel: each starts before the other ends
        assert last_box["x"] < first_box["x"] + first_box["width"]
        assert first_box["x"] < last_box["x"] + last_box["width"]
        # one child is on the critical path: the one that ended last
        critical = [r for r in runs if r.locator(".tc-bar.tc-critical").count() == 1]
        assert len(critical) == 1
        box = bar_box(critical[0])
        assert box["x"] + box["width"] >= last_box["x"] + last_box["width"] - 1
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "viewer-fan-out.png"), full_page=True)
        assert errors == []


def test_celery_worker_badges_in_the_browser(live_server):
    """A Celery job's runs show Celery's name of their worker in the badge (its pool process
    in the tooltip and the details); the nested task run inline has no badge."""
    from tests.test_viewer import celery_job

    celery_job()
    cookies = session_cookie(live_server)
    with chromium() as browser:
        page, errors = signed_in_page(browser, cookies)
        page.goto(f"{live_server.url}/taskctx/job/celery-0f1e/")
        page.wait_for_selector('#taskctx-job[data-ready="1"]')
        for _ in range(6):  # open every row
            closed = page.locator('.tc-row[aria-expanded="false"] .tc-toggle')
            if not closed.count():
                break
            closed.first.click()
        badges = page.locator(".tc-worker")
        assert badges.all_inner_texts() == ["worker demo@box"] * 3
        titles = sorted(badges.nth(i).get_attribute("title") for i in range(3))
        assert titles == [
            f"ran on Celery worker demo@box, process box:{pid}" for pid in (11, 12, 13)
        ]
        runs = page.locator(
            ".tc-row", has=page.locator('.tc-name:text-is("run/sample.publish_book")')
        )
        assert runs.count() == 3 and runs.locator(".tc-worker").count() == 2  # not the inline one
        page.locator('.tc-name:text-is("run/sample.publish_books")').click()
        details = page.locator(".tc-details").inner_text()
        assert "Celery worker" in details and "demo@box" in details and "box:11" in details
        assert errors == []
