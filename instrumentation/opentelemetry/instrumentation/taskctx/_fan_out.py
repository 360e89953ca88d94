"""Hook paths that django-q2 ``Task`` rows queued by earlier versions store."""

from opentelemetry.instrumentation.taskctx.fan_out import child_done, job_done

__all__ = ["child_done", "job_done"]
