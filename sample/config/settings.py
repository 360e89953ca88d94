"""Settings of the otel-taskctx sample project.

With no environment set, the project is self-contained (the *embedded* default): two SQLite
files under ``sample/var/`` (``sample.sqlite3``: the data and django-q2's ORM broker;
``runtime.sqlite3``: the DatabaseCache with powercrud's locks, progress and the sessions, and
otel_taskctx's span store). Nothing else runs.

Environment variables (all optional):

=========================  ===================================================================
``SAMPLE_DATABASE_URL``    ``postgres://user:password@host:port/name``: PostgreSQL instead of
                           SQLite (the database is created by ``taskctx_demo`` if missing)
``SAMPLE_REDIS_URL``       ``redis://host:port/db``: django-redis cache and django-q2's Redis
                           broker instead of the DatabaseCache and the ORM broker
``SAMPLE_VAR_DIR``         folder of the SQLite files and the cluster log (``sample/var``)
``SAMPLE_SAVE_DELAY``      seconds each descendant update sleeps, so progress is visible (0.05)
``SAMPLE_CLUSTER_NAME``    django-q2 cluster name (``otel-taskctx-sample``)
``SAMPLE_WORKERS``         django-q2 worker processes (2)
``SAMPLE_INSTRUMENT``      ``0`` turns otel_taskctx's worker instrumentation off, to see what
                           powercrud does without it (the demo then fails, and says why)
``SAMPLE_DEBUG``           ``0`` turns Django's DEBUG off (on by default: it is a sample)
``SAMPLE_SECRET_KEY``      Django's SECRET_KEY (also signs the task identities)
``SAMPLE_CELERY_BROKER_URL`` Celery's broker (``redis://...``, ``amqp://...``) instead of kombu's
                           filesystem transport under the run directory
``SAMPLE_CELERY_QUEUE``    Celery's queue (the cluster name)
=========================  ===================================================================
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

SAMPLE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("SAMPLE_VAR_DIR") or SAMPLE_DIR / "var").resolve()
VAR_DIR.mkdir(parents=True, exist_ok=True)

SECRET_KEY = os.environ.get("SAMPLE_SECRET_KEY", "sample-project-insecure-key-do-not-deploy")
DEBUG = os.environ.get("SAMPLE_DEBUG", "1").lower() not in {"0", "false", "no", "off"}
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]", "testserver"]
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "sample.config.urls"
WSGI_APPLICATION = "sample.config.wsgi.application"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_htmx",
    "crispy_forms",  # powercrud's templates load its tag library (the sample does not use it)
    "neapolitan",
    "powercrud",
    "django_q",
    "django_tasks_db",
    "otel_taskctx",
    "sample.library",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
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
                "sample.library.context_processors.sample",
            ]
        },
    }
]

STATIC_URL = "/static/"
# powercrud's packaged front-end bundle (HTMX, Tom Select, Tippy, DaisyUI); see library/templatetags
from importlib import resources  # noqa: E402

STATICFILES_DIRS = [str(resources.files("powercrud").joinpath("assets"))]

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"


def _postgres(url: str) -> dict:
    parts = urlsplit(url)
    if parts.scheme not in {"postgres", "postgresql"}:
        raise RuntimeError(f"SAMPLE_DATABASE_URL must be postgres://..., got {parts.scheme!r}")
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parts.path.lstrip("/")) or "otel_taskctx_sample",
        "USER": unquote(parts.username or "postgres"),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "127.0.0.1",
        "PORT": str(parts.port or 5432),
    }


def _sqlite(path: Path) -> dict:
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(path),
        "OPTIONS": {
            "timeout": 30,
            "transaction_mode": "IMMEDIATE",
            # readers never wait for the worker's long bulk-update transaction
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        },
    }


DATABASE_URL = os.environ.get("SAMPLE_DATABASE_URL", "").strip()
REDIS_URL = os.environ.get("SAMPLE_REDIS_URL", "").strip()
STACK = ("postgres" if DATABASE_URL else "sqlite") + ("+redis" if REDIS_URL else "")

DATABASES = {
    "default": _postgres(DATABASE_URL) if DATABASE_URL else _sqlite(VAR_DIR / "sample.sqlite3")
}

Q_CLUSTER = {
    "name": os.environ.get("SAMPLE_CLUSTER_NAME", "otel-taskctx-sample"),
    "workers": int(os.environ.get("SAMPLE_WORKERS", "2")),
    "timeout": 600,
    "retry": 900,
    "max_attempts": 1,
    "catch_up": False,
    "poll": 0.1,
}

# The "runtime" database: what several processes write while a job's transaction is open
# (powercrud's locks and progress in the DatabaseCache, its dashboard rows, otel_taskctx's lock
# table and span store). powercrud runs a bulk update in one database transaction; progress or locks written
# through that transaction would stay invisible to the browser and to other jobs until the job
# ends, so they go through a connection of their own. On SQLite it is also a file of its own,
# so these writes never wait for the job's write lock.
RUNTIME_DB = "runtime"
RUNTIME_DB_SEPARATE = not DATABASE_URL  # PostgreSQL: a second connection to the same database
DATABASES[RUNTIME_DB] = (
    dict(DATABASES["default"]) if DATABASE_URL else _sqlite(VAR_DIR / "runtime.sqlite3")
)
DATABASE_ROUTERS = ["sample.config.routers.RuntimeRouter"]

if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": "sample",
            "OPTIONS": {"CLIENT_CLASS": "django_redis.client.DefaultClient"},
        }
    }
    Q_CLUSTER["redis"] = REDIS_URL
else:
    CACHES = {
        "default": {
            # Django's DatabaseCache, except that powercrud's lock keys live in a table that
            # is never culled (otel_taskctx_lock)
            "BACKEND": "otel_taskctx.cache.DatabaseCache",
            "LOCATION": "sample_cache",
        }
    }
    Q_CLUSTER["orm"] = "default"

SESSION_ENGINE = "django.contrib.sessions.backends.cache"

# Django's task framework, run by django-tasks-db's ``manage.py db_worker``
# (``manage.py taskctx_tasks_demo``)
TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}}

POWERCRUD_SETTINGS = {
    "ASYNC_ENABLED": True,
    "CACHE_NAME": "default",
    "ASYNC_MANAGER_DEFAULT": {"manager_class": "sample.library.async_manager.SampleAsyncManager"},
    "QCLUSTER_PROBE_TIMEOUT_MS": 2000,
}

# SAMPLE_INSTRUMENT=0 runs the sample without the worker instrumentation: the way powercrud
# behaves on its own (nested jobs escape to the queue; the demo shows it and fails)
# the viewer's pages inside the sample's own (its navigation): docs/viewer.md
OTEL_TASKCTX: dict = {"VIEWER_BASE_TEMPLATE": "library/base.html"}
if os.environ.get("SAMPLE_INSTRUMENT", "1").lower() in {"0", "false", "no", "off"}:
    OTEL_TASKCTX["AUTO_INSTRUMENT"] = False
# SAMPLE_FAN_OUT=1: Album.save()'s nested repricing job runs on other workers (fan-out), and
# the bulk edit ends when the last of them has (manage.py taskctx_fan_out_demo); likewise each
# book's nested publish_book task of the django.tasks job (manage.py taskctx_tasks_demo)
if os.environ.get("SAMPLE_FAN_OUT", "0").lower() in {"1", "true", "yes", "on"}:
    OTEL_TASKCTX["FAN_OUT"] = [
        "sample.library.tasks.reprice_album_tracks",
        "sample.library.django_tasks.publish_book",
    ]

# Celery (the app: sample/config/celery.py; manage.py taskctx_celery_demo; docs/celery.md).
# The embedded default needs no server: kombu's filesystem transport and Celery's file://
# result backend, in folders under the run directory. SAMPLE_CELERY_BROKER_URL picks a real
# broker instead (redis://..., amqp://...). The queue's name is the cluster's: several
# checkouts can share one broker.
CELERY_DIR = VAR_DIR / "celery"
CELERY_BROKER_URL = os.environ.get("SAMPLE_CELERY_BROKER_URL", "").strip() or None
if CELERY_BROKER_URL is None:
    # kombu's filesystem transport, each message renamed into place once written
    CELERY_BROKER_TRANSPORT = "sample.config.celery_transport:Transport"
    for _folder in ("queue", "control"):
        (CELERY_DIR / _folder).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(CELERY_DIR / "queue"),
        "data_folder_out": str(CELERY_DIR / "queue"),
        "control_folder": str(CELERY_DIR / "control"),
        "polling_interval": 0.1,  # seconds between looks at an empty queue folder
    }
(CELERY_DIR / "results").mkdir(parents=True, exist_ok=True)
CELERY_RESULT_BACKEND = f"file://{CELERY_DIR / 'results'}"
CELERY_RESULT_EXTENDED = True  # a result names its task and worker (the demo checks them)
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("SAMPLE_CELERY_QUEUE") or Q_CLUSTER["name"]
# remote control and events on exchanges of the same name (a shared broker)
CELERY_CONTROL_EXCHANGE = CELERY_TASK_DEFAULT_QUEUE
CELERY_EVENT_EXCHANGE = f"{CELERY_TASK_DEFAULT_QUEUE}.events"
CELERY_WORKER_PREFETCH_MULTIPLIER = 1  # a pool process takes one task at a time
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

#: seconds each descendant update sleeps (so that progress is visible in the demo and the UI)
SAMPLE_SAVE_DELAY = float(os.environ.get("SAMPLE_SAVE_DELAY", "0.05"))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain"},
        # powercrud's async manager forces its logger to DEBUG: filter at the handler
        "warnings": {"class": "logging.StreamHandler", "formatter": "plain", "level": "WARNING"},
    },
    "loggers": {
        "otel_taskctx": {"handlers": ["console"], "level": "WARNING", "propagate": False},
        "sample": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "powercrud": {"handlers": ["warnings"], "level": "WARNING", "propagate": False},
        "django-q": {"handlers": ["console"], "level": "INFO", "propagate": False},
    },
}


def _tracing() -> None:
    """The sample's own spans (``sample.library``'s steps) are recorded and stored: a project
    sets up its tracer provider (otel_taskctx never does; its processors join this one)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(TracerProvider())  # (unless opentelemetry-instrument did)


_tracing()
