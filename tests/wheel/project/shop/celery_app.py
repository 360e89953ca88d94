"""The wheel check's Celery app: its settings are the ``CELERY_*`` names of site_settings
(the broker on Redis); Celery's Django fix-up sets Django up in the worker."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "site_settings")

app = Celery("shop", include=["shop.ctasks"])
app.config_from_object("django.conf:settings", namespace="CELERY")
