"""``tests/host_suites/run.py`` reads each test's outcome right and counts only what passes
plain and fails with us, twice, as a regression.

The suites themselves run under ``make host-suites`` (minutes); here the harness's parts run
on small real inputs: a pytest run's junit file, Django's runner with the outcome recorder on
the tiny app of ``tests/configs``, and the comparison of two runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.cluster import REPO_ROOT

HARNESS = REPO_ROOT / "tests" / "host_suites"


@pytest.fixture(scope="module")
def harness():
    sys.path.insert(0, str(HARNESS))  # as when run as a script: its sibling modules
    spec = importlib.util.spec_from_file_location("host_suites_run", HARNESS / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)
    sys.path.remove(str(HARNESS))


SAMPLE = """
import pytest

def test_ok():
    pass

def test_fails():
    assert False

@pytest.fixture
def broken():
    raise RuntimeError("setup")

def test_errors(broken):
    pass

@pytest.mark.skip(reason="no service")
def test_skipped():
    pass

@pytest.mark.parametrize("n", [1, 2])
def test_param(n):
    assert n == 1
"""


def test_junit_outcomes_of_a_real_pytest_run(harness, tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "test_sample.py").write_text(SAMPLE)
    junit = tmp_path / "junit.xml"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "PYTEST_"))}
    subprocess.run(
        [sys.executable, "-m", "pytest", "pkg", "-p", "no:django", "-p", "no:cacheprovider"]
        + ["-o", "addopts=", "-q", f"--junitxml={junit}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=120,
    )
    outcomes = harness.junit_outcomes(junit)
    assert outcomes == {
        "pkg.test_sample::test_ok": "passed",
        "pkg.test_sample::test_fails": "failed",
        "pkg.test_sample::test_errors": "error",
        "pkg.test_sample::test_skipped": "skipped",
        "pkg.test_sample::test_param[1]": "passed",
        "pkg.test_sample::test_param[2]": "failed",
    }
    # the rerun addresses a test by its pytest node id
    assert harness.node_id("pkg.test_sample::test_param[2]") == "pkg/test_sample.py::test_param[2]"


def test_outcome_runner_records_each_test_of_a_real_django_run(tmp_path):
    outcomes = tmp_path / "outcomes.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "TASKCTX_"))}
    env.update(
        DJANGO_SETTINGS_MODULE="tests.configs.tasks_db_unused_settings",
        TASKCTX_CONFIG_DIR=str(tmp_path),
        HOST_SUITE_OUTCOMES=str(outcomes),
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(HARNESS)]),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "django", "test", "tests.configs.tinyapp"]
        + ["--testrunner", "outcome_runner.OutcomeRunner"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    prefix = "tests.configs.tinyapp.tests.NoteTests."
    assert json.loads(outcomes.read_text()) == {
        f"{prefix}test_a_note_is_saved_and_read_back": "passed",
        f"{prefix}test_each_test_starts_empty": "passed",
    }


def test_only_tests_that_fail_with_us_again_are_regressions(harness, tmp_path, monkeypatch):
    """Plain: a, b, c, d pass, e fails. With us: a passes, b and c fail, d is missing, e
    passes. Run again alone with us: b fails again, c passes, d fails."""
    runs = {
        (False, None): {"a": "passed", "b": "passed", "c": "passed", "d": "passed", "e": "failed"},
        (True, None): {"a": "passed", "b": "failed", "c": "error", "e": "passed"},
        (True, ("b", "c", "d")): {"b": "failed", "c": "passed", "d": "failed"},
    }
    calls = []

    def runner(variant, with_us, work, logs, only=None):
        key = (with_us, tuple(only) if only else None)
        calls.append(key)
        return harness.Run(runs[key], 1.0, 0, logs / "x.log")

    monkeypatch.setitem(harness.SUITES, ("suite", "db"), runner)
    result = harness.run_suite("suite", "db", tmp_path)
    assert calls == [(False, None), (True, None), (True, ("b", "c", "d"))]
    assert result.regressions == ["b", "d"] and result.flaky == ["c"]
    table = harness.table([result])
    assert "REGRESSION suite [db] b: failed" in table
    assert "REGRESSION suite [db] d: did not run" in table
    assert "flaky     suite [db] c: passed when run again" in table


def test_node_id_tells_a_class_from_its_module(harness, tmp_path):
    """Celery's tests are methods of classes: the junit class name holds both."""
    (tmp_path / "t" / "unit" / "tasks").mkdir(parents=True)
    (tmp_path / "t" / "unit" / "tasks" / "test_tasks.py").write_text("")
    test_id = "t.unit.tasks.test_tasks.test_task_retries::test_retry[x]"
    assert harness.node_id(test_id, tmp_path) == (
        "t/unit/tasks/test_tasks.py::test_task_retries::test_retry[x]"
    )
    assert harness.node_id("t.unit.tasks.test_tasks::test_f", tmp_path) == (
        "t/unit/tasks/test_tasks.py::test_f"
    )


