"""The minimal Django project of the run with ``otel_taskctx``: the app and its tables."""

import os

SECRET_KEY = "host-suite-celery"
USE_TZ = True
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "otel_taskctx"]
DATABASES = {
    "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.environ["HOST_SUITE_DB"]}
}
