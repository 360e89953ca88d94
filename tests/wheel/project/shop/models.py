from django.db import models


class Record(models.Model):
    """What a step of a job saw: the task it ran as, its thread, who held its item's lock."""

    label = models.CharField(max_length=50)
    task_key = models.CharField(max_length=200, blank=True, default="")
    depth = models.IntegerField(null=True)
    thread = models.CharField(max_length=100)
    lock_holder = models.CharField(max_length=200, blank=True, default="")
