import os

import pytest
from django.core.management import call_command

from otel_taskctx import identity
from tests.celery_worker import celery_worker  # noqa: F401  (a real Celery worker)
from tests.cluster import cluster_factory, qcluster  # noqa: F401  (fixtures: a real qcluster)

STACK = os.environ.get("TASKCTX_STACK", "embedded")


def _host_tracer_provider() -> None:
    """The test suite is a host with its own SDK tracer provider, set after pytest-django ran
    ``django.setup()``: the one-liner of docs/core.md has otel_taskctx's processors join it."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    from otel_taskctx import join_tracer_provider

    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(TracerProvider())
    join_tracer_provider()


_host_tracer_provider()


def pytest_collection_modifyitems(config, items):
    """On the production stack, only the tests marked ``stack`` run (the rest ran embedded)."""
    if STACK == "embedded":
        return
    skip = pytest.mark.skip(reason=f"runs on the embedded stack; TASKCTX_STACK={STACK}")
    for item in items:
        if "stack" not in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker):
    with django_db_blocker.unblock():
        call_command("createcachetable", verbosity=0)


@pytest.fixture(autouse=True)
def _signing_from_settings():
    """Every test starts with the signing secret of the test settings."""
    identity.reset_signing()
    yield
    identity.reset_signing()


@pytest.fixture
def export_spans_after_test():
    """This process's spans are exported when the test ends, not seconds later inside another
    test (with ``django_db``: before the tables are cleared)."""
    yield
    from opentelemetry import trace

    flush = getattr(trace.get_tracer_provider(), "force_flush", None)
    if flush is not None:
        flush(5000)


@pytest.fixture
def cache(db):
    """The default cache (powercrud's locks and progress), cleared before and after the test."""
    from django.core.cache import caches

    cache = caches["default"]
    cache.clear()
    yield cache
    cache.clear()
