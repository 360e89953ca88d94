"""Sample models: two parent -> descendant pairs, written in the two styles users copy.

``Book`` -> ``Chapter`` uses the otel_taskctx helpers in ``save()``: inside an async job it
registers the chapters under the job's key and updates them inline, reporting progress;
outside a job it hands the chapters to an async job of their own.

``Album`` -> ``Track`` is unchanged powercrud-style code: its ``save()`` always launches a
nested ``AsyncManager().launch_async_task(...)`` for the tracks. Without otel_taskctx that
nested job escapes to the queue when the album is saved by a bulk-edit job, and the bulk job
"succeeds" while the tracks are still being repriced, unlocked. With the otel_taskctx app
installed, the instrumentation runs the nested call inline, under the bulk job's key.
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import models
from django.utils import timezone
from opentelemetry import trace
from powercrud.async_manager import AsyncManager

from otel_taskctx import current_task, register_descendants, report_progress, skip_nested_async
from sample.library.async_manager import SampleAsyncManager, job_position

log = logging.getLogger("sample.library")
tracer = trace.get_tracer("sample.library")


#: the user of the request that saves (set by the sample's views): a follow-on job names it
launching_user: ContextVar[Any] = ContextVar("sample_launching_user", default=None)


def save_delay() -> float:
    """The artificial delay per descendant update (``SAMPLE_SAVE_DELAY``)."""
    return max(0.0, float(getattr(settings, "SAMPLE_SAVE_DELAY", 0) or 0))


class TrackedFieldsMixin:
    """Remembers the values of ``tracked_fields`` as loaded, to tell what a save changes."""

    tracked_fields: tuple[str, ...] = ()

    @classmethod
    def from_db(cls, db, field_names, values, *args, **kwargs):
        instance = super().from_db(db, field_names, values, *args, **kwargs)
        instance._loaded = {
            name: getattr(instance, name)
            for name in cls.tracked_fields
            if name in instance.__dict__
        }
        return instance

    def changed_fields(self) -> set[str]:
        loaded = getattr(self, "_loaded", None)
        if loaded is None:  # a new object
            return set()
        return {name for name, value in loaded.items() if getattr(self, name) != value}

    def remember_saved_values(self) -> None:
        self._loaded = {name: getattr(self, name) for name in self.tracked_fields}


# --------------------------------------------------------------------------------------------
# Book -> Chapter: the otel_taskctx helpers
# --------------------------------------------------------------------------------------------


class Book(TrackedFieldsMixin, models.Model):
    class Status(models.TextChoices):
        DRAFT = "draft", "Draft"
        IN_REVIEW = "in_review", "In review"
        PUBLISHED = "published", "Published"
        OUT_OF_PRINT = "out_of_print", "Out of print"

    class Genre(models.TextChoices):
        FICTION = "fiction", "Fiction"
        MYSTERY = "mystery", "Mystery"
        SCIENCE = "science", "Science"
        HISTORY = "history", "History"
        TRAVEL = "travel", "Travel"

    title = models.CharField(max_length=200)
    author = models.CharField(max_length=120)
    genre = models.CharField(max_length=20, choices=Genre.choices, default=Genre.FICTION)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.DRAFT)
    edition = models.PositiveIntegerField(default=1)
    published_on = models.DateField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    #: a change to these is copied to every chapter
    tracked_fields = ("status", "edition")

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.title

    @property
    def chapter_count(self) -> int:
        return self.chapters.count()

    def save(self, *args, **kwargs):
        attributes = {"sample.model": "library.book"}
        if self.pk is not None:
            attributes["sample.pk"] = str(self.pk)
            # the viewer shows it beside the span's name: the rows of a job tell books apart
            attributes["taskctx.label"] = f"Book #{self.pk} {self.title!r}"
        with tracer.start_as_current_span("Book.save", attributes=attributes):
            changed = self.changed_fields()
            super().save(*args, **kwargs)
            self.remember_saved_values()
            if not changed:
                return
            if skip_nested_async():
                # inside an async job (a powercrud bulk edit): do the work here, under its key
                self.sync_chapters()
            else:
                # a web request or a shell: the chapters get a job of their own
                self.launch_chapter_sync()

    def sync_chapters(self) -> int:
        """Copy status and edition to every chapter; inside a job, lock them under its key."""
        with tracer.start_as_current_span("sync chapters", attributes={"sample.book": self.pk}):
            chapters = list(self.chapters.order_by("number"))
            # all-or-nothing: raises DescendantConflict if another job holds any chapter
            register_descendants(Chapter, [c.pk for c in chapters])
            delay = save_delay()
            now = timezone.now()
            count = len(chapters)
            task = current_task()
            # in powercrud's bulk job: the job's fraction (books done + chapters of this one)
            position = job_position(task.task_key) if task is not None else None
            books_done, books = position or (0, 1)
            where = f" (book {books_done + 1}/{books})" if position else ""
            for done, chapter in enumerate(chapters, 1):
                chapter.status = self.status
                chapter.edition = self.edition
                chapter.synced_at = now
                chapter.save(update_fields=["status", "edition", "synced_at"])
                report_progress(
                    f"Book #{self.pk} {self.title!r}{where}: chapter {done}/{count} synced",
                    done=min(books_done * count + done, books * count),
                    total=books * count,
                )
                if delay:
                    time.sleep(delay)
            return len(chapters)

    def launch_chapter_sync(self) -> str | None:
        ids = set(self.chapters.values_list("pk", flat=True))
        if not ids:
            return None
        manager = SampleAsyncManager()
        return manager.launch_async_task(
            "sample.library.tasks.sync_book_chapters",
            self.pk,
            conflict_ids={"library.chapter": ids},
            # the dashboard names who launched it (set by the form view that saved the book)
            user=launching_user.get(),
            affected_objects=f"{len(ids)} chapters of {self}",
            manager_class=manager.class_path(),
        )


class Chapter(models.Model):
    book = models.ForeignKey(Book, on_delete=models.CASCADE, related_name="chapters")
    number = models.PositiveIntegerField()
    title = models.CharField(max_length=200)
    words = models.PositiveIntegerField(default=0)
    status = models.CharField(max_length=20, choices=Book.Status.choices, default=Book.Status.DRAFT)
    edition = models.PositiveIntegerField(default=1)
    synced_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["book_id", "number"]
        constraints = [
            models.UniqueConstraint(fields=["book", "number"], name="unique_chapter_number")
        ]

    def __str__(self) -> str:
        return f"{self.book_id}.{self.number} {self.title}"


# --------------------------------------------------------------------------------------------
# Album -> Track: unchanged powercrud-style code
# --------------------------------------------------------------------------------------------


class Album(TrackedFieldsMixin, models.Model):
    class PriceTier(models.TextChoices):
        BUDGET = "budget", "Budget"
        STANDARD = "standard", "Standard"
        PREMIUM = "premium", "Premium"

    title = models.CharField(max_length=200)
    artist = models.CharField(max_length=120)
    label = models.CharField(max_length=120, blank=True)
    price_tier = models.CharField(
        max_length=20, choices=PriceTier.choices, default=PriceTier.STANDARD
    )
    released_on = models.DateField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    tracked_fields = ("price_tier",)

    #: price of one track per tier
    TRACK_PRICES = {
        PriceTier.BUDGET: Decimal("0.69"),
        PriceTier.STANDARD: Decimal("0.99"),
        PriceTier.PREMIUM: Decimal("1.29"),
    }

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.title

    @property
    def track_count(self) -> int:
        return self.tracks.count()

    def save(self, *args, **kwargs):
        reprice = "price_tier" in self.changed_fields()
        super().save(*args, **kwargs)
        self.remember_saved_values()
        if reprice:
            # the way a powercrud project writes it: hand the tracks to a background job
            track_ids = set(self.tracks.values_list("pk", flat=True))
            from sample.library.bulk import fan_out_requested

            # the sample's fan-out switch (the "Albums (fan-out)" page) picks the fan-out twin
            fanned = "_fanned_out" if fan_out_requested.get() else ""
            AsyncManager().launch_async_task(
                f"sample.library.tasks.reprice_album_tracks{fanned}",
                self.pk,
                conflict_ids={"library.track": track_ids},
            )


class Track(models.Model):
    album = models.ForeignKey(Album, on_delete=models.CASCADE, related_name="tracks")
    number = models.PositiveIntegerField()
    title = models.CharField(max_length=200)
    duration_seconds = models.PositiveIntegerField(default=180)
    price = models.DecimalField(max_digits=6, decimal_places=2, default=Decimal("0.99"))
    repriced_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["album_id", "number"]
        constraints = [
            models.UniqueConstraint(fields=["album", "number"], name="unique_track_number")
        ]

    def __str__(self) -> str:
        return f"{self.album_id}.{self.number} {self.title}"


# --------------------------------------------------------------------------------------------
# powercrud's async dashboard
# --------------------------------------------------------------------------------------------


class AsyncTaskRecord(models.Model):
    """One row per async job, written by ``SampleAsyncManager`` (powercrud's dashboard)."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        IN_PROGRESS = "in_progress", "In progress"
        SUCCESS = "success", "Success"
        FAILED = "failed", "Failed"
        UNKNOWN = "unknown", "Unknown"

    task_name = models.CharField(max_length=64, unique=True)
    status = models.CharField(max_length=32, choices=Status.choices, default=Status.PENDING)
    message = models.TextField(blank=True)
    progress_payload = models.TextField(blank=True)
    user_label = models.CharField(max_length=255, blank=True)
    affected_objects = models.TextField(blank=True)
    task_kwargs = models.JSONField(blank=True, null=True)
    task_args = models.JSONField(blank=True, null=True)
    result_payload = models.TextField(blank=True)
    cleaned_up = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    completed_at = models.DateTimeField(blank=True, null=True)
    failed_at = models.DateTimeField(blank=True, null=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "async task"

    def __str__(self) -> str:
        return f"{self.task_name} ({self.status})"
