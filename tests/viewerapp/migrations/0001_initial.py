from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True

    dependencies = []

    operations = [
        migrations.CreateModel(
            name="AsyncTaskRecord",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("task_name", models.CharField(max_length=64, unique=True)),
                ("status", models.CharField(default="pending", max_length=20)),
                ("message", models.TextField(blank=True)),
                ("progress_payload", models.TextField(blank=True)),
                ("user_label", models.CharField(blank=True, max_length=255)),
                ("affected_objects", models.TextField(blank=True)),
                ("result_payload", models.JSONField(blank=True, null=True)),
                ("cleaned_up", models.BooleanField(default=False)),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                ("updated_at", models.DateTimeField(auto_now=True)),
                ("completed_at", models.DateTimeField(blank=True, null=True)),
                ("failed_at", models.DateTimeField(blank=True, null=True)),
            ],
        ),
    ]
