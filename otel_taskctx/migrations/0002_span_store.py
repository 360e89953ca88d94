from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("otel_taskctx", "0001_initial"),
    ]

    operations = [
        migrations.CreateModel(
            name="TaskSpan",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("trace_id", models.CharField(max_length=32)),
                ("span_id", models.CharField(max_length=16)),
                ("parent_span_id", models.CharField(blank=True, default="", max_length=16)),
                ("name", models.CharField(max_length=255)),
                ("kind", models.CharField(default="INTERNAL", max_length=16)),
                ("start_ns", models.BigIntegerField()),
                ("end_ns", models.BigIntegerField(blank=True, null=True)),
                ("started_at", models.DateTimeField(db_index=True)),
                (
                    "status",
                    models.CharField(
                        choices=[("unset", "unset"), ("ok", "ok"), ("error", "error")],
                        default="unset",
                        max_length=8,
                    ),
                ),
                ("status_message", models.TextField(blank=True, default="")),
                ("attributes", models.JSONField(blank=True, default=dict)),
                ("events", models.JSONField(blank=True, default=list)),
                ("links", models.JSONField(blank=True, default=list)),
                (
                    "task_key",
                    models.CharField(blank=True, db_index=True, max_length=200, null=True),
                ),
                ("root_task_key", models.CharField(blank=True, max_length=200, null=True)),
                ("user_id", models.CharField(blank=True, db_index=True, max_length=150, null=True)),
                ("user_label", models.CharField(blank=True, default="", max_length=255)),
                ("descendants_count", models.IntegerField(default=0)),
                ("manager", models.CharField(blank=True, default="", max_length=255)),
                ("service", models.CharField(blank=True, default="", max_length=255)),
                ("process", models.CharField(blank=True, default="", max_length=255)),
            ],
            options={
                "verbose_name": "task span",
                "db_table": "otel_taskctx_span",
                "indexes": [
                    models.Index(
                        fields=["root_task_key", "start_ns"], name="otel_taskctx_span_root"
                    )
                ],
                "constraints": [
                    models.UniqueConstraint(
                        fields=("trace_id", "span_id"), name="otel_taskctx_span_uniq"
                    )
                ],
            },
        ),
    ]
