"""Span attribute and event names (docs/processor.md, docs/instrumentation.md), and the one
writer and one reader of the descendants attributes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# lineage, stamped on every span started inside a task
TASK_KEY = "taskctx.task_key"
PARENT_TASK_KEY = "taskctx.parent_task_key"
ROOT_TASK_KEY = "taskctx.root_task_key"
DEPTH = "taskctx.depth"
MANAGER_CLASS_PATH = "taskctx.manager_class_path"

# descendants: as span attributes or as attributes of an event named DESCENDANTS_EVENT
DESCENDANTS_EVENT = "taskctx.descendants"
DESCENDANTS_MODEL = "taskctx.descendants.model"
DESCENDANTS_IDS = "taskctx.descendants.ids"
DESCENDANTS_COUNT = "taskctx.descendants.count"

# progress: a span attribute or an event named PROGRESS_EVENT with PROGRESS_MESSAGE
PROGRESS_EVENT = "taskctx.progress"
PROGRESS_MESSAGE = "taskctx.progress"
PROGRESS_DONE = "taskctx.progress.done"
PROGRESS_TOTAL = "taskctx.progress.total"

#: what a span worked on, shown beside its name in the viewer ("Book #2 'The Crimson River'")
LABEL = "taskctx.label"

#: set (True) on events the helpers already forwarded; the span processor skips them
FORWARDED = "taskctx.forwarded"

# set by the instrumentation; messaging conventions as strings (no incubating module)
MESSAGING_SYSTEM_VALUE = "django_q2"
MESSAGING_SYSTEM = "messaging.system"
#: the Celery worker's name (``name@host``) on a task's run: opentelemetry-instrumentation-
#: celery's attribute, set by otel_taskctx where that instrumentation is absent
CELERY_HOSTNAME = "celery.hostname"
#: the same name on every Celery run otel_taskctx sees, that instrumentation's spans included
#: (which end with the message's origin copied over ``celery.hostname``)
WORKER = "taskctx.worker"
MESSAGING_OPERATION_TYPE = "messaging.operation.type"
MESSAGING_OPERATION_NAME = "messaging.operation.name"
MESSAGING_DESTINATION_NAME = "messaging.destination.name"
MESSAGING_MESSAGE_ID = "messaging.message.id"
ERROR_TYPE = "error.type"
CODE_FUNCTION_NAME = "code.function.name"

# django-q2 specifics
TASK_NAME = "django_q2.task.name"
TASK_FUNC = "django_q2.task.func"
TASK_GROUP = "django_q2.task.group"
TASK_SYNC = "django_q2.task.sync"

NESTED_ID = "taskctx.nested.id"
NESTED_MODE = "taskctx.nested.mode"
LAUNCHED_TASK_KEY = "taskctx.launched_task_key"
REPORTED_ERRORS = "taskctx.reported_errors"


#: ids a descendants event lists at most (``DESCENDANTS_COUNT`` says how many there were)
MAX_EVENT_IDS = 1000


def descendants_attributes(model: str, ids: Sequence[Any], forwarded: bool = True) -> dict:
    """The attributes of a descendants event for ``ids`` of ``model``."""
    return {
        DESCENDANTS_MODEL: model,
        DESCENDANTS_IDS: [str(i) for i in ids[:MAX_EVENT_IDS]],
        DESCENDANTS_COUNT: len(ids),
        FORWARDED: forwarded,
    }


def read_descendants(attributes: Mapping[str, Any]) -> tuple[str, list[Any], int] | None:
    """``(model, ids, count)`` from an event's or a span's attributes; None without a model."""
    model = attributes.get(DESCENDANTS_MODEL)
    if not model:
        return None
    return str(model), _id_list(attributes.get(DESCENDANTS_IDS)), descendants_count(attributes)


def descendants_count(attributes: Mapping[str, Any]) -> int:
    """``DESCENDANTS_COUNT`` when it is a whole number, else the number of ids listed."""
    count = attributes.get(DESCENDANTS_COUNT)
    if type(count) is int:
        return count
    return len(_id_list(attributes.get(DESCENDANTS_IDS)))


def _id_list(ids: Any) -> list[Any]:
    if ids is None:
        return []
    return [ids] if isinstance(ids, (str, int)) else list(ids)
