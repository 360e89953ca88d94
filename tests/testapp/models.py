"""Models used by the tests: a parent with descendants, with int, str and UUID keys."""

import uuid

from django.db import models


class Parent(models.Model):
    name = models.CharField(max_length=100)
    status = models.CharField(max_length=20, default="draft")


class Child(models.Model):
    parent = models.ForeignKey(Parent, related_name="children", on_delete=models.CASCADE)
    status = models.CharField(max_length=20, default="draft")


class Tag(models.Model):
    code = models.CharField(max_length=20, primary_key=True)


class Document(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    title = models.CharField(max_length=100, default="")


# --------------------------------------------------------------------------- instrumentation
# Models for the worker instrumentation tests (tests/test_instrumentation*.py): an invoice
# whose save() launches a nested job for its lines, powercrud style, and a table where task
# code writes down what it saw while it ran (the test process reads it afterwards).


class Observation(models.Model):
    """Something a task saw while running: ``kind``, the task it ran as, a JSON value."""

    kind = models.CharField(max_length=50)
    task_key = models.CharField(max_length=300, blank=True, default="")
    value = models.JSONField(default=dict)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["pk"]

    @classmethod
    def record(cls, kind, value=None, task_key=""):
        return cls.objects.create(kind=kind, task_key=task_key or "", value=value or {})


def _seen_context():
    """The task as otel_taskctx and as powercrud's own async_context see it."""
    from powercrud import async_context

    from otel_taskctx import current_task

    identity = current_task()
    pc = async_context.get_current_task()
    return {
        "task_key": identity.task_key if identity else None,
        "powercrud_task": pc.task_name if pc else None,
        "powercrud_skip_nested": async_context.skip_nested_async(),
    }


class Invoice(models.Model):
    """A parent whose save() launches a nested job that updates its lines (powercrud style).

    The launch is unconditional, as in code written before nested jobs were a concern:
    inside a task, the instrumentation runs it inline under the parent's task key.
    ``fail_lines`` makes the nested step raise on the second line.
    """

    number = models.CharField(max_length=40)
    status = models.CharField(max_length=20, default="draft")
    fail_lines = models.BooleanField(default=False)

    def save(self, *args, **kwargs):
        super().save(*args, **kwargs)
        if self.status == "draft":
            return
        Observation.record("invoice_save", {"invoice": self.pk, **_seen_context()})
        line_ids = set(self.lines.values_list("pk", flat=True))
        if not line_ids:
            return
        from powercrud.async_manager import AsyncManager

        self.nested_launch_id = AsyncManager().launch_async_task(
            "tests.testapp.tasks.update_invoice_lines",
            self.pk,
            self.status,
            conflict_ids={"testapp.invoiceline": line_ids},
        )

    def delete(self, *args, **kwargs):
        Observation.record("invoice_delete", {"invoice": self.pk, **_seen_context()})
        return super().delete(*args, **kwargs)


class InvoiceLine(models.Model):
    invoice = models.ForeignKey(Invoice, related_name="lines", on_delete=models.CASCADE)
    status = models.CharField(max_length=20, default="draft")
    updated_at = models.DateTimeField(null=True, blank=True)
    #: task key holding this line's lock while the nested step updated it
    lock_holder = models.CharField(max_length=300, blank=True, default="")
    #: current_task() seen by the nested step: task key and depth
    seen_task_key = models.CharField(max_length=300, blank=True, default="")
    seen_depth = models.IntegerField(null=True, blank=True)
