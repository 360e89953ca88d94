"""Which optional host apps the project uses, asked of ``INSTALLED_APPS`` (docs/hosts.md):
an importable package is not one in use, and importing one that is not in use can break."""

from __future__ import annotations


def installed(*app_names: str) -> bool:
    """True when the apps are in ``INSTALLED_APPS`` (False before the registry is ready)."""
    from django.apps import apps

    return apps.apps_ready and all(map(apps.is_installed, app_names))


def django_q() -> bool:
    return installed("django_q")


def powercrud_async() -> bool:
    """powercrud's ``AsyncManager`` is usable: it imports django-q2's models."""
    return installed("powercrud", "django_q")


def django_tasks_db() -> bool:
    return installed("django_tasks_db")
