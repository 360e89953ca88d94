"""Signals otel_taskctx sends (Django signals: connect with ``@receiver``)."""

from __future__ import annotations

from django.dispatch import Signal

#: A Celery job is over: its function and every fanned-out descendant ended, its locks are
#: released and, with a result backend, its final state is stored. Keyword arguments:
#: ``task_key`` (the job's key, ``celery-<task id>``), ``task_id`` (its Celery task id),
#: ``error`` (empty on success, else what failed it); the sender is the task's name.
job_completed = Signal()
