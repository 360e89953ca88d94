"""Settings of the wheel check's minimal project: one queue per run (``WHEEL_QUEUE``).

``powercrud``: powercrud's AsyncManager on django-q2; ``django-q2``: django-q2 alone;
``tasks``: Django's task framework with django-tasks-db; ``celery``: a Celery worker, its broker
on Redis (``WHEEL_REDIS_URL``). django-q2 runs as a sync cluster (jobs run in the launching
process, through django-q2's own worker code).
``WHEEL_REDIS_URL``: the cache on Redis (django-redis, key prefix ``WHEEL_CACHE_PREFIX``)
instead of the DatabaseCache; ``WHEEL_PG_DB``: PostgreSQL (127.0.0.1:5432, user postgres) instead of
SQLite.
"""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent
QUEUE = os.environ.get("WHEEL_QUEUE", "powercrud")
SECRET_KEY = "wheel-check-not-secret"
DEBUG = False
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
QUEUE_APPS = {
    "powercrud": ["django_q", "powercrud"],
    "django-q2": ["django_q"],
    "tasks": ["django_tasks_db"],
    "celery": [],
}[QUEUE]
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    *QUEUE_APPS,
    "otel_taskctx",
    "shop",
]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": BASE_DIR / "db.sqlite3",
        "OPTIONS": {"timeout": 30},
    }
}
if os.environ.get("WHEEL_PG_DB"):
    DATABASES["default"] = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ["WHEEL_PG_DB"],
        "USER": "postgres",
        "HOST": "127.0.0.1",
        "PORT": "5432",
    }
# powercrud refuses a per-process cache for its locks
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.db.DatabaseCache",
        "LOCATION": "shop_cache",
    }
}
if os.environ.get("WHEEL_REDIS_URL"):
    CACHES["default"] = {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": os.environ["WHEEL_REDIS_URL"],
        "KEY_PREFIX": os.environ.get("WHEEL_CACHE_PREFIX", "wheel-check"),
    }
if "django_q" in QUEUE_APPS:
    Q_CLUSTER = {"name": "wheel", "orm": "default", "sync": True, "timeout": 60, "retry": 120}
if QUEUE == "tasks":
    TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}}
if QUEUE == "celery":
    # the queue's keys carry the run's prefix (deleted with the cache's at the end)
    CELERY_BROKER_URL = os.environ["WHEEL_REDIS_URL"]
    CELERY_TASK_DEFAULT_QUEUE = f"{os.environ.get('WHEEL_CACHE_PREFIX', 'wheel-check')}:celery"
    (BASE_DIR / "celery-results").mkdir(exist_ok=True)
    CELERY_RESULT_BACKEND = f"file://{BASE_DIR / 'celery-results'}"
    CELERY_WORKER_ENABLE_REMOTE_CONTROL = False
    CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
