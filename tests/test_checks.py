"""System checks flag configurations that break identities or locks."""

import pytest
from django.core.cache.backends.locmem import LocMemCache
from django.core.cache.backends.memcached import PyMemcacheCache
from django_q.models import Task

from otel_taskctx.checks import check_powercrud_cache, check_settings


def ids(messages):
    return [m.id for m in messages]


def test_default_test_settings_pass():
    assert check_settings() == []
    assert check_powercrud_cache() == []


def test_unknown_keys_warn(settings):
    settings.OTEL_TASKCTX = {"AUTO_INSTRUMNT": False}
    msgs = check_settings()
    assert ids(msgs) == ["otel_taskctx.W001"]
    assert "AUTO_INSTRUMNT" in msgs[0].msg


def test_not_a_dict_is_an_error(settings):
    settings.OTEL_TASKCTX = ["SIGNING_KEY"]
    assert ids(check_settings()) == ["otel_taskctx.E001"]


def test_no_secret_is_an_error(settings):
    settings.SECRET_KEY = ""
    settings.OTEL_TASKCTX = {}
    assert "otel_taskctx.E002" in ids(check_settings())
    settings.OTEL_TASKCTX = {"SIGNING_KEY": "x" * 50}
    assert "otel_taskctx.E002" not in ids(check_settings())


@pytest.mark.parametrize(
    ("backend", "what"),
    [
        ("django.core.cache.backends.locmem.LocMemCache", "lives in one process"),
        ("django.core.cache.backends.dummy.DummyCache", "stores nothing"),
    ],
)
def test_a_process_local_cache_is_a_warning_not_an_error(settings, backend, what):
    from django.core.checks import WARNING, run_checks
    from django.core.management import call_command

    settings.CACHES = {"default": {"BACKEND": backend}}
    (msg,) = check_powercrud_cache()
    assert msg.id == "otel_taskctx.W004" and msg.level == WARNING
    assert what in msg.msg and "not shared across processes" in msg.msg
    assert "'otel_taskctx.cache.DatabaseCache'" in msg.hint and "django-redis" in msg.hint
    found = [m for m in run_checks(tags=["caches"]) if m.id.startswith("otel_taskctx.")]
    # W004 says it all: no Memcached (W031) or Redis finding for a LocMemCache
    assert [(m.id, m.level) for m in found] == [("otel_taskctx.W004", WARNING)]
    call_command("check", tags=["caches"])  # a warning does not stop check, test or runserver


def test_missing_cache_alias_is_an_error(settings):
    settings.POWERCRUD_SETTINGS = {"CACHE_NAME": "locks"}
    assert ids(check_powercrud_cache()) == ["otel_taskctx.E003"]


class CacheOnItsOwnConnection:
    """Routes the cache table and the lock model to a second connection alias (like
    sample/config/routers.py)."""

    def db_for_write(self, model, **hints):
        return "runtime" if model._meta.app_label in ("django_cache", "otel_taskctx") else None

    db_for_read = db_for_write


def test_database_cache_on_the_models_connection_warns(settings):
    from otel_taskctx.checks import check_lock_visibility

    msgs = check_lock_visibility()
    assert ids(msgs) == ["otel_taskctx.W040"]  # the test settings share one connection
    assert "invisible to other processes" in msgs[0].msg
    settings.DATABASE_ROUTERS = ["tests.test_checks.CacheOnItsOwnConnection"]
    assert check_lock_visibility() == []


def test_a_redis_cache_does_not_warn_about_transactions(settings):
    from otel_taskctx.checks import check_lock_visibility

    settings.CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": "redis://127.0.0.1:6379/1",
        }
    }
    assert check_lock_visibility() == []


@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")
def test_span_database_must_exist_and_be_routed(settings):
    from otel_taskctx.checks import check_span_database
    from otel_taskctx.models import TaskSpan
    from otel_taskctx.routers import SpanStoreRouter

    assert check_span_database() == []  # not set
    settings.OTEL_TASKCTX = {"SPAN_DATABASE": "spans"}
    msgs = check_span_database()
    assert ids(msgs) == ["otel_taskctx.E005"] and "'spans'" in msgs[0].msg
    settings.DATABASES = {**settings.DATABASES, "spans": dict(settings.DATABASES["default"])}
    msgs = check_span_database()
    assert ids(msgs) == ["otel_taskctx.W050"] and "SpanStoreRouter" in msgs[0].hint
    settings.DATABASE_ROUTERS = ["otel_taskctx.routers.SpanStoreRouter"]
    assert check_span_database() == []
    # the router claims the span table only, and only for the named alias
    router = SpanStoreRouter()
    assert router.db_for_write(TaskSpan) == "spans" and router.db_for_read(TaskSpan) == "spans"
    assert router.db_for_write(Task) is None
    assert router.allow_migrate("spans", "otel_taskctx", "taskspan") is True
    assert router.allow_migrate("default", "otel_taskctx", "taskspan") is False
    assert router.allow_migrate("default", "otel_taskctx", "descendantlock") is None
    settings.OTEL_TASKCTX = {}
    assert router.db_for_write(TaskSpan) is None
    assert router.allow_migrate("default", "otel_taskctx", "taskspan") is None


class MemcacheLikeName(LocMemCache):
    """A LocMem cache whose name says 'memcache' and 'redis': names do not classify."""


class RedisMemcacheByName(MemcacheLikeName):
    pass


class MyPyMemcache(PyMemcacheCache):
    """A project's own Memcached backend: a Memcached cache by its class."""


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("django.core.cache.backends.locmem.LocMemCache", "locmem"),
        ("tests.test_checks.MemcacheLikeName", "locmem"),
        ("tests.test_checks.RedisMemcacheByName", "locmem"),
        ("django.core.cache.backends.memcached.PyMemcacheCache", "memcached"),
        ("django.core.cache.backends.memcached.PyLibMCCache", "memcached"),
        ("tests.test_checks.MyPyMemcache", "memcached"),
        ("django.core.cache.backends.redis.RedisCache", "redis"),
        ("django_redis.cache.RedisCache", "redis"),
        ("django.core.cache.backends.filebased.FileBasedCache", "filebased"),
        ("django.core.cache.backends.dummy.DummyCache", "dummy"),
        ("django.core.cache.backends.db.DatabaseCache", "database"),
        ("otel_taskctx.cache.DatabaseCache", "lock-safe"),
    ],
)
def test_caches_are_classified_by_class_not_by_name(path, kind):
    from django.utils.module_loading import import_string

    from otel_taskctx.cache import backend_kind

    assert backend_kind(import_string(path)) == kind


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("tests.test_checks.MyPyMemcache", ["otel_taskctx.W031"]),
        ("django.core.cache.backends.memcached.PyLibMCCache", ["otel_taskctx.W031"]),
        ("tests.test_checks.MemcacheLikeName", ["otel_taskctx.W004"]),  # not Memcached
        ("tests.test_checks.RedisMemcacheByName", ["otel_taskctx.W004"]),  # nor Redis
    ],
)
def test_w031_names_memcached_only(settings, path, expected):
    from otel_taskctx.checks import check_lock_eviction

    settings.CACHES = {"default": {"BACKEND": path}}  # (pymemcache/pylibmc are not installed:
    found = check_powercrud_cache() + check_lock_eviction()  # the checks build no cache object)
    assert ids(found) == expected
