"""The instrumentation on, as a Django project running Celery has it, before Celery's tests.

``run.py`` passes ``-p host_suite_taskctx`` in the run with ``otel_taskctx``: pytest imports
this module before it loads Celery's ``conftest.py``, so ``celery`` is not imported yet when
``TaskContextInstrumentor`` is instrumented (Celery is patched through the post-import hook,
as in a project whose settings load before its Celery app), then
``opentelemetry-instrumentation-celery`` is instrumented (it imports celery) under an SDK
tracer provider, and a first span is recorded (see below). Nothing else of the suite changes.
"""

import os
import sys

import django
from django.core.management import call_command
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

os.environ["DJANGO_SETTINGS_MODULE"] = "host_suite_settings"
trace.set_tracer_provider(TracerProvider())
celery_imported_first = "celery" in sys.modules
django.setup()
call_command("migrate", verbosity=0)

from opentelemetry.instrumentation.celery import CeleryInstrumentor  # noqa: E402
from opentelemetry.instrumentation.taskctx import TaskContextInstrumentor  # noqa: E402

if not TaskContextInstrumentor().is_instrumented_by_opentelemetry:  # AUTO_INSTRUMENT did
    TaskContextInstrumentor().instrument()
if not TaskContextInstrumentor().is_instrumented_by_opentelemetry:
    raise RuntimeError("host suite: TaskContextInstrumentor did not instrument")
CeleryInstrumentor().instrument()
# otel_taskctx's span store starts its export threads at the first span a process records
# (none before a feature is used); a worker has them from its first task on. Celery's
# conftest asserts that no thread outlives a test compared to those alive at its first
# test: a first span here, so that they are among those.
with trace.get_tracer(__name__).start_as_current_span("host suite: the first span"):
    pass


def pytest_sessionstart(session):
    """What is on, first in the log (Celery patched by us: a wrapper on ``Task.apply_async``)."""
    from celery.app.task import Task

    patched = hasattr(Task.apply_async, "__wrapped__")
    session.config.pluginmanager.get_plugin("terminalreporter").write_line(
        f"host suite: otel_taskctx and opentelemetry-instrumentation-celery instrumented "
        f"(celery imported before: {celery_imported_first}); "
        f"Task.apply_async wrapped by otel_taskctx: {patched}"
    )
