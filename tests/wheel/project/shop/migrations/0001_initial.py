from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies = []

    operations = [
        migrations.CreateModel(
            name="Record",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False)),
                ("label", models.CharField(max_length=50)),
                ("task_key", models.CharField(blank=True, default="", max_length=200)),
                ("depth", models.IntegerField(null=True)),
                ("thread", models.CharField(max_length=100)),
                ("lock_holder", models.CharField(blank=True, default="", max_length=200)),
            ],
        ),
    ]
