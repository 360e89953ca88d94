import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("testapp", "0001_initial"),
    ]

    operations = [
        migrations.CreateModel(
            name="Observation",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("kind", models.CharField(max_length=50)),
                ("task_key", models.CharField(blank=True, default="", max_length=300)),
                ("value", models.JSONField(default=dict)),
                ("created", models.DateTimeField(auto_now_add=True)),
            ],
            options={"ordering": ["pk"]},
        ),
        migrations.CreateModel(
            name="Invoice",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("number", models.CharField(max_length=40)),
                ("status", models.CharField(default="draft", max_length=20)),
                ("fail_lines", models.BooleanField(default=False)),
            ],
        ),
        migrations.CreateModel(
            name="InvoiceLine",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("status", models.CharField(default="draft", max_length=20)),
                ("updated_at", models.DateTimeField(blank=True, null=True)),
                ("lock_holder", models.CharField(blank=True, default="", max_length=300)),
                ("seen_task_key", models.CharField(blank=True, default="", max_length=300)),
                ("seen_depth", models.IntegerField(blank=True, null=True)),
                (
                    "invoice",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="lines",
                        to="testapp.invoice",
                    ),
                ),
            ],
        ),
    ]
