from django.db import migrations, models


class Migration(migrations.Migration):
    """The span's unique key in time order; the by-trace index only on linking spans.

    (Every index on a random key costs each span written a page of its own once the table is
    larger than a batch: see otel_taskctx.span_models.)
    """

    dependencies = [
        ("otel_taskctx", "0004_span_fewer_indexes"),
    ]

    operations = [
        migrations.RemoveConstraint(
            model_name="taskspan",
            name="otel_taskctx_span_uniq",
        ),
        migrations.AddConstraint(
            model_name="taskspan",
            constraint=models.UniqueConstraint(
                fields=("start_ns", "span_id"), name="otel_taskctx_span_key"
            ),
        ),
        migrations.AddIndex(
            model_name="taskspan",
            index=models.Index(
                condition=models.Q(
                    ("root_task_key__isnull", True), ("kind", "PRODUCER"), _connector="OR"
                ),
                fields=["trace_id", "span_id"],
                name="otel_taskctx_span_link",
            ),
        ),
    ]
