"""The test suite's Celery app: configured from Django's settings (``CELERY_*``), its tasks
in :mod:`tests.testapp.celery_tasks`. A real worker runs it (tests/celery_worker.py)."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

app = Celery(f"taskctx-{os.environ.get('TASKCTX_INSTANCE', 'main')}")
app.config_from_object("django.conf:settings", namespace="CELERY")
