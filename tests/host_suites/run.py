"""Run the hosts' own test suites plain and with ``otel_taskctx``; fail on regressions.

Usage (from the project's root, ``make host-suites`` does this)::

    .venv/bin/python tests/host_suites/run.py [--only SUITE[:VARIANT] ...] [--json FILE]

For each suite (django-tasks-db on SQLite and PostgreSQL, django-q2 on its ORM broker and on
Redis, Celery's task and worker unit tests) the released sdist of the version installed here is taken from PyPI (cached, its
sha256 checked), unpacked afresh for every run and its tests run twice with the suite's own
runner: once as released, once with ``"otel_taskctx"`` appended to ``INSTALLED_APPS`` and
nothing else changed. A test that passes plain and does not pass with ``otel_taskctx`` is run
once more, alone, with ``otel_taskctx``: if it fails again it is a regression (the table
lists them and the exit status is 1), if it passes it is listed as flaky.

* django-tasks-db: its sdist ships ``tests/tests.py`` only; ``django_tasks_db/`` beside this
  script holds the settings, ``manage.py`` and task module it imports (see its README).
  Run with Django's runner (``python -m manage test``), outcomes recorded by
  ``outcome_runner.py``.
* django-q2: pytest with its own settings (``django_q.tests.settings``), through a settings
  module that imports them and, for the ORM variant, sets ``Q_CLUSTER["orm"]``. Its test
  extras that this environment lacks (croniter, psutil, blessed, setproctitle) are installed
  by uv into the cache, after the environment on ``sys.path``. Its MongoDB, SQS and IronMQ
  tests need services this machine does not have: deselected in both runs.
* Celery: pytest on ``t/unit/tasks`` and ``t/unit/worker`` (no service), against the
  installed ``celery``, its test extras in the cache as above; "with ``otel_taskctx``" is the
  pytest plugin of ``celery_unit/`` (a Django project, both instrumentors; see its README).
  Its tests have no timing: one that fails with us and passes alone is order-dependent
  (state an earlier test left with us on), a regression too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from junit import junit_outcomes, node_id
from sources import CACHE, HERE, REPO_ROOT, extras, sdist, unpack

WITH_US = "HOST_SUITE_WITH_OTEL_TASKCTX"
#: django-q2's test extras (its ``testing`` extra) missing from the project's environment
Q_EXTRAS = ("croniter==7.0.0", "psutil==7.2.2", "blessed==1.52.0", "setproctitle==1.3.8")
#: django-q2 tests of brokers whose services are not on this machine
Q_DESELECT = (
    "test_brokers.py::test_mongo",
    "test_brokers.py::test_sqs",
    "test_brokers.py::test_ironmq",
)
#: one run of one suite; they take 30 to 90 s here
RUN_TIMEOUT = 600
#: pytest's faulthandler dumps every thread's stack when one test runs this long (a hang
#: then shows where it is in the log; the run goes on until RUN_TIMEOUT)
Q_TEST_STACK_DUMP = 120


@dataclass
class Run:
    outcomes: dict[str, str]  # test id -> passed / failed / error / skipped
    seconds: float
    returncode: int
    log: Path

    def passed(self) -> set[str]:
        return {t for t, o in self.outcomes.items() if o == "passed"}


@dataclass
class Result:
    suite: str
    variant: str
    plain: Run
    with_us: Run
    regressions: list[str] = field(default_factory=list)
    #: passed plain, failed with us, passed with us when run again alone
    flaky: list[str] = field(default_factory=list)
    #: the same in a suite of ORDER_STRICT (also in ``regressions``)
    order_dependent: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- running
_DROPPED = ("DJANGO_", "PYTEST_", "TASKCTX_", "OTEL_", "HOST_SUITE_", "PYTHONDONTWRITEBYTECODE")


def _env(**extra: str) -> dict[str, str]:
    """The suites' environment: none of ours, and bytecode caching on (see ``compile_all``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROPPED)}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def compile_all() -> None:
    """Byte-compile the environment and this project first. Without a bytecode cache
    (``PYTHONDONTWRITEBYTECODE``) every process compiles each module it imports, and the
    run with ``otel_taskctx`` imports more: its worker processes start later, and the
    suites' timing tests (a worker must pick a task within 1 s) fail for that alone."""
    purelib = Path(sysconfig.get_paths()["purelib"])
    targets = [purelib, REPO_ROOT / "otel_taskctx", REPO_ROOT / "instrumentation"]
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-j", "0", *map(str, targets)],
        env=_env(),
        stdout=subprocess.DEVNULL,
        check=False,  # a file that does not compile is one its importer never loads
    )


