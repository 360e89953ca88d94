"""The span store: rows, the store's processors and exporter, running spans, failure
handling, the host's database settings left alone, concurrent writers, retention and
``taskctx_tree``."""

from __future__ import annotations

import io
import json
import logging
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType

import pytest
from django.core.management import call_command
from django.db import connection
from django.utils import timezone
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import SpanKind, Status, StatusCode

from otel_taskctx import semconv, task_context
from otel_taskctx.models import TaskSpan
from otel_taskctx.spans import store as store_module
from otel_taskctx.spans.rows import bound_attributes, span_row
from otel_taskctx.spans.store import (
    RUNNING,
    STORE,
    DatabaseSpanExporter,
    RunningSpanProcessor,
    StoreSpanProcessor,
    span_target,
)
from otel_taskctx.tracer_provider import added_processors, sdk_tracer_provider

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def store():
    """A private provider with the store's processors (short schedules)."""
    batch = StoreSpanProcessor(schedule_delay_millis=50)
    running = RunningSpanProcessor(running_delay=0.05, schedule_delay_millis=50)
    provider = TracerProvider()
    provider.add_span_processor(batch)
    provider.add_span_processor(running)

    class Store:
        pass

    s = Store()
    s.exporter, s.batch, s.running, s.provider = DatabaseSpanExporter(), batch, running, provider
    s.tracer = provider.get_tracer("tests")

    def flush():
        assert batch.force_flush()
        assert running.force_flush()

    def write(rows, finished=True):
        exporter = DatabaseSpanExporter()
        exporter.running = not finished
        return exporter.write(rows, span_target()[0])

    s.flush, s.write = flush, write
    yield s
    provider.shutdown()


def lineage(task="T1", root="T1", depth=0, parent=None):
    attrs = {semconv.TASK_KEY: task, semconv.ROOT_TASK_KEY: root, semconv.DEPTH: depth}
    if parent:
        attrs[semconv.PARENT_TASK_KEY] = parent
    return attrs


# --------------------------------------------------------------------------- rows


def test_row_bounds_huge_attributes_and_event_floods():
    provider = TracerProvider()
    tracer = provider.get_tracer("t")
    span = tracer.start_span(
        "s",
        attributes={
            "big": "x" * 100_000,
            "ids": [str(i) for i in range(10_000)],
            "n": 3,
            "f": float("nan"),
            "ok": True,
            "k" * 1000: "long key",
        },
    )
    for i in range(128):
        span.add_event("e", {"payload": "y" * 5000, "i": i})
    span.end()
    row = span_row(span, max_len=100)
    assert len(row["attributes"]["big"]) == 100 and row["attributes"]["big"].endswith("…")
    ids = row["attributes"]["ids"]
    assert sum(len(i) for i in ids) < 200 and ids[-1].startswith("… ") and "more" in ids[-1]
    assert row["attributes"]["n"] == 3 and row["attributes"]["f"] == "nan"
    assert row["attributes"]["k" * 254 + "…"] == "long key"  # keys: 255 characters at most
    assert len(json.dumps(row["attributes"])) + len(json.dumps(row["events"])) < 100 * 64 * 1.2
    assert row["attributes"]["taskctx.store.dropped_events"] > 0
    assert all(len(e["attributes"]["payload"]) <= 100 for e in row["events"])


def test_row_columns_from_lineage_descendants_and_user():
    provider = TracerProvider()
    span = provider.get_tracer("t").start_span(
        "process job",
        kind=SpanKind.CONSUMER,
        attributes={
            **lineage("child", "root", 1, "root"),
            "enduser.id": 42,
            semconv.MANAGER_CLASS_PATH: "app.Manager",
        },
    )
    span.add_event(
        semconv.DESCENDANTS_EVENT,
        {
            semconv.DESCENDANTS_MODEL: "testapp.child",
            semconv.DESCENDANTS_IDS: ["1", "2", "3"],
            semconv.DESCENDANTS_COUNT: 3,
            semconv.FORWARDED: True,
        },
    )
    span.set_status(Status(StatusCode.ERROR, "ValueError: no"))
    span.end()
    row = span_row(span, 4096)
    assert (row["task_key"], row["root_task_key"], row["kind"]) == ("child", "root", "CONSUMER")
    assert row["user_id"] == "42" and row["manager"] == "app.Manager"
    assert row["descendants_count"] == 3
    assert row["status"] == "error" and row["status_message"] == "ValueError: no"
    assert semconv.FORWARDED not in row["events"][0]["attributes"]
    assert row["process"].endswith(f":{os.getpid()}")
    running = span_row(span, 4096, running=True)
    assert running["end_ns"] is None and running["status"] == "unset"


