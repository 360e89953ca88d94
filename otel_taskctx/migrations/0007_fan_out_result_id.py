from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("otel_taskctx", "0006_fan_out"),
    ]

    operations = [
        migrations.AddField(
            model_name="fanoutchild",
            name="result_id",
            field=models.CharField(blank=True, default="", max_length=64),
        ),
    ]
