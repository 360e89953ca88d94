"""Settings: one dict, ``settings.OTEL_TASKCTX``; every key optional (docs/core.md#settings)."""

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

    value = getattr(settings, "OTEL_TASKCTX", None)
    return value if isinstance(value, dict) else {}


def get_setting(name: str) -> Any:
    if name not in DEFAULTS:
        raise KeyError(f"unknown otel_taskctx setting {name!r}")
    return user_settings().get(name, DEFAULTS[name])
