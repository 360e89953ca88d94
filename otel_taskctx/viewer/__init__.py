"""The job-tree viewer: include ``otel_taskctx.viewer.urls`` in your URLconf, e.g.
``path("taskctx/", include("otel_taskctx.viewer.urls"))``."""
