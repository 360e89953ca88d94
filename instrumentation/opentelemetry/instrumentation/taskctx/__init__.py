"""OpenTelemetry instrumentation for django-q2 and powercrud jobs with task identity.

Usage
-----

Any one of these enables it (they do the same thing, once):

* add ``"otel_taskctx"`` to ``INSTALLED_APPS`` (``OTEL_TASKCTX["AUTO_INSTRUMENT"]``,
  default True, instruments in the app's ``ready()``);
* run the process under ``opentelemetry-instrument`` (entry point ``taskctx`` in the
  ``opentelemetry_instrumentor`` group), e.g.
  ``opentelemetry-instrument python manage.py qcluster``;
* call it yourself::

      from opentelemetry.instrumentation.taskctx import TaskContextInstrumentor

      TaskContextInstrumentor().instrument(tracer_provider=provider)  # provider optional

What it does (see ``docs/instrumentation.md``):

* producer: a PRODUCER span around every ``async_task`` enqueue and the trace context in
  a private key of the task package; a job launched by ``AsyncManager.launch_async_task``
  carries its own signed identity (its task key and manager class path);
* consumer: a CONSUMER span around every run in the worker, with the verified identity
  attached for the run (also in powercrud's ``async_context``) and removed afterwards;
  spans are flushed before a worker process exits;
* inside a verified task, nested ``launch_async_task`` / ``async_task`` calls run inline
  under the parent's task key instead of being enqueued (``allow_nested_async()`` and
  ``OTEL_TASKCTX["ENQUEUE_NESTED"]`` opt out).

If Django is not set up yet when ``instrument()`` runs (``opentelemetry-instrument`` loads
instrumentors before the application starts), patching waits until ``django.setup()``
has finished. What is patched, and how it is undone, is in ``_patching``.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from multiprocessing import util as mp_util
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
from opentelemetry.instrumentation.taskctx import _patching, _threads, utils
from opentelemetry.instrumentation.taskctx.package import _instruments
from opentelemetry.instrumentation.taskctx.version import __version__

from otel_taskctx.tracer_provider import TASKCTX_TRACER_PROVIDER

log = logging.getLogger("otel_taskctx.instrumentation")

__all__ = ["TaskContextInstrumentor", "__version__"]


class _ForkAnchor:
    """Weakly referenced by multiprocessing's after-fork registry; dropped on uninstrument."""


class TaskContextInstrumentor(BaseInstrumentor):
    """Carries task identity and trace context through django-q2 and powercrud."""

    _patches: _patching.Patches | None = None
    _fork_anchor: Any = None

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def _instrument(self, **kwargs: Any) -> None:
        # none given: otel_taskctx's provider, which follows the host's global one once set
        # and keeps our spans on a private one until then (never set globally)
        provider = kwargs.get("tracer_provider") or TASKCTX_TRACER_PROVIDER
        utils.STATE.tracer_provider = provider
        utils.STATE.tracer = trace.get_tracer(
            __name__,
            __version__,
            provider,
            schema_url="https://opentelemetry.io/schemas/1.11.0",
        )
        utils.STATE.active = True
        self._patches = _patching.Patches()
        if _patching.django_models_ready():
            try:
                self._apply()
            except BaseException:  # nothing is patched (Patches.apply undid it): not active
                utils.STATE.active = False
                raise
        else:
            self._patches.defer(self.apply_deferred)

    def _uninstrument(self, **kwargs: Any) -> None:
        utils.STATE.active = False
        if self._patches is not None:
            self._patches.remove()
        _threads.uninstrument_threads()
        self._fork_anchor = None  # drops the after-fork hook (weakly registered)

    def apply_deferred(self) -> bool:
        """Patch now if ``instrument()`` ran before Django was set up. True when patched."""
        patches = self._patches
        if not self.is_instrumented_by_opentelemetry or patches is None:
            return False
        if patches.applied:
            return True
        if not _patching.django_models_ready():
            return False
        self._apply()
        return True

    def _apply(self) -> None:
        assert self._patches is not None
        self._patches.apply()
        _threads.instrument_threads()  # after opentelemetry-instrument's own, if it runs
        self._fork_anchor = _ForkAnchor()
        mp_util.register_after_fork(self._fork_anchor, _patching.flush_spans_after_fork)
