"""Cache aliases for conflict-store tests and benchmarks (and their subprocesses).

``cache_config(kind, prefix)`` returns a ``CACHES`` entry:

* ``"db"``: :class:`otel_taskctx.cache.DatabaseCache` on the default database, Django's default
  ``MAX_ENTRIES`` (300), the test cache table;
* ``"plain-db"``: Django's own ``DatabaseCache`` (culls locks: the configuration the system
  check warns about);
* ``"redis"``: django-redis on this run's Redis database (``TASKCTX_REDIS_DB``).

Each alias gets its own ``KEY_PREFIX`` so runs and tests do not see each other's keys.
``use_locks_cache(kind, prefix)`` is an ``override_settings`` that makes powercrud use it.
"""

from __future__ import annotations

import os
from typing import Any

from django.test.utils import override_settings

ALIAS = "locks"
REDIS_URL = os.environ.get("TASKCTX_REDIS_URL", "redis://127.0.0.1:6379")
REDIS_DB = int(os.environ.get("TASKCTX_REDIS_DB", "1"))


def cache_config(kind: str, prefix: str) -> dict[str, Any]:
    if kind == "db":
        return {
            "BACKEND": "otel_taskctx.cache.DatabaseCache",
            "LOCATION": "taskctx_cache",
            "KEY_PREFIX": prefix,
        }
    if kind == "plain-db":
        return {
            "BACKEND": "django.core.cache.backends.db.DatabaseCache",
            "LOCATION": "taskctx_cache",
            "KEY_PREFIX": prefix,
        }
    if kind == "redis":
        return {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": f"{REDIS_URL}/{REDIS_DB}",
            "KEY_PREFIX": prefix,
            "OPTIONS": {"CLIENT_CLASS": "django_redis.client.DefaultClient"},
        }
    raise ValueError(kind)


def use_locks_cache(kind: str, prefix: str) -> override_settings:
    from django.conf import settings

    return override_settings(
        CACHES={**settings.CACHES, ALIAS: cache_config(kind, prefix)},
        POWERCRUD_SETTINGS={**settings.POWERCRUD_SETTINGS, "CACHE_NAME": ALIAS},
    )


def wipe(kind: str) -> None:
    """Delete every key of the ``locks`` alias (its prefix only on Redis)."""
    from django.core.cache import caches

    from otel_taskctx.cache import lock_safe

    cache = lock_safe(caches[ALIAS], ALIAS)  # Django's own DatabaseCache: the lock model too
    if kind == "redis":
        cache.delete_pattern("*")
        return
    from django.core.management import call_command
    from django.db import connection

    from otel_taskctx.cache import locks

    call_command("createcachetable", verbosity=0)  # the PostgreSQL run has none yet
    prefix = cache.make_key("")
    locks().filter(cache_key__startswith=prefix).delete()
    with connection.cursor() as cursor:  # the ordinary keys: Django's cache table
        cursor.execute("DELETE FROM taskctx_cache WHERE cache_key LIKE %s", [prefix + "%"])


def lock_keys_left(kind: str, model: str) -> int:
    """How many lock keys of ``model`` exist in the ``locks`` alias (expired or not)."""
    from django.core.cache import caches

    from otel_taskctx.cache import lock_safe, locks

    cache = lock_safe(caches[ALIAS], ALIAS)
    pattern = f"powercrud:conflict:model:{model}:"
    if kind == "redis":
        return len(cache.keys(pattern + "*"))
    return locks().filter(cache_key__startswith=cache.make_key(pattern)).count()


def suffix_key(key: str, key_prefix: str, version: int) -> str:
    """A KEY_FUNCTION that does not start with the prefix: no key built by concatenation."""
    return f"{key}|{version}|{key_prefix}"
