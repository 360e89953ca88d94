"""OpenTelemetry instrumentation carrying task identity through django-q2, powercrud and
``django.tasks`` (see docs/instrumentation.md).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
from opentelemetry.instrumentation.taskctx import patching, threads
from opentelemetry.instrumentation.taskctx.package import _instruments
from opentelemetry.instrumentation.taskctx.tracing import STATE
from opentelemetry.instrumentation.taskctx.version import __version__

from otel_taskctx.tracer_provider import TASKCTX_TRACER_PROVIDER

log = logging.getLogger("otel_taskctx.instrumentation")

__all__ = ["TaskContextInstrumentor", "__version__"]


class TaskContextInstrumentor(BaseInstrumentor):
    """Carries task identity and trace context through django-q2 and powercrud."""

    _patches: patching.Patches | None = None

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def _instrument(self, **kwargs: Any) -> None:
        # none given: ours, which follows the host's global provider once set (never set)
        provider = kwargs.get("tracer_provider") or TASKCTX_TRACER_PROVIDER
        STATE.tracer_provider = provider
        STATE.tracer = trace.get_tracer(
            __name__,
            __version__,
            provider,
            schema_url="https://opentelemetry.io/schemas/1.11.0",
        )
        STATE.active = True
        self._patches = patching.Patches()
        if patching.django_models_ready():
            try:
                self._apply()
            except BaseException:  # nothing is patched (Patches.apply undid it): not active
                STATE.active = False
                raise
        else:
            self._patches.defer(self.apply_deferred)

    def _uninstrument(self, **kwargs: Any) -> None:
        STATE.active = False
        if self._patches is not None:
            self._patches.remove()
        threads.uninstrument_threads()

    def apply_deferred(self) -> bool:
        """Patch now if ``instrument()`` ran before Django was set up. True when patched."""
        patches = self._patches
        if not self.is_instrumented_by_opentelemetry or patches is None:
            return False
        if patches.applied:
            return True
        if not patching.django_models_ready():
            return False
        self._apply()
        return True

    def _apply(self) -> None:
        assert self._patches is not None
        self._patches.apply()
        threads.instrument_threads()  # after opentelemetry-instrument's own, if it runs
