"""A project's test run keeps its spans in its test database, and leaves its configured
database as it was: no span row, no journal switch.

Runs a real ``django-admin test`` of a tiny test module in a subprocess, against a configured
database (migrated, so a span written there would land): an SQLite file with a test database
in a file of its own, or (stack) a PostgreSQL database of its own. Its tests make spans (jobs enqueued, or run inline by django-q2) and end at once, so
spans are still queued when the test database is destroyed and when the process exits.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SETTINGS = textwrap.dedent(
    """
    from tests.settings import *  # noqa: F403

    DATABASES = {{"default": {database!r}}}
    OTEL_TASKCTX = {{}}
    """
)
PG = {
    "ENGINE": "django.db.backends.postgresql",
    "USER": os.environ.get("TASKCTX_PG_USER", "postgres"),
    "HOST": os.environ.get("TASKCTX_PG_HOST", "127.0.0.1"),
    "PORT": os.environ.get("TASKCTX_PG_PORT", "5432"),
}

TESTS = textwrap.dedent(
    """
    from django.test import TransactionTestCase
    from django_q.tasks import async_task

    from otel_taskctx.models import TaskSpan
    from otel_taskctx.spans import flush_span_store


    class JobsTest(TransactionTestCase):
        def test_spans_go_to_the_test_database(self):
            async_task("math.floor", 1.5, sync=True)
            self.assertTrue(flush_span_store(10))
            self.assertTrue(TaskSpan.objects.filter(name="process math.floor").exists())

        def test_spans_still_queued_when_the_run_ends(self):
            for n in range(3):  # enqueued only (no worker runs): spans nothing flushes
                async_task("math.floor", n + 0.5)
    """
)


def _sqlite(path: Path, sql: str) -> object:
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchone()[0]
    finally:
        db.close()


def _run_tests(tmp_path: Path, database: dict, label: str, count: int) -> None:
    """Migrate the configured database, then ``django-admin test label`` (must pass)."""
    (tmp_path / "host_settings.py").write_text(SETTINGS.format(database=database))
    (tmp_path / "host_tests.py").write_text(TESTS)
    env = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="host_settings",
        PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]),
    )
    env.pop("TASKCTX_DB_NAME", None)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "django", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )

    migrated = run("migrate", "--verbosity", "0")
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    out = run("test", label, "--verbosity", "2", "--noinput")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"Ran {count} test" in out.stderr and "OK" in out.stderr, out.stderr


LABELS = pytest.mark.parametrize(
    "label, count",
    [
        # nothing written during the run: the writer's first connection comes after the test
        # database has gone (the configured database's settings are back)
        ("host_tests.JobsTest.test_spans_still_queued_when_the_run_ends", 1),
        # the writer's connection was opened to the test database during the run
        ("host_tests", 2),
    ],
    ids=["queued-only", "written-then-queued"],
)


@pytest.mark.skipif(os.environ.get("TASKCTX_STACK", "embedded") != "embedded", reason="SQLite")
@LABELS
def test_a_test_run_leaves_the_configured_sqlite_file_alone(tmp_path, label, count):
    configured, test_db = tmp_path / "configured.sqlite3", tmp_path / "test_run.sqlite3"
    database = {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(configured),
        "TEST": {"NAME": str(test_db)},
    }
    sqlite3.connect(configured).close()
    journal = _sqlite(configured, "PRAGMA journal_mode")
    _run_tests(tmp_path, database, label, count)
    assert not test_db.exists()  # the test database is gone, with its spans
    assert _sqlite(configured, "SELECT count(*) FROM otel_taskctx_span") == 0
    assert _sqlite(configured, "PRAGMA journal_mode") == journal == "delete"
    assert not Path(f"{configured}-wal").exists()


@pytest.mark.stack
@pytest.mark.skipif(os.environ.get("TASKCTX_STACK") != "redis-postgres", reason="PostgreSQL")
@LABELS
def test_a_test_run_leaves_the_configured_postgres_database_alone(tmp_path, label, count):
    import psycopg

    name = f"taskctx_host_{os.environ.get('TASKCTX_INSTANCE', 'main')}"
    database = {**PG, "NAME": name, "TEST": {"NAME": f"test_{name}"}}
    server = psycopg.connect(
        host=PG["HOST"], port=PG["PORT"], user=PG["USER"], dbname="postgres", autocommit=True
    )
    try:
        for db in (name, f"test_{name}"):
            server.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        server.execute(f'CREATE DATABASE "{name}"')
        _run_tests(tmp_path, database, label, count)
        with psycopg.connect(
            host=PG["HOST"], port=PG["PORT"], user=PG["USER"], dbname=name
        ) as configured:
            rows = configured.execute("SELECT count(*) FROM otel_taskctx_span").fetchone()[0]
        assert rows == 0
        gone = server.execute(
            "SELECT count(*) FROM pg_database WHERE datname = %s", (f"test_{name}",)
        ).fetchone()[0]
        assert gone == 0  # the test database was dropped (our connection did not hold it)
    finally:
        server.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        server.close()


SWITCH_SCRIPT = textwrap.dedent(
    """
    import sys
    import django
    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connections
    from opentelemetry.sdk.trace import TracerProvider
    from otel_taskctx.spans import StoreSpanProcessor

    first, second = sys.argv[1:3]
    spans_db = settings.DATABASES["spans"]
    call_command("migrate", verbosity=0)
    for name in (second, first):  # both migrated: a row written to either would land
        spans_db["NAME"] = name
        call_command("migrate", database="spans", verbosity=0)
        connections["spans"].close()
    store = StoreSpanProcessor(schedule_delay_millis=60_000, using="spans")
    tracer = TracerProvider().get_tracer("t")

    def end(name):
        span = tracer.start_span(name)
        span.end()
        store.on_end(span)

    end("for the first")
    assert store.force_flush()
    end("queued for the first")
    exporter = store.batch().span_exporter
    spans_db["NAME"] = second  # what create_test_db() (or its teardown) does to the settings
    end("for the second")
    assert store.force_flush()
    print("DROPPED", exporter.dropped)
    """
)


@pytest.mark.skipif(os.environ.get("TASKCTX_STACK", "embedded") != "embedded", reason="SQLite")
def test_rows_go_to_the_database_they_were_made_for_or_nowhere(tmp_path):
    first, second = tmp_path / "first.sqlite3", tmp_path / "second.sqlite3"
    env = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="tests.settings",
        TASKCTX_DB_NAME=str(tmp_path / "jobs.sqlite3"),
        TASKCTX_SPAN_DB=str(first),
        PYTHONPATH=str(ROOT),
    )
    out = subprocess.run(
        [sys.executable, "-c", SWITCH_SCRIPT, str(first), str(second)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "DROPPED 1" in out.stdout, out.stdout + out.stderr

    def names(path: Path) -> list[str]:
        db = sqlite3.connect(path)
        try:
            return [r[0] for r in db.execute("SELECT name FROM otel_taskctx_span ORDER BY name")]
        finally:
            db.close()

    # the connection opened to the first database was not used for the second one's rows,
    # and the row queued for the first one went nowhere once the settings named the second
    assert names(first) == ["for the first"]
    assert names(second) == ["for the second"]
