"""Job functions for the instrumentation tests. They write down what they saw as
:class:`~tests.testapp.models.Observation` rows, which the test process reads afterwards."""

from __future__ import annotations

import os
import time

from django.utils import timezone
from opentelemetry import baggage

from otel_taskctx import current_task


def _context_snapshot() -> dict:
    from powercrud.async_context import get_current_task

    identity = current_task()
    pc = get_current_task()
    return {
        "task_key": identity.task_key if identity else None,
        "manager": identity.manager_class_path if identity else None,
        "depth": identity.depth if identity else None,
        "root": identity.root_task_key if identity else None,
        "parent": identity.parent_task_key if identity else None,
        "powercrud_task": pc.task_name if pc else None,
        "baggage": sorted(baggage.get_all()),
        "pid": os.getpid(),
    }


def _lock_holder(manager, label: str, pk) -> str:
    return manager.cache.get(f"{manager.conflict_model_prefix}{label}:{pk}") or ""


def update_invoice_lines(invoice_id, status, task_key=None, **kwargs):
    """The nested job an Invoice's save() launches: update every line, report progress."""
    from powercrud.async_manager import AsyncManager

    from tests.testapp.models import Invoice

    manager = AsyncManager()
    identity = current_task()
    invoice = Invoice.objects.get(pk=invoice_id)
    lines = list(invoice.lines.order_by("pk"))
    for n, line in enumerate(lines, 1):
        if invoice.fail_lines and n == 2:
            raise ValueError(f"line {line.pk} of invoice {invoice.number} refused")
        line.status = status
        line.updated_at = timezone.now()
        line.lock_holder = _lock_holder(manager, "testapp.invoiceline", line.pk)
        line.seen_task_key = identity.task_key if identity else ""
        line.seen_depth = identity.depth if identity else None
        line.save()
        if task_key:
            manager.update_progress(task_key, f"invoice {invoice.number}: line {n}/{len(lines)}")
    return len(lines)


def approve_invoices(invoice_ids, task_key=None, **kwargs):
    """A parent job: approve invoices one by one (each save() launches a nested job)."""
    from powercrud.async_manager import AsyncManager

    from tests.testapp.models import Invoice, Observation

    manager = AsyncManager()
    Observation.record("parent_start", _context_snapshot(), task_key=task_key)
    for invoice in Invoice.objects.filter(pk__in=invoice_ids).order_by("pk"):
        invoice.status = "approved"
        invoice.save()
        Observation.record(
            "after_save",
            {
                "invoice": invoice.pk,
                "progress": manager.get_progress(task_key) if task_key else None,
                "nested_id": getattr(invoice, "nested_launch_id", None),
                "invoice_lock": _lock_holder(manager, "testapp.invoice", invoice.pk),
            },
            task_key=task_key,
        )
    return len(invoice_ids)


def record_context(label, fail=False, **kwargs):
    """Write down the task context this run sees; optionally fail afterwards."""
    from tests.testapp.models import Observation

    Observation.record("context", {"label": label, **_context_snapshot()})
    if fail:
        raise RuntimeError(f"{label} failed on purpose")
    return label


def nest(levels, task_key=None, **kwargs):
    """Record the lineage, then launch ``nest(levels - 1)`` (inline inside a task)."""
    from powercrud.async_manager import AsyncManager

    from tests.testapp.models import Observation

    Observation.record("nest", {"levels": levels, **_context_snapshot()}, task_key=task_key or "")
    if levels > 0:
        AsyncManager().launch_async_task("tests.testapp.tasks.nest", levels - 1)
    return levels


def sleep_for(seconds, **kwargs):
    time.sleep(seconds)
    return seconds


def noop(n=0, **kwargs):
    return n


def echo(*args, **kwargs):
    """Write down the arguments a (possibly inline) run received."""
    from tests.testapp.models import Observation

    Observation.record(
        "echo",
        {
            "args": [str(a) for a in args],
            "kwarg_names": sorted(kwargs),
            "task_key_kwarg": kwargs.get("task_key"),
            **_context_snapshot(),
        },
    )
    return "echoed"


def hold_descendants(line_ids, hold_seconds, progress_messages=0, task_key=None, **kwargs):
    """Lock ``line_ids`` under the job, report a burst of progress, then keep working for
    ``hold_seconds`` and write down who holds each lock at the end of the work."""
    from powercrud.async_manager import AsyncManager

    from otel_taskctx import register_descendants, report_progress
    from tests.testapp.models import InvoiceLine, Observation

    register_descendants(InvoiceLine, line_ids)
    for n in range(1, progress_messages + 1):
        report_progress(f"step {n}/{progress_messages}")
    time.sleep(hold_seconds)
    manager = AsyncManager()
    holders = {str(pk): _lock_holder(manager, "testapp.invoiceline", pk) for pk in line_ids}
    Observation.record("holders", holders, task_key=task_key or "")
    return True


class CompletionRecordingManager:
    """Mixed into an AsyncManager: writes down the progress its completion hook sees."""

    def handle_task_completion(self, task, task_name):
        from tests.testapp.models import Observation

        Observation.record("completion", {"progress": self.get_progress(task_name)}, task_name)
        return super().handle_task_completion(task, task_name)


def _recording_manager():
    from powercrud.async_manager import AsyncManager

    return type("RecordingManager", (CompletionRecordingManager, AsyncManager), {})


def __getattr__(name):
    """``RecordingManager`` is built on first use (importing powercrud needs Django set up)."""
    global RecordingManager
    if name == "RecordingManager":
        RecordingManager = _recording_manager()
        RecordingManager.__module__ = __name__
        RecordingManager.__qualname__ = "RecordingManager"
        return RecordingManager
    raise AttributeError(name)
