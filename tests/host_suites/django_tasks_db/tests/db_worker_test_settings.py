"""Settings of the ``db_worker`` subprocesses the tests start: the test database."""

from .settings import *  # noqa: F403

TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}}

_default = DATABASES["default"]  # noqa: F405
if "TEST" in _default:  # SQLite: the test database file
    _default["NAME"] = _default["TEST"]["NAME"]
else:  # PostgreSQL: Django's test database name
    _default["NAME"] = "test_" + _default["NAME"]
