"""The lock table behind :class:`otel_taskctx.cache.DatabaseCache`.

Same schema as a Django cache table (``createcachetable``), so the cache backend reads and
writes it with Django's own DatabaseCache code: ``value`` is ``base64(pickle(value))``. Rows
are powercrud's lock keys, tracking sets, progress and active-task keys; only expired rows are
ever deleted, never live ones.
"""

from django.db import models


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