# --------------------------------------------------------------------------- exporter


@pytest.mark.stack
@pytest.mark.django_db(transaction=True)
def test_exporter_stores_a_nested_tree_behind_the_batch_processor(store):
    tracer = store.tracer
    with tracer.start_as_current_span(
        "send job", kind=SpanKind.PRODUCER, attributes=lineage()
    ) as send:
        pass
    ctx = trace.set_span_in_context(send)
    with tracer.start_as_current_span(
        "process job", context=ctx, kind=SpanKind.CONSUMER, attributes=lineage()
    ) as run:
        with tracer.start_as_current_span("Parent.save", attributes=lineage()) as save:
            save.add_event(semconv.PROGRESS_EVENT, {semconv.PROGRESS_MESSAGE: "1/2"})
            with tracer.start_as_current_span("recompute", attributes=lineage()):
                pass
    store.flush()
    rows = {r.name: r for r in TaskSpan.objects.filter(root_task_key="T1")}
    assert set(rows) == {"send job", "process job", "Parent.save", "recompute"}
    assert rows["process job"].parent_span_id == rows["send job"].span_id
    assert rows["Parent.save"].parent_span_id == rows["process job"].span_id
    assert rows["recompute"].parent_span_id == rows["Parent.save"].span_id
    assert rows["process job"].trace_id == rows["send job"].trace_id
    assert rows["process job"].kind == "CONSUMER"
    assert rows["Parent.save"].events[0]["attributes"] == {semconv.PROGRESS_MESSAGE: "1/2"}
    assert rows["recompute"].end_ns >= rows["recompute"].start_ns
    assert run.end_time is not None


@pytest.mark.stack
@pytest.mark.django_db(transaction=True)
def test_running_span_is_recorded_when_it_starts_and_completed_when_it_ends(store):
    span = store.tracer.start_span(
        "long job", kind=SpanKind.CONSUMER, attributes=lineage("R1", "R1")
    )
    short = store.tracer.start_span("short", attributes=lineage("R1", "R1"))
    short.end()  # ends before the running delay: gets no running row
    time.sleep(0.2)
    assert store.running.force_flush()
    row = TaskSpan.objects.get(name="long job")
    assert row.end_ns is None and row.running and row.status == "unset"
    assert not TaskSpan.objects.filter(name="short", end_ns=None).exists()
    span.set_status(Status(StatusCode.OK))
    span.end()
    store.flush()
    row.refresh_from_db()
    assert row.end_ns is not None and row.status == "ok"
    assert TaskSpan.objects.filter(name="short").count() == 1


@pytest.mark.stack
@pytest.mark.django_db(transaction=True)
def test_a_late_running_row_never_overwrites_the_finished_one(store):
    span = store.tracer.start_span("job", attributes=lineage("L1", "L1"))
    span.end()
    finished = span_row(span, 4096)
    running = span_row(span, 4096, running=True)
    assert store.write([finished])
    assert store.write([running], finished=False)
    row = TaskSpan.objects.get(span_id=finished["span_id"])
    assert row.end_ns == finished["end_ns"]


@pytest.mark.stack
@pytest.mark.django_db(transaction=True)
def test_a_span_written_twice_keeps_one_row_with_the_later_values(store):
    # (PostgreSQL: the second batch's COPY hits the unique constraint and falls back to the
    # upsert, which also writes the other, new span of that batch)
    span = store.tracer.start_span("job", attributes=lineage("D1", "D1"))
    span.end()
    first = span_row(span, 4096)
    assert store.write([first])
    other = store.tracer.start_span("other", attributes=lineage("D1", "D1"))
    other.end()
    again = dict(first, status="error", status_message="written again")
    assert store.write([again, span_row(other, 4096)])
    rows = {r.name: r for r in TaskSpan.objects.filter(root_task_key="D1")}
    assert set(rows) == {"job", "other"}
    assert (rows["job"].status, rows["job"].status_message) == ("error", "written again")
    assert TaskSpan.objects.filter(span_id=first["span_id"]).count() == 1


