"""The sample's ``django.tasks`` tasks: the same nested bulk edit as the django-q2 demo.

``publish_books`` is the job; for every book it enqueues ``publish_book``, unchanged code that
would be a task of its own anywhere else. Inside the running job otel_taskctx runs that nested
``.enqueue()`` inline under the job's key, so ``Book.save()`` (``skip_nested_async()`` is
true) locks the book's chapters with ``register_descendants()`` and reports progress under the
job's key, and the job ends only when every chapter is done.
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
    chapters = 0
    for book_id in book_ids:
        chapters += publish_book.enqueue(book_id).return_value
    return chapters
