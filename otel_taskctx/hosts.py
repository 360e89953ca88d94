"""Which optional host pieces this project uses: asked of Django's app registry.

A package importable in the environment is not a package the project uses: django-tasks-db
installed for another settings module, powercrud pulled in by a dependency, django-q2 without
``Q_CLUSTER``. Importing their models (or, for django-q2, its ``conf`` module, which warns
about ``retry``/``timeout`` at import) in such a project breaks or changes its start. So every
optional piece is detected with ``apps.is_installed()`` and imported only when it says yes.
"""

from __future__ import annotations

DJANGO_Q = "django_q"
POWERCRUD = "powercrud"
DJANGO_TASKS_DB = "django_tasks_db"


def installed(app_name: str) -> bool:
    """True when ``app_name`` is in ``INSTALLED_APPS`` (False before the registry is ready)."""
    from django.apps import apps

    if not apps.apps_ready:
        return False
    return apps.is_installed(app_name)


def django_q() -> bool:
    """django-q2 is in ``INSTALLED_APPS``: its ``async_task`` and signals are in use."""
    return installed(DJANGO_Q)


def powercrud_async() -> bool:
    """powercrud's ``AsyncManager`` can be used: powercrud and django-q2 (which its
    ``async_manager`` module imports the models of) are both in ``INSTALLED_APPS``."""
    return installed(POWERCRUD) and installed(DJANGO_Q)


def django_tasks_db() -> bool:
    """django-tasks-db's ``DBTaskResult`` model is in use."""
    return installed(DJANGO_TASKS_DB)