@pytest.mark.stack
@pytest.mark.django_db(transaction=True)
def test_text_with_nul_characters_is_stored_not_dropped(store):
    with store.tracer.start_as_current_span(
        "nul\x00name", attributes={**lineage("N1", "N1"), "note": "a\x00b", "k\x00": ["x\x00"]}
    ) as span:
        span.add_event("e\x00", {"v": "\x00"})
        span.set_status(Status(StatusCode.ERROR, "bad\x00status"))
    store.flush()
    row = TaskSpan.objects.get(root_task_key="N1")
    assert row.name == "nul\ufffdname" and row.status_message == "bad\ufffdstatus"
    assert row.attributes["note"] == "a\ufffdb" and row.attributes["k\ufffd"] == ["x\ufffd"]
    assert row.events[0]["name"] == "e\ufffd" and row.events[0]["attributes"] == {"v": "\ufffd"}


@pytest.mark.stack
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("finished", [True, False], ids=["finished", "running"])
def test_every_column_a_write_sets_reads_back_through_the_orm(store, finished):
    """The store's upserts keep each value as the ORM reads it: JSON, datetimes, NULLs, the
    hour."""
    parent = store.tracer.start_span("parent", attributes=lineage("C1", "C1"))
    with trace.use_span(parent):
        span = store.tracer.start_span(
            "child",
            kind=SpanKind.PRODUCER,
            attributes={
                **lineage("C2", "C1", 1, "C1"),
                "enduser.id": 42,
                "taskctx.user": "ann",
                "ratio": 0.5,
                "ids": [1, 2, 3],
                semconv.MANAGER_CLASS_PATH: "app.Manager",
            },
            links=[trace.Link(parent.get_span_context(), {"why": "because"})],
        )
    span.add_event(semconv.DESCENDANTS_EVENT, {semconv.DESCENDANTS_IDS: [7, 8]})
    span.set_status(Status(StatusCode.ERROR, "it broke"))
    if finished:
        span.end()
    plain = store.tracer.start_span("plain")  # no events, links nor lineage
    if finished:
        plain.end()
    rows = [span_row(s, 4096, running=not finished) for s in (span, plain)]
    assert store.write(rows, finished=finished)
    for row in rows:
        stored = TaskSpan.objects.get(span_id=row["span_id"])
        for name, value in row.items():
            assert getattr(stored, name) == value, name
        assert stored.start_hour == row["start_ns"] // (3600 * 10**9)
    stored = TaskSpan.objects.get(span_id=rows[1]["span_id"])  # the plain span
    assert (stored.events, stored.links, stored.task_key) == ([], [], None)
    stored = TaskSpan.objects.get(span_id=rows[0]["span_id"])
    assert stored.events[0]["attributes"] == {semconv.DESCENDANTS_IDS: [7, 8]}
    assert stored.links[0]["attributes"] == {"why": "because"}
    assert (stored.user_id, stored.user_label, stored.descendants_count) == ("42", "ann", 2)
    if not finished:
        span.end()
        plain.end()
    parent.end()


def test_rows_copy_the_attributes_of_running_and_finished_spans():
    span = TracerProvider().get_tracer("t").start_span("s", attributes={"a": 1, "b": "x"})
    running = span_row(span, 256, running=True)
    span.set_attribute("c", (1, 2))
    span.end()
    finished = span_row(span, 256)
    # plain dicts (JSON-safe copies), not the SDK's read-only mapping
    assert type(running["attributes"]) is dict and type(finished["attributes"]) is dict
    assert running["attributes"] == {"a": 1, "b": "x"}
    assert finished["attributes"] == {"a": 1, "b": "x", "c": [1, 2]}
    # any other read-only mapping is copied the same way
    assert bound_attributes(MappingProxyType({"c": 2}), 256) == {"c": 2}
    assert bound_attributes(None, 256) == {}