def _run(argv: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[int, float]:
    """Run one suite in a process group of its own; past ``RUN_TIMEOUT`` the whole group
    (the runner and the workers it started) is killed and the run reports what it recorded."""
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            returncode = proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            returncode = proc.wait()
            out.write(f"\nhost-suites: killed after {RUN_TIMEOUT} s\n")
        try:  # workers a test left running would hold the next run's database
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return returncode, time.monotonic() - started


def run_tasks_db(
    variant: str, with_us: bool, work: Path, logs: Path, only: list[str] | None = None
) -> Run:
    root = unpack(sdist("django-tasks-db"), work)
    shutil.copytree(HERE / "django_tasks_db", root, dirs_exist_ok=True)
    shutil.copy(HERE / "outcome_runner.py", root / "outcome_runner.py")
    name = f"django-tasks-db-{variant}-{'with' if with_us else 'plain'}{'-rerun' if only else ''}"
    outcomes_file = logs / f"{name}.json"
    outcomes_file.unlink(missing_ok=True)  # a run that records nothing must not read old ones
    env = _env(
        HOST_SUITE_DB=variant,
        HOST_SUITE_OUTCOMES=str(outcomes_file),
        **({WITH_US: "1"} if with_us else {}),
    )
    if variant == "postgres":
        env["HOST_SUITE_PG_DB"] = os.environ.get("HOST_SUITE_PG_DB", "host_suite_tasks")
        _ensure_pg_database(env["HOST_SUITE_PG_DB"])
    argv = [sys.executable, "-m", "manage", "test", *(only or ["tests"]), "--noinput", "-v", "2"]
    argv += ["--testrunner", "outcome_runner.OutcomeRunner"]
    log = logs / f"{name}.log"
    rc, seconds = _run(argv, root, env, log)
    outcomes = json.loads(outcomes_file.read_text()) if outcomes_file.exists() else {}
    return Run(outcomes, seconds, rc, log)


def _ensure_pg_database(name: str) -> None:
    """The database the settings name (Django connects to it to create its test database)."""
    import psycopg

    host = os.environ.get("HOST_SUITE_PG_HOST", "127.0.0.1")
    with psycopg.connect(host=host, user="postgres", dbname="postgres", autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')


Q_SETTINGS = '''"""django-q2's own test settings; the harness's two changes, each by environment."""

import os
import sys

from django_q.tests.settings import *  # noqa: F403

sys.path.append({extras!r})  # its missing test extras, after the environment
if os.environ.get("HOST_SUITE_Q_BROKER") == "orm":
    Q_CLUSTER = {{**Q_CLUSTER, "orm": "default"}}  # noqa: F405
if os.environ.get("{with_us}") == "1":
    INSTALLED_APPS = (*INSTALLED_APPS, "otel_taskctx")  # noqa: F405
'''


def run_django_q(
    variant: str, with_us: bool, work: Path, logs: Path, only: list[str] | None = None
) -> Run:
    root = unpack(sdist("django-q2"), work)
    (root / "host_suite_settings.py").write_text(
        Q_SETTINGS.format(extras=str(extras("django-q2", Q_EXTRAS)), with_us=WITH_US)
    )
    name = f"django-q2-{variant}-{'with' if with_us else 'plain'}{'-rerun' if only else ''}"
    junit = logs / f"{name}.xml"
    junit.unlink(missing_ok=True)
    env = _env(
        REDIS_HOST=os.environ.get("HOST_SUITE_REDIS_HOST", "127.0.0.1"),
        HOST_SUITE_Q_BROKER=variant,
        **({WITH_US: "1"} if with_us else {}),
    )
    targets = [node_id(t) for t in only] if only else ["django_q/tests"]
    argv = [sys.executable, "-m", "pytest", *targets, "-p", "no:cacheprovider"]
    argv += ["--ds", "host_suite_settings", "-o", "addopts=", f"--junitxml={junit}", "-q"]
    argv += ["-o", f"faulthandler_timeout={Q_TEST_STACK_DUMP}"]
    argv += [f"--deselect=django_q/tests/{t}" for t in Q_DESELECT]
    log = logs / f"{name}.log"
    rc, seconds = _run(argv, root, env, log)
    return Run(junit_outcomes(junit), seconds, rc, log)


#: Celery's test extras (requirements/test.txt) its task and worker tests use and the
#: environment lacks. Not needed by this slice: pytest-celery[all] (Docker containers),
#: moto/boto3 (S3 backend), pytest-click (CLI tests), mypy and the backends' extras.
CELERY_EXTRAS = (
    "freezegun==1.5.5",
    "pytest-timeout==2.4.0",
    "pytest-subtests==0.15.0",
    "pytest-rerunfailures==16.7",
    "pytest-order==1.5.0",
)
#: its unit tests of tasks and of the worker: memory transport and cache backend, no service
CELERY_TESTS = ("t/unit/tasks", "t/unit/worker")
#: suites with no timing tests: a test failing with us only in the whole run is a regression
ORDER_STRICT = {"celery"}


def run_celery(
    variant: str, with_us: bool, work: Path, logs: Path, only: list[str] | None = None
) -> Run:
    root = unpack(sdist("celery"), work)
    shutil.rmtree(root / "celery")  # the tests import the installed celery, the one we patch
    shutil.copytree(HERE / "celery_unit", root, dirs_exist_ok=True)
    name = f"celery-{variant}-{'with' if with_us else 'plain'}{'-rerun' if only else ''}"
    junit = logs / f"{name}.xml"
    junit.unlink(missing_ok=True)
    env = _env(
        HOST_SUITE_EXTRAS=str(extras("celery", CELERY_EXTRAS)),
        HOST_SUITE_DB=str(work / "taskctx.sqlite3"),
    )
    targets = [node_id(t, root) for t in only] if only else list(CELERY_TESTS)
    argv = [sys.executable, "host_suite_pytest.py", *targets, "-p", "no:cacheprovider"]
    argv += ["-p", "no:django", f"--junitxml={junit}", "-q"]
    argv += ["-o", f"faulthandler_timeout={Q_TEST_STACK_DUMP}"]
    argv += ["-p", "host_suite_taskctx"] if with_us else []
    log = logs / f"{name}.log"
    rc, seconds = _run(argv, root, env, log)
    return Run(junit_outcomes(junit), seconds, rc, log)


SUITES = {
    ("django-tasks-db", "sqlite"): run_tasks_db,
    ("django-tasks-db", "postgres"): run_tasks_db,
    ("django-q2", "orm"): run_django_q,
    ("django-q2", "redis"): run_django_q,
    ("celery", "memory"): run_celery,
}


def run_suite(suite: str, variant: str, logs: Path) -> Result:
    """Both runs; then each test that passed plain only is run again, alone, with
    ``otel_taskctx``: one that passes then is reported as flaky, not as a regression
    (timing tests of a loaded machine fail now and then in the plain run too), except in a
    suite of ``ORDER_STRICT``: there it is an order-dependent regression."""
    runner = SUITES[(suite, variant)]

    def run(with_us: bool, only: list[str] | None = None) -> Run:
        with tempfile.TemporaryDirectory(prefix=f"host-suite-{suite}-") as work:
            result = runner(variant, with_us, Path(work), logs, only)
        label = ("with otel_taskctx" if with_us else "plain") + (" (rerun)" if only else "")
        print(
            f"  {suite} [{variant}] {label}: {len(result.passed())}/{len(result.outcomes)} "
            f"passed in {result.seconds:.0f}s (exit {result.returncode}, log {result.log})",
            flush=True,
        )
        return result

    plain, with_us = run(False), run(True)
    failing = sorted(t for t in plain.passed() if with_us.outcomes.get(t) != "passed")
    flaky: list[str] = []
    if failing and with_us.outcomes:
        rerun = run(True, failing)
        flaky = [t for t in failing if rerun.outcomes.get(t) == "passed"]
        with_us.seconds += rerun.seconds
    result = Result(suite, variant, plain, with_us, [t for t in failing if t not in flaky])
    if suite in ORDER_STRICT:
        result.regressions, result.order_dependent = failing, flaky
    else:
        result.flaky = flaky
    return result


def table(results: list[Result]) -> str:
    header = (
        "suite",
        "db/broker",
        "passed plain",
        "passed with us",
        "regressions",
        "flaky",
        "time",
    )
    rows = [header]
    for r in results:
        plain_bad = not r.plain.outcomes
        rows.append(
            (
                r.suite,
                r.variant,
                "did not run" if plain_bad else f"{len(r.plain.passed())}/{len(r.plain.outcomes)}",
                f"{len(r.with_us.passed())}/{len(r.with_us.outcomes)}"
                if r.with_us.outcomes
                else "did not run",
                str(len(r.regressions)),
                str(len(r.flaky)),
                f"{r.plain.seconds + r.with_us.seconds:.0f}s",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in results:
        for test in r.regressions:
            outcome = r.with_us.outcomes.get(test, "did not run")
            alone = " (passed alone: order-dependent)" if test in r.order_dependent else ""
            lines.append(f"REGRESSION {r.suite} [{r.variant}] {test}: {outcome}{alone}")
        for test in r.flaky:
            lines.append(f"flaky     {r.suite} [{r.variant}] {test}: passed when run again")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], help="SUITE or SUITE:VARIANT")
    parser.add_argument("--json", type=Path, help="write the per-test outcomes here")
    parser.add_argument("--logs", type=Path, default=CACHE / "logs")
    args = parser.parse_args(argv)
    chosen = [
        key
        for key in SUITES
        if not args.only or any(o in (key[0], f"{key[0]}:{key[1]}") for o in args.only)
    ]
    if not chosen:
        parser.error(f"no suite matches {args.only}; known: {[':'.join(k) for k in SUITES]}")
    args.logs.mkdir(parents=True, exist_ok=True)
    compile_all()
    results = []
    for suite, variant in chosen:
        print(f"=== {suite} [{variant}]", flush=True)
        results.append(run_suite(suite, variant, args.logs))
    print(table(results))
    if args.json:
        args.json.write_text(
            json.dumps(
                [
                    {
                        "suite": r.suite,
                        "variant": r.variant,
                        "plain": r.plain.outcomes,
                        "with_us": r.with_us.outcomes,
                        "regressions": r.regressions,
                        "flaky": r.flaky,
                    }
                    for r in results
                ],
                indent=1,
            )
        )
    broken = [r for r in results if not r.plain.outcomes or not r.with_us.outcomes]
    for r in broken:
        run = r.plain if not r.plain.outcomes else r.with_us
        tail = run.log.read_text(errors="replace").splitlines()[-12:] if run.log.exists() else []
        print(f"{r.suite} [{r.variant}]: a run reported no test; {run.log} ends:", file=sys.stderr)
        print("\n".join(f"    {line}" for line in tail), file=sys.stderr)
    regressions = sum(len(r.regressions) for r in results)
    print(f"host suites: {regressions} regression(s)")
    return 1 if regressions or broken else 0


if __name__ == "__main__":
    sys.exit(main())
