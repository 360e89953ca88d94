"""Database models of the otel_taskctx app (span store, descendant lock table)."""