def _other_sessions() -> set[int]:
    """Backend pids of the other sessions on the test database (PostgreSQL)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        )
        return {pid for (pid,) in cursor.fetchall()}


def _back_to(before: set[int], timeout: float) -> bool:
    """Wait until no session is open beyond ``before``; True if that happened in time."""
    deadline = time.monotonic() + timeout
    while _other_sessions() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _other_sessions() - before


@pytest.mark.stack
@pytest.mark.skipif(os.environ.get("TASKCTX_STACK") != "redis-postgres", reason="PostgreSQL")
@pytest.mark.django_db(transaction=True)
def test_the_store_leaves_no_session_open_once_a_batch_is_written(store):
    # (PostgreSQL's DROP DATABASE of a test database waits for every session on it)
    before = _other_sessions()
    for n in range(3):
        with store.tracer.start_as_current_span(f"batch {n}", attributes=lineage("C1", "C1")):
            pass
        deadline = time.monotonic() + 10
        while TaskSpan.objects.filter(root_task_key="C1").count() <= n:
            assert time.monotonic() < deadline, "the batch was not written"
            time.sleep(0.05)
        assert _back_to(before, timeout=5)  # the batch processor's thread closed its own
    assert TaskSpan.objects.filter(root_task_key="C1").count() == 3


@pytest.mark.django_db(transaction=True)
def test_a_failing_store_never_raises_into_the_job(store, monkeypatch, caplog):
    def broken(*args, **kwargs):
        from django.db import DatabaseError

        raise DatabaseError("disk I/O error")

    monkeypatch.setattr(DatabaseSpanExporter, "_upsert", broken)
    monkeypatch.setattr(store_module, "WARN_INTERVAL", 0.0)
    with caplog.at_level(logging.WARNING, logger="otel_taskctx.spans"):
        with store.tracer.start_as_current_span("job", attributes=lineage("F1", "F1")):
            pass  # the job itself
        assert store.batch.force_flush()
        span = store.tracer.start_span("direct")
        span.end()
        assert store.exporter.export([span]) is SpanExportResult.FAILURE
    assert store.batch.batch().span_exporter.dropped >= 1 and store.exporter.dropped == 1
    assert "could not store" in caplog.text and "disk I/O error" in caplog.text
    assert not TaskSpan.objects.exists()


@pytest.mark.skipif(os.environ.get("TASKCTX_STACK", "embedded") != "embedded", reason="SQLite lock")
@pytest.mark.django_db(transaction=True)
def test_database_locked_is_retried_then_dropped_and_the_next_batch_is_written(store, monkeypatch):
    # the busy timeout is the project's (OPTIONS "timeout"): a short one for this test
    monkeypatch.setitem(connection.settings_dict["OPTIONS"], "timeout", 0.05)
    connection.close()  # reopened with it by the export (on this thread's connection)
    monkeypatch.setattr(store_module, "LOCK_RETRIES", 1)
    plain = TracerProvider().get_tracer("no store")  # spans handed to the exporter directly
    blocker = sqlite3.connect(connection.settings_dict["NAME"], timeout=5)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        span = plain.start_span("locked out", attributes=lineage("K1", "K1"))
        span.end()  # the job carries on at once
        started = time.monotonic()
        assert store.exporter.export([span]) is SpanExportResult.FAILURE
        # "database is locked" came out as Django's OperationalError and was retried: a
        # busy wait, 0.1 s, a second busy wait (a write giving up at once takes ~0.05 s)
        assert 0.15 <= time.monotonic() - started < 5
    finally:
        blocker.rollback()
        blocker.close()
    span = plain.start_span("after the lock", attributes=lineage("K1", "K1"))
    span.end()
    assert store.exporter.export([span]) is SpanExportResult.SUCCESS
    assert list(TaskSpan.objects.values_list("name", flat=True)) == ["after the lock"]


def _journal_mode(path: str) -> str:
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        db.close()


@pytest.mark.skipif(os.environ.get("TASKCTX_STACK", "embedded") != "embedded", reason="SQLite")
@pytest.mark.django_db(transaction=True)
def test_the_store_leaves_the_sqlite_journal_mode_as_the_project_set_it(store):
    path = str(connection.settings_dict["NAME"])
    assert "init_command" not in connection.settings_dict["OPTIONS"]  # the SQLite default
    before = _journal_mode(path)
    assert before == "delete"
    for label in ("first", "second"):
        with store.tracer.start_as_current_span(label, attributes=lineage("W1", "W1")):
            pass
        store.flush()
    assert TaskSpan.objects.filter(root_task_key="W1").count() == 2
    assert _journal_mode(path) == before  # persistent: any connection would see a switch
    assert not Path(path + "-wal").exists()


@pytest.mark.django_db(transaction=True)
def test_flush_inside_a_transaction_does_not_wait_for_the_callers_own_lock(store):
    from django.db import transaction

    from tests.testapp.models import Parent

    with transaction.atomic():
        Parent.objects.create(name="holds the write lock on SQLite")
        with store.tracer.start_as_current_span("job in atomic", attributes=lineage("A1", "A1")):
            pass
        started = time.monotonic()
        store.batch.force_flush()
        store.running.force_flush()
        assert time.monotonic() - started < 3
    deadline = time.monotonic() + 10  # written once the caller commits
    while not TaskSpan.objects.filter(name="job in atomic").exists():
        assert time.monotonic() < deadline, "the span was not written after the commit"
        time.sleep(0.05)


# --------------------------------------------------------------------------- installation


def test_ready_installs_the_store_next_to_user_processors():
    provider = sdk_tracer_provider(create=False)
    assert provider is not None
    marks = added_processors(provider)
    assert STORE in marks and RUNNING in marks
    assert isinstance(marks[STORE], StoreSpanProcessor)
    assert isinstance(marks[RUNNING], RunningSpanProcessor)
    from otel_taskctx.spans import install_span_store

    assert install_span_store()  # idempotent: the same processors, none added
    assert added_processors(provider) == marks


@pytest.mark.stack
@pytest.mark.django_db(transaction=True)
def test_global_store_and_taskctx_tree_command():
    tracer = trace.get_tracer("tests.store")
    with task_context("CMD-1"):
        with tracer.start_as_current_span(
            "process job", kind=SpanKind.CONSUMER, attributes=lineage("CMD-1", "CMD-1")
        ):
            with tracer.start_as_current_span(
                "Parent.save", attributes=lineage("CMD-1", "CMD-1")
            ) as s:
                s.add_event(semconv.PROGRESS_EVENT, {semconv.PROGRESS_MESSAGE: "half way"})
                with tracer.start_as_current_span(
                    "recompute", attributes=lineage("CMD-1", "CMD-1")
                ):
                    pass
    out = io.StringIO()
    call_command("taskctx_tree", "CMD-1", "--events", stdout=out)  # flushes this process first
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("job CMD-1: OK")
    assert lines[1].startswith("process job [consumer] ")
    assert lines[2].startswith("  Parent.save [internal] ")
    assert "> progress: half way" in lines[3]
    assert lines[4].startswith("    recompute [internal] ")
    out = io.StringIO()
    call_command("taskctx_tree", "CMD-1", "--json", stdout=out)
    data = json.loads(out.getvalue())
    assert [n["name"] for n in data["nodes"]] == ["process job", "Parent.save", "recompute"]
    with pytest.raises(Exception, match="no stored spans"):
        call_command("taskctx_tree", "nope", stdout=io.StringIO())


# --------------------------------------------------------------------------- retention


@pytest.mark.stack
@pytest.mark.django_db(transaction=True)
def test_prune_deletes_spans_older_than_the_retention(settings):
    settings.OTEL_TASKCTX = {"SPAN_RETENTION_DAYS": 2}
    now = timezone.now()
    for i, age in enumerate([0, 1, 3, 10]):
        TaskSpan.objects.create(
            trace_id=f"{i:032x}",
            span_id=f"{i:016x}",
            name=f"age{age}",
            start_ns=0,
            started_at=now - timedelta(days=age, minutes=1),
        )
    out = io.StringIO()
    call_command("taskctx_prune", "--dry-run", stdout=out)
    assert "2 span(s) would be deleted" in out.getvalue()
    call_command("taskctx_prune", stdout=io.StringIO())
    assert sorted(TaskSpan.objects.values_list("name", flat=True)) == ["age0", "age1"]
    call_command("taskctx_prune", "--days", "0.5", stdout=io.StringIO())
    assert list(TaskSpan.objects.values_list("name", flat=True)) == ["age0"]


@pytest.mark.django_db(transaction=True)
def test_prune_schedule_is_a_django_q2_schedule():
    from django_q.models import Schedule

    call_command("taskctx_prune", "--schedule", stdout=io.StringIO())
    call_command("taskctx_prune", "--schedule", "--every-hours", "6", stdout=io.StringIO())
    schedule = Schedule.objects.get(name="otel_taskctx: prune stored spans")
    assert schedule.func == "otel_taskctx.spans.retention.prune_spans"
    assert schedule.minutes == 360 and schedule.repeats == -1
    call_command("taskctx_prune", "--unschedule", stdout=io.StringIO())
    assert not Schedule.objects.exists()


# --------------------------------------------------------------------------- concurrency

WRITER_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import django
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    trace.set_tracer_provider(TracerProvider())  # the process's own (otel_taskctx sets none)
    django.setup()
    from otel_taskctx.spans import flush_span_store
    from tests.testapp.models import Parent

    n, tag = int(sys.argv[1]), sys.argv[2]
    tracer = trace.get_tracer("writer")
    errors = 0
    for i in range(n):
        attrs = {"taskctx.task_key": tag, "taskctx.root_task_key": tag}
        with tracer.start_as_current_span(f"job {i}", attributes=attrs):
            try:  # the job's own write, racing the span writers of every process
                Parent.objects.create(name=f"{tag}-{i}")
            except Exception as exc:
                errors += 1
                print("JOB ERROR", type(exc).__name__, exc, flush=True)
        if i % 10 == 9:
            flush_span_store(running=False)
    flush_span_store()
    print("DONE", errors, flush=True)
    """
)


