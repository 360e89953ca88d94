"""The span table's keys lead with the hour a span started in (see ``otel_taskctx.models``)."""

from django.db import migrations, models

import otel_taskctx.models

#: the rows already stored get their hour from their start (integer division on both
#: SQLite and PostgreSQL: ``start_ns`` is a bigint)
FILL_HOURS = "UPDATE otel_taskctx_span SET start_hour = start_ns / 3600000000000"


class Migration(migrations.Migration):
    dependencies = [
        ("otel_taskctx", "0004_span_fewer_indexes"),
    ]

    operations = [
        migrations.RemoveConstraint(
            model_name="taskspan",
            name="otel_taskctx_span_uniq",
        ),
        migrations.RemoveIndex(
            model_name="taskspan",
            name="otel_taskctx_span_root",
        ),
        migrations.AddField(
            model_name="taskspan",
            name="start_hour",
            field=otel_taskctx.models.HourField(default=0, editable=False),
            preserve_default=False,
        ),
        # (the hint: only on the database the routers send the span table to)
        migrations.RunSQL(
            FILL_HOURS, reverse_sql=migrations.RunSQL.noop, hints={"model_name": "taskspan"}
        ),
        migrations.AddIndex(
            model_name="taskspan",
            index=models.Index(
                fields=["start_hour", "root_task_key", "start_ns"], name="otel_taskctx_span_hroot"
            ),
        ),
        migrations.AddConstraint(
            model_name="taskspan",
            constraint=models.UniqueConstraint(
                fields=("start_hour", "trace_id", "span_id"), name="otel_taskctx_span_key"
            ),
        ),
    ]
