"""The sample's Celery tasks: the same nested bulk edit as the django-q2 and ``django.tasks`` demos.

``publish_books`` is the job; for every book it calls ``publish_book.delay()``, unchanged code
that would be a task of its own anywhere else. Inside the running job otel_taskctx runs that
nested launch inline (``Task.apply``) under the job's key, so ``Book.save()``
(``skip_nested_async()`` is true) locks the book's chapters with ``register_descendants()`` and
reports progress under the job's key, and the job ends only when every chapter is done.
``publish_book_in_parallel`` is the same task marked ``@fan_out``: launched inside a job, it is
a child task of its own on any worker process, and the job ends (its locks released, its result
stored) only after the last of them. See docs/celery.md.
"""

from __future__ import annotations

from celery.result import EagerResult

from otel_taskctx import fan_out
from sample.config.celery import app


def _publish(book_id: int) -> int:
    from sample.library.models import Book

    book = Book.objects.get(pk=book_id)
    book.status = Book.Status.PUBLISHED
    book.save()  # inside a job: syncs and locks the chapters under the job's key
    return book.chapters.count()


@app.task
def publish_book(book_id: int) -> int:
    return _publish(book_id)


@app.task
@fan_out
def publish_book_in_parallel(book_id: int) -> int:
    return _publish(book_id)


@app.task
def publish_books(book_ids: list[int], parallel: bool = False) -> int:
    """The chapters published inside this task (a fanned-out book's are published by its own
    child task, which this job waits for before it ends)."""
    nested = publish_book_in_parallel if parallel else publish_book
    results = [nested.delay(book_id) for book_id in book_ids]
    # inline (the default) each result is an EagerResult, already finished
    return sum(r.result for r in results if isinstance(r, EagerResult))
