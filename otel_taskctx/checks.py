"""Django system checks for configurations that would break locks or identities."""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.checks import Error, Tags, Warning, register

from otel_taskctx.conf import DEFAULTS, user_settings


@register(Tags.compatibility)
def check_settings(app_configs=None, **kwargs):
    problems = []
    raw = getattr(settings, "OTEL_TASKCTX", None)
    if raw is not None and not isinstance(raw, dict):
        problems.append(
            Error("OTEL_TASKCTX must be a dict.", id="otel_taskctx.E001", obj="OTEL_TASKCTX")
        )
        return problems
    unknown = sorted(set(user_settings()) - set(DEFAULTS))
    if unknown:
        problems.append(
            Warning(
                f"Unknown OTEL_TASKCTX keys: {', '.join(unknown)}.",
                hint=f"Known keys: {', '.join(sorted(DEFAULTS))}.",
                id="otel_taskctx.W001",
            )
        )
    try:
        secret = user_settings().get("SIGNING_KEY") or settings.SECRET_KEY
    except ImproperlyConfigured:  # Django refuses to hand out an empty SECRET_KEY
        secret = None
    if not secret:
        problems.append(
            Error(
                "otel_taskctx cannot sign task identities: no SECRET_KEY or "
                "OTEL_TASKCTX['SIGNING_KEY'].",
                id="otel_taskctx.E002",
            )
        )
    return problems


@register(Tags.caches)
def check_powercrud_cache(app_configs=None, **kwargs):
    try:
        from powercrud.conf import get_powercrud_setting
    except Exception:  # powercrud not installed: nothing to check
        return []
    alias = get_powercrud_setting("CACHE_NAME", "default")
    caches = getattr(settings, "CACHES", {})
    if alias not in caches:
        return [
            Error(
                f"powercrud's cache alias {alias!r} is not in CACHES; descendant locks need it.",
                id="otel_taskctx.E003",
            )
        ]
    backend = str(caches[alias].get("BACKEND", "")).lower()
    if "locmem" in backend or "dummy" in backend:
        return [
            Error(
                f"Cache {alias!r} ({caches[alias]['BACKEND']}) is process-local: locks taken in a "
                "worker would be invisible to the web process.",
                hint="Use django.core.cache.backends.db.DatabaseCache or django_redis.",
                id="otel_taskctx.E004",
            )
        ]
    return []
