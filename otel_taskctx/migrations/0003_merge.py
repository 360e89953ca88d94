from django.db import migrations


class Migration(migrations.Migration):
    """Merge the span store and lock table migrations (both follow 0001_initial)."""

    dependencies = [
        ("otel_taskctx", "0002_descendant_lock"),
        ("otel_taskctx", "0002_span_store"),
    ]

    operations = []
