"""What every host configuration shares: a project with only Django's own apps, the tiny
app and ``otel_taskctx``; each ``<name>_settings.py`` adds its queue apps and settings."""

import os
import tempfile
from pathlib import Path

_DIR = Path(os.environ.get("TASKCTX_CONFIG_DIR") or tempfile.mkdtemp(prefix="taskctx-config-"))

SECRET_KEY = "host-config-secret-0123456789abcdef0123456789abcdef"
DEBUG = False
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(_DIR / "db.sqlite3"),
        "OPTIONS": {"timeout": 30},
    }
}
#: Django's own apps a small project has, then the tiny app; ``otel_taskctx`` is added last
BASE_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "tests.configs.tinyapp",
]
#: a cache powercrud accepts (Django's own DatabaseCache; ``createcachetable`` makes it)
DATABASE_CACHE = {
    "default": {
        "BACKEND": "django.core.cache.backends.db.DatabaseCache",
        "LOCATION": "host_cache",
    }
}
#: django-q2 on its ORM broker, with a retry longer than the timeout (as its docs ask)
Q_CLUSTER_ORM = {"name": "hostconfig", "orm": "default", "timeout": 60, "retry": 120}
