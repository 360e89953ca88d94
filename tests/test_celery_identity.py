"""A Celery job's identity counts only for the task it was issued for, on a real worker.

The ``otel_taskctx`` header is written by the publishing process (``before_task_publish``);
these tests rewrite it after that, as anyone who can publish to the broker could. A forged,
tampered, copied (issued for another task id), foreign (another deployment's key) or
malformed header runs the task as a plain task with a warning naming it: no lock is taken
and none is released. A message without the header is a plain task, without a warning.
"""

from __future__ import annotations

import pytest
from celery import signals

from otel_taskctx.identity import TaskIdentity, configure_signing, reset_signing, sign
from otel_taskctx.task_manager import TASK_MANAGER_PATH
from tests.test_celery import wait_seen, wait_until
from tests.testapp import celery_tasks as jobs
from tests.testapp.celery_tasks import holders

pytestmark = [pytest.mark.celery, pytest.mark.stack, pytest.mark.django_db(transaction=True)]
HEADER = "otel_taskctx"


class Rewrite:
    """A ``before_task_publish`` receiver run after otel_taskctx's: ``header(headers)`` gives
    the header to send instead (``...``: none at all)."""

    def __init__(self, header):
        self.header = header
        self.sent: dict = {}

    def __call__(self, sender=None, headers=None, **kwargs):
        self.sent = dict(headers[HEADER]) if HEADER in headers else {}
        new = self.header(headers)
        if new is ...:
            headers.pop(HEADER, None)
        else:
            headers[HEADER] = new

    def __enter__(self):
        signals.before_task_publish.connect(self, weak=False)
        return self

    def __exit__(self, *exc):
        signals.before_task_publish.disconnect(self)


def publish(header, *args, **kwargs):
    with Rewrite(header) as rewrite:
        result = jobs.hold.delay(*args, **kwargs)
    return result, rewrite.sent


def token(carrier: dict) -> str:
    return carrier["baggage"].split(",")[0].removeprefix("taskctx=")


def foreign(identity: TaskIdentity) -> str:
    try:
        configure_signing("another deployment's secret")
        return sign(identity)
    finally:
        reset_signing()


def test_bad_headers_run_the_task_as_a_plain_task_with_a_warning(celery_worker, tmp_path):
    worker = celery_worker()
    path = str(tmp_path)
    victim, victim_header = publish(lambda h: h[HEADER], "victim", [11], path, pause=True)
    wait_until(
        lambda: (tmp_path / "victim-pause.reached").exists(), "the victim's pause", worker=worker
    )
    key = f"celery-{victim.id}"
    assert holders([11]) == {"11": key}

    def tampered(h):
        carrier = dict(h[HEADER])
        carrier["baggage"] = carrier["baggage"][:-3] + (
            "AAA" if carrier["baggage"][-3:] != "AAA" else "BBB"
        )
        return carrier

    def foreign_key(h):
        identity = TaskIdentity(f"celery-{h['id']}", TASK_MANAGER_PATH, bound_to=h["id"])
        return {**h[HEADER], "baggage": f"taskctx={foreign(identity)}"}

    cases = {
        "copied": lambda h: victim_header,
        "forged": lambda h: {"baggage": "taskctx=v2.eyJrIjoiZm9yZ2VkIn0.forged"},
        "tampered": tampered,
        "foreign": foreign_key,
        "malformed": lambda h: "taskctx=v2.not-a-dict",
        "oversized": lambda h: {"baggage": "taskctx=v2." + "A" * 9000},
    }
    results = {
        label: publish(rewrite, label, [11, 12], path)[0] for label, rewrite in cases.items()
    }
    plain, _ = publish(lambda h: ..., "plain", [13], path)

    for label, result in results.items():
        got = wait_seen(worker, tmp_path, label)
        assert got["task_key"] is None and not got["registered"], label
        assert got["held"] == {"11": key}, label  # the victim's lock; none of its own
        assert f"Celery task {result.id} (tests.testapp.celery_tasks.hold)" in worker.log_text(), (
            label
        )
    log = worker.log_text()
    assert f"it was issued for {victim.id}" in log
    assert log.count("it does not verify (bad signature") >= 3  # forged, tampered, foreign
    assert "malformed otel_taskctx header (str)" in log
    assert "its identity is malformed or oversized" in log
    got = wait_seen(worker, tmp_path, "plain")
    assert got["task_key"] is None and not got["registered"]
    assert f"Celery task {plain.id}" not in log  # no header: plain, no warning
    assert holders([11, 12, 13]) == {"11": key}  # the victim's, untouched; nothing else

    (tmp_path / "victim-pause.go").write_text("")
    assert wait_seen(worker, tmp_path, "victim")["task_key"] == key
    wait_until(lambda: holders([11]) == {}, "the victim's release", worker=worker)
