"""Models used by the tests: a parent with descendants, with int, str and UUID keys."""

import uuid

from django.db import models


class Parent(models.Model):
    name = models.CharField(max_length=100)
    status = models.CharField(max_length=20, default="draft")


class Child(models.Model):
    parent = models.ForeignKey(Parent, related_name="children", on_delete=models.CASCADE)
    status = models.CharField(max_length=20, default="draft")


class Tag(models.Model):
    code = models.CharField(max_length=20, primary_key=True)


class Document(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    title = models.CharField(max_length=100, default="")
