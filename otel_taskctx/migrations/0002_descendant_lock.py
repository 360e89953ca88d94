from django.db import migrations, models


class Migration(migrations.Migration):
    """The lock table of otel_taskctx.cache.DatabaseCache (cache-table schema)."""

    dependencies = [("otel_taskctx", "0001_initial")]

    operations = [
        migrations.CreateModel(
            name="DescendantLock",
            fields=[
                (
                    "cache_key",
                    models.CharField(max_length=255, primary_key=True, serialize=False),
                ),
                ("value", models.TextField()),
                ("expires", models.DateTimeField(db_index=True)),
            ],
            options={"verbose_name": "descendant lock", "db_table": "otel_taskctx_lock"},
        ),
    ]
