"""Functions the sample's models run as django-q2 jobs (or inline, inside a parent job)."""

from __future__ import annotations

import time

from django.utils import timezone
from opentelemetry import trace
from powercrud.async_manager import AsyncManager

from otel_taskctx import current_task, fan_out, report_progress
from sample.library.models import Album, Book, save_delay


def sync_book_chapters(book_id: int, **kwargs) -> int:
    """The job ``Book.save()`` launches outside a job: copy the book's state to its chapters."""
    return Book.objects.get(pk=book_id).sync_chapters()


def reprice_album_tracks(album_id: int, task_key: str | None = None, **kwargs) -> int:
    """powercrud-style worker: reprice every track of an album, reporting progress.

    powercrud passes the job's ``task_key``; run inline inside a parent job, otel_taskctx
    passes the parent's key, so this progress shows in the parent's progress bar.
    """
    album = Album.objects.get(pk=album_id)
    price = Album.TRACK_PRICES[album.price_tier]
    tracks = list(album.tracks.order_by("number"))
    # the viewer shows it beside the run's name: the album this run repriced
    trace.get_current_span().set_attribute("taskctx.label", f"Album #{album.pk} {album.title!r}")
    delay = save_delay()
    for done, track in enumerate(tracks, 1):
        track.price = price
        track.repriced_at = timezone.now()
        track.save(update_fields=["price", "repriced_at"])
        message = f"Album #{album.pk} {album.title!r}: track {done}/{len(tracks)} repriced"
        if current_task() is not None:  # in the job's trace too, as a progress event
            report_progress(message, done=done, total=len(tracks))
        elif task_key:  # without otel_taskctx's instrumentation: powercrud's own call
            AsyncManager().update_progress(task_key, message)
        if delay:
            time.sleep(delay)
    return len(tracks)


@fan_out
def reprice_album_tracks_fanned_out(album_id: int, task_key: str | None = None, **kwargs) -> int:
    """:func:`reprice_album_tracks` as a child job on another worker (the sample's fan-out
    switch: the *Albums (fan-out)* page)."""
    return reprice_album_tracks(album_id, task_key=task_key, **kwargs)
