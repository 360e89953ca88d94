"""The README's demo command, run as a user runs it: a subprocess on the sample's own settings.

Each run starts from an empty folder (and, on the production stack, a dropped PostgreSQL
database), so the demo creates its database, seeds, starts a real qcluster and stops it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
STACK = os.environ.get("TASKCTX_STACK", "embedded")
INSTANCE = os.environ.get("TASKCTX_INSTANCE", "main")


def sample_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a sample process: its own settings and folder, this run's stack."""
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env.update(
        SAMPLE_VAR_DIR=str(tmp_path / "var"),
        SAMPLE_CLUSTER_NAME=f"taskctx-sample-{INSTANCE}",
        COLUMNS="160",
        PYTHONUNBUFFERED="1",
    )
    for name in ("SAMPLE_DATABASE_URL", "SAMPLE_REDIS_URL", "SAMPLE_INSTRUMENT"):
        env.pop(name, None)
    if STACK == "redis-postgres":
        host = os.environ.get("TASKCTX_PG_HOST", "127.0.0.1")
        port = os.environ.get("TASKCTX_PG_PORT", "5432")
        user = os.environ.get("TASKCTX_PG_USER", "postgres")
        env["SAMPLE_DATABASE_URL"] = f"postgres://{user}@{host}:{port}/{sample_pg_database()}"
        redis_url = os.environ.get("TASKCTX_REDIS_URL", "redis://127.0.0.1:6379")
        env["SAMPLE_REDIS_URL"] = f"{redis_url}/{os.environ.get('TASKCTX_REDIS_DB', '1')}"
    env.update(extra)
    return env


def sample_pg_database() -> str:
    return f"taskctx_sample_{INSTANCE}".replace("-", "_")