@pytest.mark.stack
@pytest.mark.django_db(transaction=True)
def test_several_processes_write_spans_while_jobs_write_without_database_locked():
    from tests.testapp.models import Parent

    procs, count, nproc = [], 60, 3
    env = {
        **os.environ,
        "TASKCTX_DB_NAME": connection.settings_dict["NAME"],
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "PYTHONPATH": str(REPO),
    }
    for p in range(nproc):
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WRITER_SCRIPT, str(count), f"P{p}"],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    for out, proc in zip(outputs, procs, strict=True):
        assert proc.returncode == 0, out
        assert "DONE 0" in out, out
        assert "database is locked" not in out, out
    assert Parent.objects.count() == count * nproc
    for p in range(nproc):
        assert TaskSpan.objects.filter(root_task_key=f"P{p}").count() == count


OWN_FILE_SCRIPT = textwrap.dedent(
    """
    import django, sys
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    trace.set_tracer_provider(TracerProvider())  # the process's own (otel_taskctx sets none)
    django.setup()
    from django.core.management import call_command
    from django.conf import settings
    from otel_taskctx import task_context
    from otel_taskctx.spans import flush_span_store

    call_command("migrate", verbosity=0)
    call_command("migrate", database="spans", verbosity=0)
    tracer = trace.get_tracer("own-file")
    with task_context("S1"):
        for n in range(5):
            with tracer.start_as_current_span(f"step {n}"):
                pass
    assert flush_span_store(10)
    from otel_taskctx.models import TaskSpan
    print("VIEWER", TaskSpan.objects.filter(root_task_key="S1").count())
    """
)


