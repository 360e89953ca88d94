"""Settings: one dict, ``settings.OTEL_TASKCTX``. Every key is optional.

==========================  =========================================================
key                         meaning (default)
==========================  =========================================================
SIGNING_KEY                 secret that signs task identities (None: ``SECRET_KEY``)
SIGNING_KEY_FALLBACKS       older secrets that still verify, for rotation
                            (None: ``SECRET_KEY_FALLBACKS``)
IDENTITY_TTL                seconds a signed identity stays valid (86400)
AUTO_INSTRUMENT             instrument django-q2 and powercrud in ``ready()`` (True)
FILTER_GLOBAL_PROPAGATOR    keep the identity off the global propagator (True)
ENQUEUE_NESTED              dotted function paths that are still enqueued when launched
                            inside a task, e.g. e-mail sending (``[]``)
SPAN_PROCESSOR              add ``TaskContextSpanProcessor`` to the tracer provider (True)
SPAN_STORE                  store finished spans in the database for the viewer (True)
SPAN_DATABASE               database alias of the span store, with
                            ``otel_taskctx.routers.SpanStoreRouter`` (None: the router's
                            choice, usually "default")
SPAN_RETENTION_DAYS         age after which ``taskctx_prune`` deletes stored spans (7)
MAX_ATTRIBUTE_LENGTH        longest stored span attribute value, in characters (4096)
PROGRESS_MIN_INTERVAL       seconds between two progress writes of one task (0.25)
LOCK_TTL                    seconds a descendant lock lives without refresh
                            (None: powercrud's ``CONFLICT_TTL``)
LOCK_REFRESH_INTERVAL       seconds between lock TTL refreshes while a job runs (60)
VIEWER_PERMISSION           "staff", "superuser" or a permission codename ("staff")
VIEWER_TASK_FILTER          dotted path of ``f(request, spans) -> spans`` scoping the trees
                            a non-superuser may see (None: the jobs they launched)
VIEWER_BASE_TEMPLATE        template the viewer pages extend ("otel_taskctx/base.html")
EXPORT_FROM_ENV             honour ``OTEL_TRACES_EXPORTER``/``OTEL_EXPORTER_OTLP_*`` on a
                            tracer provider otel_taskctx created (True)
NESTED_POLICY               what a nested launch inside a job does: "inline" (run it now, under
                            the job's key) or "fan_out" (a child job on another worker; the
                            job ends when its last child has) ("inline"); a function's
                            ``@fan_out`` / ``@run_inline`` wins over it and FAN_OUT
FAN_OUT                     dotted function paths that fan out under the "inline" policy (``[]``)
FAN_OUT_TIMEOUT             seconds after which a fanned-out child with no result fails its
                            job (3600; 0: never)
FAN_OUT_SWEEP_INTERVAL      seconds between two sweeps for lost children, in each process that
                            launched, ran or waits for fan-out work while any is pending (10)
DJANGO_TASKS                instrument Django's task framework (``django.tasks``) too (True)
DJANGO_TASKS_TRACE_CONTEXT  carry a root ``django.tasks`` task's trace context to its
                            ``db_worker`` (a row beside the task, one read per task) (False)
TASKS_CACHE                 cache alias of the locks and progress of ``django.tasks`` tasks
                            (None: powercrud's ``CACHE_NAME``, else "default")
==========================  =========================================================
"""

from __future__ import annotations

from typing import Any

DEFAULTS: dict[str, Any] = {
    "SIGNING_KEY": None,
    "SIGNING_KEY_FALLBACKS": None,
    "IDENTITY_TTL": 24 * 3600,
    "AUTO_INSTRUMENT": True,
    "FILTER_GLOBAL_PROPAGATOR": True,
    "ENQUEUE_NESTED": [],
    "SPAN_PROCESSOR": True,
    "SPAN_STORE": True,
    "SPAN_DATABASE": None,
    "SPAN_RETENTION_DAYS": 7,
    "MAX_ATTRIBUTE_LENGTH": 4096,
    "PROGRESS_MIN_INTERVAL": 0.25,
    "LOCK_TTL": None,
    "LOCK_REFRESH_INTERVAL": 60,
    "VIEWER_PERMISSION": "staff",
    "VIEWER_TASK_FILTER": None,
    "VIEWER_BASE_TEMPLATE": "otel_taskctx/base.html",
    "EXPORT_FROM_ENV": True,
    "NESTED_POLICY": "inline",
    "FAN_OUT": [],
    "FAN_OUT_TIMEOUT": 3600,
    "FAN_OUT_SWEEP_INTERVAL": 10,
    "DJANGO_TASKS": True,
    "DJANGO_TASKS_TRACE_CONTEXT": False,
    "TASKS_CACHE": None,
}


def user_settings() -> dict[str, Any]:
    from django.conf import settings

    value = getattr(settings, "OTEL_TASKCTX", None) or {}
    if not isinstance(value, dict):
        return {}
    return value


def get_setting(name: str) -> Any:
    if name not in DEFAULTS:
        raise KeyError(f"unknown otel_taskctx setting {name!r}")
    return user_settings().get(name, DEFAULTS[name])


def signing_settings() -> tuple[str, list[str], int]:
    """``(secret, fallbacks, ttl)`` for :mod:`otel_taskctx.identity`."""
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    try:
        secret = get_setting("SIGNING_KEY") or settings.SECRET_KEY
    except ImproperlyConfigured:
        secret = None
    fallbacks = get_setting("SIGNING_KEY_FALLBACKS")
    if fallbacks is None:
        fallbacks = list(getattr(settings, "SECRET_KEY_FALLBACKS", []) or [])
    return secret, list(fallbacks), int(get_setting("IDENTITY_TTL"))
