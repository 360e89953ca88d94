"""The otel_taskctx app's models: the span store (docs/viewer.md, "The span store"), the lock
rows of :class:`otel_taskctx.cache.LockCache` (docs/conflicts.md, *Storage*), the fan-out
barrier and the carriers of queued ``django.tasks`` tasks."""

from __future__ import annotations

from typing import Any

from django.db import models

#: nanoseconds in an hour: ``start_hour`` is ``start_ns`` divided by it (integer division)
HOUR_NS = 3_600 * 10**9


def hour_of(start_ns: int) -> int:
    """The hour since the epoch (``start_hour``) a span starting at ``start_ns`` belongs to."""
    return int(start_ns) // HOUR_NS


class HourField(models.BigIntegerField):
    """``start_hour``, set from ``start_ns`` whenever the ORM writes the row. (Not a
    ``GeneratedField``: Django checks those against PostgreSQL in every management command.)"""

    def pre_save(self, model_instance: Any, add: bool) -> Any:
        start = model_instance.start_ns
        setattr(model_instance, self.attname, None if start is None else hour_of(start))
        return getattr(model_instance, self.attname)


class TaskSpan(models.Model):
    STATUS_UNSET = "unset"
    STATUS_OK = "ok"
    STATUS_ERROR = "error"
    STATUS_CHOICES = [(STATUS_UNSET, "unset"), (STATUS_OK, "ok"), (STATUS_ERROR, "error")]

    trace_id = models.CharField(max_length=32)
    span_id = models.CharField(max_length=16)
    parent_span_id = models.CharField(max_length=16, blank=True, default="")
    name = models.CharField(max_length=255)
    kind = models.CharField(max_length=16, default="INTERNAL")
    start_ns = models.BigIntegerField()
    #: hours since the epoch the span started in (from ``start_ns``; see :class:`HourField`)
    start_hour = HourField(editable=False)
    end_ns = models.BigIntegerField(null=True, blank=True)
    started_at = models.DateTimeField(db_index=True)
    status = models.CharField(max_length=8, choices=STATUS_CHOICES, default=STATUS_UNSET)
    status_message = models.TextField(blank=True, default="")
    attributes = models.JSONField(default=dict, blank=True)
    events = models.JSONField(default=list, blank=True)
    links = models.JSONField(default=list, blank=True)
    task_key = models.CharField(max_length=200, null=True, blank=True)
    root_task_key = models.CharField(max_length=200, null=True, blank=True)
    user_id = models.CharField(max_length=150, null=True, blank=True)
    user_label = models.CharField(max_length=255, blank=True, default="")
    descendants_count = models.IntegerField(default=0)
    manager = models.CharField(max_length=255, blank=True, default="")
    service = models.CharField(max_length=255, blank=True, default="")
    process = models.CharField(max_length=255, blank=True, default="")

    class Meta:
        app_label = "otel_taskctx"
        db_table = "otel_taskctx_span"
        verbose_name = "task span"
        constraints = [
            models.UniqueConstraint(
                fields=["start_hour", "trace_id", "span_id"], name="otel_taskctx_span_key"
            ),
        ]
        # few indexes: every span written pays for each. (A plain index on user_id, without
        # the text-pattern twin ``db_index`` adds on PostgreSQL: searches use icontains.)
        indexes = [
            models.Index(
                fields=["start_hour", "root_task_key", "start_ns"], name="otel_taskctx_span_hroot"
            ),
            models.Index(fields=["user_id"], name="otel_taskctx_span_user"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.trace_id}/{self.span_id})"

    @property
    def running(self) -> bool:
        return self.end_ns is None


class DescendantLock(models.Model):
    cache_key = models.CharField(max_length=255, primary_key=True)
    value = models.TextField()
    expires = models.DateTimeField(db_index=True)

    class Meta:
        app_label = "otel_taskctx"
        db_table = "otel_taskctx_lock"
        verbose_name = "descendant lock"

    def __str__(self) -> str:
        return self.cache_key


class FanOutChild(models.Model):
    """The fan-out barrier in the database: a row per child of the job ``job_key``, and the
    job's own end as a row ``task_id="(job)"`` (``result_id``: its ``django.tasks`` result)."""

    class State(models.TextChoices):
        PENDING = "pending"
        DONE = "done"
        FAILED = "failed"

    job_key = models.CharField(max_length=200, db_index=True)
    task_id = models.CharField(max_length=64, blank=True, default="", db_index=True)
    func = models.CharField(max_length=255, blank=True, default="")
    state = models.CharField(
        max_length=10, choices=State.choices, default=State.PENDING, db_index=True
    )
    error = models.TextField(blank=True, default="")
    result_id = models.CharField(max_length=64, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        app_label = "otel_taskctx"
        db_table = "otel_taskctx_fan_out"
        verbose_name = "fan-out child"

    def __str__(self) -> str:
        return f"{self.job_key} <- {self.task_id or '(the job itself)'}: {self.state}"


class TaskCarrier(models.Model):
    """The carrier of a queued ``django.tasks`` task, beside it (never in its arguments),
    written with the task's row; ``fan_out`` names a fanned-out child's barrier record."""

    result_id = models.CharField(max_length=64, primary_key=True)
    carrier = models.JSONField()
    fan_out = models.CharField(max_length=64, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        app_label = "otel_taskctx"
        db_table = "otel_taskctx_task_carrier"
        verbose_name = "task carrier"

    def __str__(self) -> str:
        return self.result_id
