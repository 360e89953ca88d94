"""Django settings for the test suite.

Embedded default (no servers): SQLite file database, DatabaseCache, django-q2 ORM broker.
``TASKCTX_STACK=redis-postgres`` selects the production path: PostgreSQL
(``TASKCTX_PG_*``, default 127.0.0.1:5432 db ``test`` user ``postgres``), django-redis cache
and the Redis broker (``TASKCTX_REDIS_URL``, default redis://127.0.0.1:6379).
``TASKCTX_DB_NAME`` points a qcluster subprocess at the test database.
``TASKCTX_INSTANCE`` (default ``main``) keeps concurrent test runs on one machine apart: it
names the run directory, the PostgreSQL test database and the django-q2 cluster;
``TASKCTX_REDIS_DB`` picks the Redis database of the cache (the broker uses the next one).
"""

import json
import os
import tempfile
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent
STACK = os.environ.get("TASKCTX_STACK", "embedded")
SECRET_KEY = os.environ.get("TASKCTX_TEST_SECRET", "tests-secret-key-not-for-production")
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
ROOT_URLCONF = "tests.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_q",
    "django_tasks_db",
    "powercrud",
    "otel_taskctx",
    "tests.testapp",
    "tests.viewerapp",
    # the sample project's app (tests/test_sample*.py), with what its powercrud views need
    "django_htmx",
    "crispy_forms",
    "neapolitan",
    "sample.library",
]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django_htmx.middleware.HtmxMiddleware",  # powercrud's views read request.htmx
]

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
STATIC_URL = "/static/"

INSTANCE = os.environ.get("TASKCTX_INSTANCE", "main")
_run_dir = (
    Path(os.environ.get("TASKCTX_RUN_DIR", tempfile.gettempdir())) / f"otel-taskctx-{INSTANCE}"
)
_run_dir.mkdir(parents=True, exist_ok=True)
REDIS_URL = os.environ.get("TASKCTX_REDIS_URL", "redis://127.0.0.1:6379")
REDIS_DB = int(os.environ.get("TASKCTX_REDIS_DB", "1"))

if STACK == "redis-postgres":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": os.environ.get("TASKCTX_DB_NAME", os.environ.get("TASKCTX_PG_DB", "test")),
            "USER": os.environ.get("TASKCTX_PG_USER", "postgres"),
            "HOST": os.environ.get("TASKCTX_PG_HOST", "127.0.0.1"),
            "PORT": os.environ.get("TASKCTX_PG_PORT", "5432"),
            "TEST": {"NAME": f"taskctx_test_{INSTANCE}"},
        }
    }
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": f"{REDIS_URL}/{REDIS_DB}",
            "OPTIONS": {"CLIENT_CLASS": "django_redis.client.DefaultClient"},
        }
    }
    Q_CLUSTER = {
        "name": f"taskctx-{INSTANCE}",
        "workers": 2,
        "timeout": 60,
        "retry": 120,
        "redis": f"{REDIS_URL}/{REDIS_DB + 1}",
        "catch_up": False,
    }
elif STACK == "embedded":
    _db = str(_run_dir / "test.sqlite3")
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ.get("TASKCTX_DB_NAME", _db),
            "OPTIONS": {"timeout": 30, "transaction_mode": "IMMEDIATE"},
            "TEST": {"NAME": _db},
        }
    }
    if os.environ.get("TASKCTX_SQLITE_INIT"):  # PRAGMAs per connection (the jobs benchmark)
        DATABASES["default"]["OPTIONS"]["init_command"] = os.environ["TASKCTX_SQLITE_INIT"]
    if os.environ.get("TASKCTX_SPAN_DB"):  # the span store in an SQLite file of its own
        DATABASES["spans"] = {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ["TASKCTX_SPAN_DB"],
            "TEST": {"NAME": os.environ["TASKCTX_SPAN_DB"]},
        }
        DATABASE_ROUTERS = ["otel_taskctx.routers.SpanStoreRouter"]
        _SPAN_DATABASE = "spans"
    CACHES = {
        "default": {
            # Django's DatabaseCache, except that powercrud's locks live in a table that is
            # never culled (otel_taskctx.cache; Django's own backend drops locks at MAX_ENTRIES)
            "BACKEND": "otel_taskctx.cache.DatabaseCache",
            "LOCATION": "taskctx_cache",
        }
    }
    Q_CLUSTER = {
        "name": f"taskctx-{INSTANCE}",
        "workers": 2,
        "timeout": 60,
        "retry": 120,
        "orm": "default",
        "poll": 0.1,
        "catch_up": False,
    }
else:  # pragma: no cover - configuration error
    raise RuntimeError(f"unknown TASKCTX_STACK {STACK!r}: use 'embedded' or 'redis-postgres'")

# Celery (tests/celery_app.py, tests/celery_worker.py): the broker from TASKCTX_CELERY_BROKER,
# kombu's filesystem transport in the run dir by default (no server), Redis DB REDIS_DB + 1 on
# the production stack, or RabbitMQ; every queue and exchange name carries INSTANCE
CELERY_BROKER = os.environ.get(
    "TASKCTX_CELERY_BROKER", "redis" if STACK == "redis-postgres" else "filesystem"
)
CELERY_QUEUE = f"taskctx-{INSTANCE}"
if CELERY_BROKER == "filesystem":
    _celery_dir = _run_dir / "celery-broker"
    _celery_dir.mkdir(exist_ok=True)
    # kombu's filesystem transport, each message written whole before a worker can take it
    # (the sample's: kombu's own can hand a worker an empty file, celery/kombu#1551)
    CELERY_BROKER_URL = None
    CELERY_BROKER_TRANSPORT = "sample.config.celery_transport:Transport"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_celery_dir),
        "data_folder_out": str(_celery_dir),
        "control_folder": str(_celery_dir / "control"),
        "store_processed": False,
        "polling_interval": 0.05,
    }
elif CELERY_BROKER == "redis":
    CELERY_BROKER_URL = f"{REDIS_URL}/{REDIS_DB + 1}"
elif CELERY_BROKER == "amqp":
    CELERY_BROKER_URL = os.environ.get("TASKCTX_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
else:  # pragma: no cover - configuration error
    raise RuntimeError(f"unknown TASKCTX_CELERY_BROKER {CELERY_BROKER!r}")
CELERY_TASK_DEFAULT_QUEUE = CELERY_QUEUE
CELERY_TASK_DEFAULT_EXCHANGE = CELERY_QUEUE
CELERY_TASK_DEFAULT_ROUTING_KEY = CELERY_QUEUE
CELERY_CONTROL_EXCHANGE = f"celery-{INSTANCE}"
CELERY_EVENT_EXCHANGE = f"celeryev-{INSTANCE}"
CELERY_IMPORTS = ["tests.testapp.celery_tasks"]
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# no result backend unless a test asks for one (tests.celery_worker.result_backend())

POWERCRUD_SETTINGS = {"ASYNC_ENABLED": True, "CACHE_NAME": "default"}
# Django's task framework: django-tasks-db's backend (a real ``manage.py db_worker`` runs it)
TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}}
# tests that need other library settings in a subprocess pass them as JSON
OTEL_TASKCTX = json.loads(os.environ.get("TASKCTX_TEST_OTEL_TASKCTX", "{}"))
if globals().get("_SPAN_DATABASE"):
    OTEL_TASKCTX.setdefault("SPAN_DATABASE", _SPAN_DATABASE)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"otel_taskctx": {"handlers": ["console"], "level": "WARNING"}},
}
