"""Span attribute and event names used by otel_taskctx (the documented convention)."""

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
#: optional, next to PROGRESS_MESSAGE: done of total (the message then ends in "(NN%)")
PROGRESS_DONE = "taskctx.progress.done"
PROGRESS_TOTAL = "taskctx.progress.total"

#: set (True) on events the helpers already forwarded; the span processor skips them
FORWARDED = "taskctx.forwarded"
