"""The span store: one row per span, written by :mod:`otel_taskctx.spans`.

A row is inserted when a long-running span starts (``end_ns`` NULL: "running") and completed
(upserted on ``(start_ns, span_id)``) when the span ends. Times are nanoseconds since the epoch
as the OpenTelemetry SDK reports them; ``started_at`` repeats the start as a datetime for
retention and listing.

Indexes cost every span written, and an index on a random key (a trace id, a task key) costs
most: once it is larger than a batch, each new row dirties a page of its own in it (on SQLite
a 4 KB page written to the journal and again at the checkpoint, per index, per row). So the
span's key starts with its start time (new rows land at the end of that index), job trees are
found by their root task key (the one random index every span pays for), and spans are found
by trace id only among those the viewer looks them up for: spans outside any task (the
request that launched a job) and enqueues (PRODUCER spans, one per job, which link a job to the
job that launched it).
"""

from __future__ import annotations

from django.db import models

#: the columns of a span's unique key (the writer's upsert target)
SPAN_KEY = ("start_ns", "span_id")
#: the spans in the by-trace index (a query must repeat this condition to use it): spans
#: outside any task (e.g. the request that launched a job) and enqueues of jobs
LINKING_SPANS = models.Q(root_task_key__isnull=True) | models.Q(kind="PRODUCER")


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
            # the upsert's key: (start_ns, span_id) identifies a span as well as
            # (trace_id, span_id) does (a span id is 64 random bits) and is written in order
            models.UniqueConstraint(fields=list(SPAN_KEY), name="otel_taskctx_span_key"),
        ]
        # few indexes: every span written pays for each. (A plain index on user_id, without
        # the text-pattern twin ``db_index`` adds on PostgreSQL: searches use icontains.)
        indexes = [
            models.Index(fields=["root_task_key", "start_ns"], name="otel_taskctx_span_root"),
            models.Index(fields=["user_id"], name="otel_taskctx_span_user"),
            # by trace: only the spans the viewer looks up by trace (see LINKING_SPANS)
            models.Index(
                fields=["trace_id", "span_id"],
                name="otel_taskctx_span_link",
                condition=LINKING_SPANS,
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.trace_id}/{self.span_id})"

    @property
    def running(self) -> bool:
        return self.end_ns is None