def drop_sample_pg_database() -> None:
    import psycopg

    conninfo = (
        f"host={os.environ.get('TASKCTX_PG_HOST', '127.0.0.1')} "
        f"port={os.environ.get('TASKCTX_PG_PORT', '5432')} "
        f"user={os.environ.get('TASKCTX_PG_USER', 'postgres')} dbname=postgres"
    )
    with psycopg.connect(conninfo, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{sample_pg_database()}" WITH (FORCE)')


def run_command(
    tmp_path: Path,
    command: str,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 240,
):
    """``manage.py <command> *args`` of the sample, from a fresh database; (proc, output)."""
    if STACK == "redis-postgres":
        drop_sample_pg_database()  # a fresh machine: the demo creates the database
    proc = subprocess.run(
        [sys.executable, "sample/manage.py", command, *args],
        cwd=REPO_ROOT,
        env=env or sample_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc, proc.stdout + proc.stderr


def run_demo(tmp_path: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 240):
    report = tmp_path / "report.json"
    proc, out = run_command(
        tmp_path, "taskctx_demo", "--report", str(report), *args, env=env, timeout=timeout
    )
    data = json.loads(report.read_text()) if report.exists() else None
    return proc, out, data


def fact(output: str, name: str) -> str:
    match = re.search(rf"^\s*{re.escape(name)}\s+(.*)$", output, re.M)
    assert match, f"no {name!r} line in the demo's output:\n{output[-3000:]}"
    return match.group(1).strip()


@pytest.mark.cluster
@pytest.mark.stack
def test_demo_runs_the_whole_story_from_nothing(tmp_path):
    proc, out, report = run_demo(
        tmp_path,
        *("--books", "4", "--chapters", "3", "--albums", "3", "--tracks", "2"),
        *("--delay", "0.15", "--timeout", "90"),
    )
    assert proc.returncode == 0, out[-5000:]
    assert "demo passed" in out
    assert "created the cache table" in out or STACK == "redis-postgres"
    assert re.search(r"qcluster running \(pid \d+", out)
    assert "qcluster stopped (exit code 0)" in out

    # the facts, as printed
    assert fact(out, "status").startswith("✓ success")
    assert fact(out, "descendants updated inline").startswith("✓ 12/12")
    assert fact(out, "nested jobs escaped to the queue").startswith("✓ 0 ")
    assert fact(out, "locks held while running").startswith(
        "✓ 16 (4 library.book, 12 library.chapter), all under the job's key"
    )
    assert fact(out, "locks after completion") == "✓ 0 (all released)"
    flat = re.sub(r"\s+", " ", out)  # table cells wrap
    assert "Another bulk operation is already running on books" in flat
    assert "Another bulk operation is already running on chapters" in flat
    assert "Book.save internal" in out and "sync chapters internal" in out
    assert "sample.library.tasks.reprice_album_tracks internal" in out

    # and the same facts from the JSON report
    assert report["ok"] and report["error"] is None
    books, albums = report["jobs"]
    for job, parents, descendants in ((books, 4, 12), (albums, 3, 6)):
        assert job["ok"], job["failures"]
        assert job["status"] == "success"
        assert (job["parents_updated"], job["parents"]) == (parents, parents)
        assert job["descendants_inline"] == job["descendants"] == descendants
        assert job["escaped_queued"] == job["escaped_tasks"] == 0
        assert job["locks_peak"] == parents + descendants
        assert job["locks_left"] == 0 and job["locks_foreign"] == 0
        assert job["progress_left"] is None
        assert job["nested_progress_seen"] >= 1
        assert job["dashboard_status"] == "success" and job["dashboard_user"] == "demo"
        # no held (throttled) message landed after powercrud's own final one
        assert job["dashboard_progress"].startswith("completed update: "), job
    refused = [r for r in books["refusals"] if r["ids"]]
    assert len(refused) == 2 and all(r["refused"] for r in refused)
    assert {model for r in refused for model in r["holders"]} == {"library.book", "library.chapter"}
    assert all(
        set(r["holders"][m].values()) == {books["task_key"]} for r in refused for m in r["holders"]
    )

    # the job tree: producer -> consumer -> one Book.save per book -> its nested chapter sync
    tree = "\n".join(books["tree_text"])
    assert "process powercrud.tasks.bulk_update_task consumer" in tree
    assert books["tree_summary"]["status"] == "ok"
    assert tree.count("sync chapters internal") >= 3  # long runs of siblings are shortened
    assert re.search(r"Book\.save internal [\d.]+(ms|s) ok", tree)
    assert books["tree_summary"]["descendants_locked"] == 12


@pytest.mark.cluster
def test_powercrud_final_message_stays_last_at_a_fast_pace(tmp_path):
    """Chapters 20 ms apart: the last nested message is held by the progress throttle when
    powercrud writes its final one; the finished job's last progress message (the
    dashboard's) must still be powercrud's own, not the held chapter step."""
    proc, out, report = run_demo(
        tmp_path,
        *("--books", "6", "--chapters", "5", "--albums", "0", "--delay", "0.02"),
        *("--timeout", "90"),
    )
    assert report is not None, out[-5000:]
    (job,) = report["jobs"]
    assert job["dashboard_progress"] == "completed update: 6 processed", job
    assert proc.returncode == 0, out[-5000:]


@pytest.mark.cluster
def test_demo_fails_and_says_why_without_the_instrumentation(tmp_path):
    """powercrud on its own: the nested jobs escape, and the demo exits non-zero."""
    proc, out, report = run_demo(
        tmp_path,
        *("--books", "2", "--chapters", "2", "--albums", "0", "--delay", "0", "--timeout", "60"),
        env=sample_env(tmp_path, SAMPLE_INSTRUMENT="0"),
    )
    assert proc.returncode != 0, out[-3000:]
    assert "worker instrumentation: OFF" in out
    assert "the demo failed" in out
    flat = re.sub(r"\s+", " ", out)
    assert "nested jobs escaped to the queue: 0 queued, 2 run separately" in flat
    assert "sample.library.tasks.sync_book_chapters" in flat
    assert "only 0/4 descendants were updated inside the job" in flat
    assert report is not None and report["ok"] is False
    assert "qcluster stopped (exit code 0)" in out


def test_demo_rejects_bad_options(tmp_path):
    proc = subprocess.run(
        [sys.executable, "sample/manage.py", "taskctx_demo", "--books", "-1"],
        cwd=REPO_ROOT,
        env=sample_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "--books must be positive" in proc.stderr


@pytest.mark.stack
def test_tasks_demo_runs_the_nested_bulk_edit_through_db_worker(tmp_path):
    """``make demo``'s second command: the same nested bulk edit through django.tasks."""
    proc, out = run_command(
        tmp_path,
        "taskctx_tasks_demo",
        *("--books", "4", "--chapters", "3", "--delay", "0.1", "--fan-out-workers", "2"),
    )
    assert proc.returncode == 0, out[-3000:]
    assert "django.tasks demo passed" in out
    assert "books published 4/4" in out and "chapters updated inside the task 12/12" in out
    assert "nested tasks that reached the queue: 0" in out
    assert "locks after the task: 0" in out
    assert re.search(r"chapters seen locked under the task's key: [1-9]", out)
    # then fanned out: a child task per book on both db_workers, the job ending after them
    assert "fan-out job: SUCCESSFUL" in out
    assert "child tasks 4, run by 2 db_worker(s)" in out
    assert "the job ended after its last child task" in out
    assert "chapters updated inside the job 12/12" in out and "locks after the job: 0" in out
    assert "speed-up of the django.tasks job with fan-out:" in out


@pytest.mark.cluster
@pytest.mark.stack
def test_fan_out_demo_runs_both_policies_correctly(tmp_path):
    """``make demo``'s last command: the bulk edit inline, then with fan-out."""
    proc, out = run_command(
        tmp_path,
        "taskctx_fan_out_demo",
        *("--albums", "3", "--tracks", "2", "--delay", "0.05", "--workers", "2"),
        timeout=300,
    )
    assert proc.returncode == 0, out[-3000:]
    assert "fan-out demo passed" in out
    assert re.search(r"inline\s+success\s+[\d.]+s\s+6/6\s+0", out), out[-2000:]
    assert re.search(r"fan-out\s+success\s+[\d.]+s\s+6/6\s+0", out), out[-2000:]
    assert "speed-up with fan-out:" in out


def celery_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A sample process on this run's Celery broker (``TASKCTX_CELERY_BROKER``): kombu's
    filesystem transport in the sample's folder (embedded), Redis DB ``TASKCTX_REDIS_DB``+1
    (the default of the production stack) or RabbitMQ; the queue is named for this instance."""
    env = sample_env(tmp_path, **extra)
    env.pop("SAMPLE_CELERY_BROKER_URL", None)
    default = "redis" if STACK == "redis-postgres" else "filesystem"
    broker = os.environ.get("TASKCTX_CELERY_BROKER") or default
    if broker == "redis":
        redis_url = os.environ.get("TASKCTX_REDIS_URL", "redis://127.0.0.1:6379")
        db = int(os.environ.get("TASKCTX_REDIS_DB", "1")) + 1
        env["SAMPLE_CELERY_BROKER_URL"] = f"{redis_url}/{db}"
    elif broker == "amqp":
        env["SAMPLE_CELERY_BROKER_URL"] = "amqp://guest:guest@127.0.0.1:5672//"
    return env


@pytest.mark.celery
@pytest.mark.stack
def test_celery_demo_runs_the_nested_bulk_edit_inline_and_fanned_out(tmp_path):
    """``make demo``'s Celery command: a real worker (prefork, 4 processes), the job inline and
    fanned out, checked and timed; the worker stopped at the end."""
    proc, out = run_command(
        tmp_path,
        "taskctx_celery_demo",
        *("--books", "4", "--chapters", "3", "--delay", "0.1", "--timeout", "120"),
        env=celery_env(tmp_path),
        timeout=300,
    )
    assert proc.returncode == 0, out[-5000:]
    assert "Celery demo passed" in out
    nodename = f"taskctx-sample-{INSTANCE}@"
    assert re.search(rf"celery worker {re.escape(nodename)}\S+ running \(pid \d+, 4 prefork", out)
    assert "celery worker stopped (exit code 0)" in out
    inline, fanned = out.split("fan-out job celery-")
    for part in (inline, fanned):
        assert "books published 4/4" in part and "chapters updated inside the job 12/12" in part
        assert "✓ the job ended after its last descendant" in part
        assert re.search(r"chapters seen locked under the job's key: [1-9]", part)
        assert "locks after the job: 0" in part
    assert "✓ nested tasks that reached the queue: 0" in inline
    # the job trees: the job's run and each fanned-out child's badged with the worker's name
    # (a long row wraps: the badge then goes on under the tree's guides)
    badge = (
        rf"process sample\.library\.celery_tasks\.publish_book(s|_in_parallel) consumer "
        rf"[^\n]*worker[\s│]+{re.escape(nodename)}"
    )
    assert re.search(badge, inline)
    assert len(re.findall(badge, fanned)) >= 2
    assert re.search(rf"✓ child tasks 4, run by [234] of {re.escape(nodename)}\S+'s 4 pool", fanned)
    assert re.search(r"inline\s+SUCCESS\s+[\d.]+s\s+12/12\s+0", out), out[-2000:]
    assert re.search(r"fan-out\s+SUCCESS\s+[\d.]+s\s+12/12\s+0", out), out[-2000:]
    assert "speed-up of the Celery job with fan-out:" in out


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (whose parent, if it is gone, may never reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.celery
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_celery_demo_stops_its_worker_when_it_is_stopped(tmp_path, how):
    """The demo killed mid-job: on SIGTERM (twice) its own ``finally`` stops the worker (warm
    shutdown); on SIGKILL the kernel's parent-death signal does. No worker process is left."""
    log = tmp_path / "demo.out"
    with log.open("w") as out:
        demo = subprocess.Popen(
            [sys.executable, "sample/manage.py", "taskctx_celery_demo", "--no-fan-out"]
            + ["--books", "4", "--chapters", "5", "--delay", "0.3"],  # a job of 6 s or more
            cwd=REPO_ROOT,
            env=celery_env(tmp_path),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for(lambda: "running (pid" in log.read_text(), 120, "the worker to be ready")
        pid = int(re.search(r"running \(pid (\d+)", log.read_text()).group(1))
        pool = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        assert len(pool) == 4
        demo.send_signal(getattr(signal, how))
        if how == "SIGTERM":  # a second one while the demo stops its worker is ignored
            demo.send_signal(signal.SIGTERM)
        demo.wait(120)
        _wait_for(lambda: not any(map(_running, [pid, *pool])), 120, "the worker to stop")
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    text = log.read_text()
    assert demo.returncode != 0
    if how == "SIGTERM":
        assert "interrupted by SIGTERM" in text, text[-3000:]
        assert "celery worker stopped (exit code 0)" in text, text[-3000:]
    worker_log = (tmp_path / "var" / "celery-worker.log").read_text()
    assert "Warm shutdown" in worker_log, worker_log[-3000:]
