"""Database models of the otel_taskctx app (span store, descendant lock table)."""

from otel_taskctx.lock_models import DescendantLock  # noqa: F401,E402
from otel_taskctx.span_models import TaskSpan  # noqa: F401,E402
