"""The sample's ``django.tasks`` tasks: the same nested bulk edit as the django-q2 demo.

``publish_books`` is the job; for every book it enqueues ``publish_book``, unchanged code that
would be a task of its own anywhere else. Inside the running job otel_taskctx runs that nested
``.enqueue()`` inline under the job's key, so ``Book.save()`` (``skip_nested_async()`` is
true) locks the book's chapters with ``register_descendants()`` and reports progress under the
job's key, and the job ends only when every chapter is done. With ``SAMPLE_FAN_OUT=1`` each
``publish_book`` is a child task of its own on any ``db_worker`` instead, and the job's result
stays ``RUNNING`` until the last of them has ended.
"""

from __future__ import annotations

from django.tasks import task


@task
def publish_book(book_id: int) -> int:
    from sample.library.models import Book

    book = Book.objects.get(pk=book_id)
    book.status = Book.Status.PUBLISHED
    book.save()
    return book.chapters.count()


@task
def publish_books(book_ids: list[int]) -> int:
    """The chapters published inside this task (those of fanned-out books are published by
    their own child tasks, which this task's result waits for)."""
    results = [publish_book.enqueue(book_id) for book_id in book_ids]
    # inline (the default) every result is finished; fanned out, the children still run
    return sum(r.return_value for r in results if r.is_finished)