@pytest.mark.skipif(os.environ.get("TASKCTX_STACK", "embedded") != "embedded", reason="SQLite")
def test_span_database_puts_the_span_table_in_its_own_sqlite_file(tmp_path):
    jobs, spans = tmp_path / "jobs.sqlite3", tmp_path / "spans.sqlite3"
    env = {
        **os.environ,
        "TASKCTX_DB_NAME": str(jobs),
        "TASKCTX_SPAN_DB": str(spans),
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "PYTHONPATH": str(REPO),
    }
    out = subprocess.run(
        [sys.executable, "-c", OWN_FILE_SCRIPT],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "VIEWER 5" in out.stdout  # the ORM (the viewer's queries) reads the spans there
    with sqlite3.connect(spans) as db:
        assert db.execute(
            "SELECT count(*) FROM otel_taskctx_span WHERE root_task_key = 'S1'"
        ).fetchone() == (5,)
    with sqlite3.connect(jobs) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "django_q_ormq" in tables and "otel_taskctx_span" not in tables


@pytest.mark.django_db(transaction=True)
def test_spans_land_in_the_store_by_themselves():
    # the SDK's batch processor writes on its schedule: nobody has to flush for the viewer
    provider = TracerProvider()
    provider.add_span_processor(StoreSpanProcessor())
    with provider.get_tracer("t").start_as_current_span("job", attributes=lineage("S1", "S1")):
        pass
    ended = time.monotonic()
    while not TaskSpan.objects.filter(root_task_key="S1").exists():
        assert time.monotonic() - ended < 30, "the span did not land by itself"
        time.sleep(0.05)
    provider.shutdown()
