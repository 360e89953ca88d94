"""The span table's hour-led keys: lookups across hours, index use, and where new rows land.

The unique key ``(start_hour, trace_id, span_id)`` and the job-tree index
``(start_hour, root_task_key, start_ns)`` lead with the hour a span started in, so that new
rows go into the indexes' newest part; lookups name the stored hours (see
:func:`otel_taskctx.spans.queries.stored_hours`).
"""

from __future__ import annotations

import os
import random
import sqlite3
import time

import pytest
from django.db import connection, connections, router

from otel_taskctx.models import HOUR_NS, TaskSpan, hour_of
from otel_taskctx.spans import queries
from otel_taskctx.spans.rows import ns_to_datetime

pytestmark = pytest.mark.stack

#: the start of an hour, three days ago
H0 = (time.time_ns() // HOUR_NS - 72) * HOUR_NS
MS = 1_000_000
_ids = iter(range(1, 10**6))


def add(trace, at, root=None, parent=None, name="step", kind="INTERNAL"):
    return TaskSpan.objects.create(
        trace_id=trace,
        span_id=f"{next(_ids):016x}",
        parent_span_id=parent.span_id if parent is not None else "",
        name=name,
        kind=kind,
        start_ns=at,
        end_ns=at + MS,
        started_at=ns_to_datetime(at),
        status="ok",
        task_key=root,
        root_task_key=root,
    )


def tree_across_hours(root="JOB", trace="a" * 32):
    """A request, then a job whose spans start in four different hours (two at the very
    edges of an hour), and a detached descendant of the job a day later."""
    request = add(trace, H0 - 3 * HOUR_NS + 5 * MS, name="POST /bulk/", kind="SERVER")
    send = add(trace, H0 - 1, root, request, "send job", "PRODUCER")  # last ns of an hour
    run = add(trace, H0, root, send, "process job", "CONSUMER")  # first ns of the next
    save = add(trace, H0 + HOUR_NS - 1, root, run, "Invoice.save")
    step = add(trace, H0 + 5 * HOUR_NS, root, save, "update_invoice_lines")
    detached = add(trace, H0 + 24 * HOUR_NS, "OTHER", step, "process child", "CONSUMER")
    return request, [send, run, save, step], detached


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("seek_hours", [queries.MAX_SEEK_HOURS, 1], ids=["seek", "range"])
def test_a_job_tree_and_its_trace_are_found_across_hours(monkeypatch, seek_hours):
    monkeypatch.setattr(queries, "MAX_SEEK_HOURS", seek_hours)  # 1: the range fallback
    request, job, detached = tree_across_hours()
    # other trees and traces in the same hours, one with the same root key's prefix
    for n, at in enumerate([H0 - 1, H0, H0 + 5 * HOUR_NS, H0 - 3 * HOUR_NS]):
        add(f"{n:032x}", at, root=f"JOB-{n}")
    add("b" * 32, H0 + 2 * HOUR_NS, root="JOBX")

    assert {s.start_ns // HOUR_NS for s in job} == {
        H0 // HOUR_NS - 1,
        H0 // HOUR_NS,
        H0 // HOUR_NS + 5,
    }
    assert queries.resolve_root_key("JOB") == "JOB"
    assert queries.resolve_root_key("OTHER") == "OTHER"
    tree = queries.load_tree("JOB")
    names = sorted(n.name for n in tree.nodes)
    assert names == sorted(s.name for s in [request, *job, detached])
    assert queries.launching_request("JOB") == "POST /bulk/"
    assert set(queries.of_tree("JOB").values_list("span_id", flat=True)) == {s.span_id for s in job}


@pytest.mark.django_db(transaction=True)
def test_a_running_row_completed_by_the_store_stays_one_row_with_its_hour():
    from otel_taskctx.spans import DatabaseSpanExporter

    running, finished = DatabaseSpanExporter(), DatabaseSpanExporter()
    running.running = True
    base = {
        "trace_id": "c" * 32,
        "span_id": "d" * 16,
        "parent_span_id": "",
        "name": "job",
        "kind": "CONSUMER",
        "started_at": ns_to_datetime(H0),
        "root_task_key": "J",
        "task_key": "J",
    }
    alias = router.db_for_write(TaskSpan)
    assert running.write([{**base, "start_ns": H0, "end_ns": None}], alias)
    assert finished.write([{**base, "start_ns": H0, "end_ns": H0 + MS, "status": "ok"}], alias)
    row = TaskSpan.objects.get()
    assert (row.end_ns, row.status, row.start_hour) == (H0 + MS, "ok", H0 // HOUR_NS)


def _plan(queryset) -> str:
    sql, params = queryset.query.sql_with_params()
    using = queryset.db
    with connections[using].cursor() as cursor:
        if connections[using].vendor == "sqlite":
            cursor.execute(f"EXPLAIN QUERY PLAN {sql}", params)
            return "\n".join(str(row[-1]) for row in cursor.fetchall())
        cursor.execute("SET LOCAL enable_seqscan = off")  # a tiny table: ask for the index
        cursor.execute(f"EXPLAIN {sql}", params)
        return "\n".join(row[0] for row in cursor.fetchall())


@pytest.mark.django_db(transaction=True)
def test_tree_and_trace_lookups_seek_the_hour_led_indexes():
    from django.db import transaction

    tree_across_hours()
    hours = queries.stored_hours()
    assert hours == range(H0 // HOUR_NS - 3, H0 // HOUR_NS + 25)
    with transaction.atomic(using=router.db_for_read(TaskSpan)):
        tree_plan = _plan(queries.of_tree("JOB", hours=hours))
        trace_plan = _plan(
            TaskSpan.objects.filter(queries.in_hours(hours), trace_id="a" * 32, span_id="0" * 16)
        )
    assert "otel_taskctx_span_hroot" in tree_plan, tree_plan
    assert "otel_taskctx_span_key" in trace_plan or "autoindex" in trace_plan, trace_plan
    if connection.vendor == "sqlite":
        assert "root_task_key=?" in tree_plan and "start_hour=?" in tree_plan, tree_plan
        assert "trace_id=?" in trace_plan and "span_id=?" in trace_plan, trace_plan


def _schema_sql() -> list[str]:
    """The span table and its indexes as the migrations made them in the test database."""
    with connections[router.db_for_write(TaskSpan)].cursor() as cursor:
        cursor.execute(
            "SELECT sql FROM sqlite_master WHERE tbl_name = 'otel_taskctx_span' "
            "AND sql IS NOT NULL ORDER BY type DESC"  # the table, then its indexes
        )
        return [row[0] for row in cursor.fetchall()]


@pytest.mark.skipif(os.environ.get("TASKCTX_STACK", "embedded") != "embedded", reason="SQLite")
@pytest.mark.django_db(transaction=True)
def test_new_spans_land_in_the_newest_hour_of_the_indexes(tmp_path):
    """1,000 new spans (500 jobs: an enqueue and a run each) in a table holding 30,000 spans of
    the past day dirty few index pages: they all sort into the current hour. (With keys led by
    the random ids, new rows landed on pages of their own in each index: 799 pages for these
    1,000 rows; ~104 now.)"""
    path = tmp_path / "spans.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    for sql in _schema_sql():
        db.execute(sql)
    columns = ["trace_id", "span_id", "parent_span_id", "name", "kind", "start_ns", "end_ns"]
    columns += ["started_at", "status", "status_message", "attributes", "events", "links"]
    columns += ["root_task_key", "user_label", "descendants_count", "manager", "service"]
    columns += ["process", "start_hour"]
    insert = f"INSERT INTO otel_taskctx_span ({', '.join(columns)}) VALUES "
    insert += f"({', '.join('?' * len(columns))})"
    rng = random.Random(7)

    def jobs(count, first_ns, step_ns):
        rows = []
        for n in range(count):
            trace, key = f"{rng.getrandbits(128):032x}", f"{rng.getrandbits(128):032x}"
            at = first_ns + n * step_ns
            for kind in ("PRODUCER", "CONSUMER"):
                rows.append(
                    (trace, f"{rng.getrandbits(64):016x}", "", "noop", kind, at, at + MS)
                    + ("2026-01-01 00:00:00", "ok", "", "{}", "[]", "[]", key, "", 0, "", "")
                    + ("", hour_of(at))
                )
        return rows

    now = time.time_ns()
    past = jobs(15_000, now - 24 * HOUR_NS, 24 * HOUR_NS // 15_000 - 1)
    for i in range(0, len(past), 2_000):
        db.execute("BEGIN")
        db.executemany(insert, past[i : i + 2_000])
        db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.execute("PRAGMA wal_autocheckpoint = 0")  # keep every frame this test writes
    new = jobs(500, now, MS)
    for i in range(0, len(new), 40):  # a writer's batches
        db.execute("BEGIN")
        db.executemany(insert, new[i : i + 40])
        db.execute("COMMIT")
    wal = (tmp_path / "spans.sqlite3-wal").read_bytes()
    pages = {int.from_bytes(wal[at : at + 4], "big") for at in range(32, len(wal), 24 + 4096)}
    db.close()
    # the table's own pages (appended) and the started_at index's take ~0.1 a row
    assert len(pages) < 0.35 * len(new), f"{len(pages)} pages dirtied by {len(new)} rows"


@pytest.mark.django_db(transaction=True)
def test_every_orm_write_sets_the_hour_from_the_start():
    at = H0 + 30 * 60 * 10**9  # half past
    first = add("e" * 32, at)  # create()
    TaskSpan.objects.bulk_create(
        [
            TaskSpan(
                trace_id="f" * 32,
                span_id="1" * 16,
                name="bulk",
                start_ns=at + HOUR_NS,
                started_at=ns_to_datetime(at + HOUR_NS),
            )
        ]
    )
    first.start_ns = at - HOUR_NS
    first.save()  # save() of a changed start
    assert dict(TaskSpan.objects.values_list("trace_id", "start_hour")) == {
        "e" * 32: hour_of(at) - 1,
        "f" * 32: hour_of(at) + 1,
    }


@pytest.mark.django_db(transaction=True)
def test_the_migration_gives_stored_spans_their_hour():
    from django.db.migrations.executor import MigrationExecutor

    connection = connections[router.db_for_write(TaskSpan)]
    before, after = (
        ("otel_taskctx", "0004_span_fewer_indexes"),
        ("otel_taskctx", "0005_span_hour_keys"),
    )
    MigrationExecutor(connection).migrate([before])
    at = H0 + 59 * 60 * 10**9
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO otel_taskctx_span (trace_id, span_id, parent_span_id, name, kind, "
                "start_ns, started_at, status, status_message, attributes, events, links, "
                "root_task_key, user_label, descendants_count, manager, service, process) "
                "VALUES (%s, %s, '', 'old', 'CONSUMER', %s, %s, 'ok', '', '{}', '[]', '[]', "
                "'OLD', '', 0, '', '', '')",
                ["9" * 32, "9" * 16, at, ns_to_datetime(at)],
            )
    finally:
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes("otel_taskctx") or [after])
    assert TaskSpan.objects.get().start_hour == hour_of(at)
    assert list(queries.of_tree("OLD").values_list("name", flat=True)) == ["old"]


@pytest.mark.skipif(os.environ.get("TASKCTX_STACK") != "redis-postgres", reason="PostgreSQL")
def test_system_checks_do_not_need_the_database_to_exist():
    """The demo creates its PostgreSQL database after Django's checks ran: they must not
    connect. (A ``GeneratedField`` for ``start_hour`` made them connect, and fail.)"""
    import subprocess
    import sys
    from pathlib import Path

    env = {
        **os.environ,
        "TASKCTX_DB_NAME": "taskctx_no_such_database",
        "DJANGO_SETTINGS_MODULE": "tests.settings",
    }
    out = subprocess.run(
        [sys.executable, "-m", "django", "check"],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "no issues" in out.stdout
