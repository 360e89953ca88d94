"""The project django-tasks-db's tests run in (``tests`` is an app: its task module).

``HOST_SUITE_DB``: ``sqlite`` (a file, so that worker subprocesses share the test database)
or ``postgres`` (``HOST_SUITE_PG_*``, default 127.0.0.1:5432 user postgres).
``HOST_SUITE_WITH_OTEL_TASKCTX=1`` appends ``"otel_taskctx"`` to ``INSTALLED_APPS`` and
changes nothing else. Worker subprocesses inherit both through the environment.
"""

import os
import sys
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
IN_TEST = "IN_TEST" in os.environ or sys.argv[1:2] == ["test"]
SECRET_KEY = "host-suite-django-tasks-db"
ALLOWED_HOSTS = ["*"]
DEBUG = not IN_TEST
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django_tasks_db",
    "tests",
]
if os.environ.get("HOST_SUITE_WITH_OTEL_TASKCTX") == "1":
    INSTALLED_APPS.append("otel_taskctx")

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
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

if os.environ.get("HOST_SUITE_DB", "sqlite") == "postgres":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": os.environ.get("HOST_SUITE_PG_DB", "host_suite_tasks"),
            "USER": os.environ.get("HOST_SUITE_PG_USER", "postgres"),
            "HOST": os.environ.get("HOST_SUITE_PG_HOST", "127.0.0.1"),
            "PORT": os.environ.get("HOST_SUITE_PG_PORT", "5432"),
        }
    }
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(BASE_DIR / "db.sqlite3"),
            "TEST": {"NAME": str(BASE_DIR / "db-test.sqlite3")},
        }
    }

TASKS = {
    "default": {
        "BACKEND": "django_tasks_db.DatabaseBackend",
        "QUEUES": ["default", "queue-1"],
    }
}