PROBE = """
import threading


def test_instrumented_before_the_tests():
    from celery import Celery
    from celery.app.task import Task
    from opentelemetry import trace
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.taskctx import TaskContextInstrumentor

    assert TaskContextInstrumentor().is_instrumented_by_opentelemetry
    assert CeleryInstrumentor().is_instrumented_by_opentelemetry
    assert type(trace.get_tracer_provider()).__module__.startswith("opentelemetry.sdk")
    # the span store's threads, started before the session (Celery's conftest compares)
    assert any(t.name.startswith("OtelBatch") for t in threading.enumerate())
    app = Celery("probe", broker="memory://")

    @app.task
    def add(x, y):
        return x + y

    assert add.apply((1, 2)).get() == 3
"""


def test_celery_plugin_instruments_before_celery_is_imported(harness, tmp_path):
    """The run with us: the plugin sets up Django with otel_taskctx, both instrumentors and
    the span store's threads before any test, celery not imported yet; the log says so."""
    import shutil

    shutil.copytree(HARNESS / "celery_unit", tmp_path, dirs_exist_ok=True)
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = harness._env(HOST_SUITE_EXTRAS=str(tmp_path / "no-extras"))
    env["HOST_SUITE_DB"] = str(tmp_path / "taskctx.sqlite3")
    proc = subprocess.run(
        [sys.executable, "host_suite_pytest.py", "test_probe.py", "-p", "no:django"]
        + ["-p", "no:cacheprovider", "-p", "no:randomly", "-p", "host_suite_taskctx"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout
    assert "otel_taskctx and opentelemetry-instrumentation-celery instrumented" in proc.stdout
    assert "(celery imported before: False)" in proc.stdout


def test_in_a_suite_without_timing_tests_passing_alone_is_still_a_regression(
    harness, tmp_path, monkeypatch
):
    """Celery's unit tests have no timing: a test that fails with us in the whole run and
    passes alone failed on state an earlier test left with us on."""
    runs = {
        (False, None): {"a": "passed", "b": "passed", "c": "passed"},
        (True, None): {"a": "passed", "b": "failed", "c": "failed"},
        (True, ("b", "c")): {"b": "failed", "c": "passed"},
    }

    def runner(variant, with_us, work, logs, only=None):
        return harness.Run(runs[(with_us, tuple(only) if only else None)], 1.0, 0, logs / "x.log")

    assert "celery" in harness.ORDER_STRICT
    monkeypatch.setitem(harness.SUITES, ("celery", "memory"), runner)
    result = harness.run_suite("celery", "memory", tmp_path)
    assert result.regressions == ["b", "c"] and result.flaky == []
    table = harness.table([result])
    assert "REGRESSION celery [memory] b: failed\n" in table + "\n"
    assert "REGRESSION celery [memory] c: failed (passed alone: order-dependent)" in table
