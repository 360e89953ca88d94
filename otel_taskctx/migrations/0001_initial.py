from django.db import migrations


class Migration(migrations.Migration):
    """Empty root: the span store and the lock table each add a migration on top."""

    initial = True
    dependencies = []
    operations = []
