"""The sample's Celery app (``celery -A sample.config.celery worker``; docs/celery.md).

Its settings are the ``CELERY_*`` names in ``sample/config/settings.py``: by default kombu's
filesystem transport and Celery's ``file://`` result backend, both in folders under the sample's
run directory (``SAMPLE_VAR_DIR``), so a worker needs no server. Celery's Django fix-up sets
Django up in the worker; nothing else of the sample imports this module except its Celery tasks
(``sample.library.celery_tasks``) and the Celery demo, so the django-q2 and ``django.tasks``
parts of the sample never import Celery.
"""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sample.config.settings")

app = Celery("sample", include=["sample.library.celery_tasks"])
app.config_from_object("django.conf:settings", namespace="CELERY")
