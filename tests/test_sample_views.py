"""The sample project in-process: its pages, powercrud's bulk-edit path and its models' save().

These run on the test settings (the sample's app and URLs are mounted under ``/sample/``);
jobs are queued on the real broker and inspected there, no cluster runs. The demo and browser
tests run the sample's own settings with a real qcluster.
"""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth.models import AnonymousUser
from django.core.management import call_command
from django.test import RequestFactory, override_settings
from django.urls import reverse
from django.utils import timezone
from django_q.brokers import get_broker
from django_q.signing import SignedPackage

from otel_taskctx import task_context
from otel_taskctx.conflicts import get_conflict_store
from sample.library import views
from sample.library.async_manager import SampleAsyncManager
from sample.library.bulk import submit_bulk_edit
from sample.library.models import Album, AsyncTaskRecord, Book, Chapter, Track
from sample.library.seed import ensure_demo_user, seed

pytestmark = pytest.mark.django_db

BOOKS_URL = "/sample/library/book/"
BULK_URL = "/sample/library/book/bulk-edit/"
# report_progress() writes through (no background thread racing the test's transaction)
NO_THROTTLE = {"PROGRESS_MIN_INTERVAL": 0}


@pytest.fixture(autouse=True)
def _fast_passwords(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def broker(cache):
    broker = get_broker()
    broker.purge_queue()
    yield broker
    broker.purge_queue()


@pytest.fixture
def data(db):
    return seed(books=4, chapters=3, albums=3, tracks=2)


@pytest.fixture
def user(data):
    return ensure_demo_user()


@pytest.fixture
def signed_in(client, user):
    client.force_login(user)
    return client


def queued(broker) -> list[dict]:
    """Every queued django-q2 task package (taken off the queue)."""
    out = []
    while broker.queue_size():
        batch = broker.dequeue() or []
        for _, payload in batch:
            out.append(SignedPackage.loads(payload))
        if not batch:
            break
    return out


def holders(model: str, ids) -> dict:
    store = get_conflict_store(SampleAsyncManager())
    return {str(k): v for k, v in store.holders({model: list(ids)}).get(model, {}).items()}


def hx_post(client, url, data):
    return client.post(url, data, HTTP_HX_REQUEST="true")


# --------------------------------------------------------------------------------------------
# pages
# --------------------------------------------------------------------------------------------


def test_pages_need_sign_in(client, data):
    response = client.get(BOOKS_URL)
    assert response.status_code == 302
    assert "login" in response["Location"]
    assert client.get("/sample/").status_code == 302


def test_login_page_and_demo_button(client, user):
    page = client.get("/sample/accounts/login/")
    assert page.status_code == 200
    assert b'data-testid="demo-login"' in page.content
    response = client.post("/sample/accounts/demo-login/", {"next": BOOKS_URL})
    assert response.status_code == 302 and response["Location"] == BOOKS_URL
    assert client.get(BOOKS_URL).status_code == 200


@pytest.mark.parametrize(
    "url, expect",
    [
        ("/sample/", b"Nested bulk edits"),
        (BOOKS_URL, b"Books"),
        ("/sample/library/chapter/", b"Chapters"),
        ("/sample/library/album/", b"Albums"),
        ("/sample/library/track/", b"Tracks"),
        ("/sample/library/jobs/", b"Async jobs"),
    ],
)
def test_pages_render(signed_in, url, expect):
    response = signed_in.get(url)
    assert response.status_code == 200
    assert expect in response.content
    # powercrud's packaged front-end bundle, resolved from its manifest
    assert b"/static/django_assets/powercrud-" in response.content


def test_book_list_shows_seeded_rows_and_bulk_controls(signed_in, data):
    content = signed_in.get(BOOKS_URL).content.decode()
    for book in Book.objects.all():
        assert book.title in content
    assert "toggle-selection" in content


def test_bundle_tag_points_at_files_powercrud_ships():
    from importlib import resources

    from sample.library.templatetags.sample_assets import powercrud_bundle

    html = str(powercrud_bundle())
    assets = resources.files("powercrud").joinpath("assets")
    files = [part.split('"')[0] for part in html.split("/static/")[1:]]
    assert any(f.endswith(".js") for f in files) and any(f.endswith(".css") for f in files)
    for name in files:
        assert assets.joinpath(name).is_file(), name


# --------------------------------------------------------------------------------------------
# powercrud's bulk-edit path
# --------------------------------------------------------------------------------------------


@pytest.mark.stack
def test_bulk_edit_of_several_books_queues_powercrud_job(signed_in, user, broker):
    ids = list(Book.objects.order_by("pk").values_list("pk", flat=True)[:3])
    response = hx_post(
        signed_in,
        BULK_URL,
        {
            "selected_ids[]": [str(i) for i in ids],
            "bulk_submit": "1",
            "fields_to_update": ["status"],
            "status": "published",
        },
    )
    assert response.status_code == 200
    assert b"Bulk Operation Queued" in response.content
    assert b"/powercrud/async/progress/" in response.content  # the modal polls it
    trigger = json.loads(response["HX-Trigger"])
    key = trigger["taskName"]
    assert trigger["bulkEditQueued"] is True

    # powercrud reserved the books under the job's key before queueing it
    assert holders("library.book", ids) == {str(i): key for i in ids}
    record = AsyncTaskRecord.objects.get(task_name=key)  # the dashboard row
    assert record.status == "pending" and record.user_label == "demo"

    # a second bulk edit of overlapping books is refused while the job holds them
    again = hx_post(
        signed_in,
        BULK_URL,
        {
            "selected_ids[]": [str(ids[-1]), str(Book.objects.order_by("-pk").first().pk)],
            "bulk_submit": "1",
            "fields_to_update": ["status"],
            "status": "draft",
        },
    )
    assert b"Another bulk operation is already running on books" in again.content

    jobs = queued(broker)
    assert len(jobs) == 1
    job = jobs[0]
    assert job["func"] == "powercrud.tasks.bulk_update_task"
    assert job["name"] == key
    assert job["hook"] == "powercrud.async_hooks.task_completion_hook"
    model_path, selected, user_id, bulk_fields, fields, field_data = job["args"]
    assert (model_path, selected, user_id) == ("library.Book", [str(i) for i in ids], user.pk)
    assert bulk_fields == views.BookCRUDView.bulk_fields and fields == ["status"]
    assert [(d["field"], d["value"]) for d in field_data] == [("status", "published")]
    assert "control" not in field_data[0]["info"]  # the unpicklable form control is left out
    assert job["kwargs"]["task_key"] == key
    assert job["kwargs"]["manager_class"] == SampleAsyncManager.class_path()
    # nothing ran: the books are unchanged
    assert not Book.objects.filter(pk__in=ids, status="published").exists()

    SampleAsyncManager().remove_active_task(key)  # what the completion hook does
    assert holders("library.book", ids) == {}


@pytest.mark.stack
def test_demo_submits_the_same_job_as_the_browser(signed_in, user, broker):
    ids = list(Book.objects.order_by("pk").values_list("pk", flat=True)[:2])
    form = {
        "selected_ids[]": [str(i) for i in ids],
        "bulk_submit": "1",
        "fields_to_update": ["status", "edition"],
        "status": "published",
        "edition": "2",
    }
    by_browser = json.loads(hx_post(signed_in, BULK_URL, form)["HX-Trigger"])["taskName"]
    (browser_job,) = queued(broker)
    SampleAsyncManager().remove_active_task(by_browser)

    submission = submit_bulk_edit(
        views.BookCRUDView, ids, {"status": "published", "edition": 2}, user
    )
    assert submission.queued, submission
    (demo_job,) = queued(broker)
    SampleAsyncManager().remove_active_task(submission.task_key)

    def comparable(job):
        args = list(job["args"])
        args[5] = [(d["field"], d["value"], sorted(d["info"])) for d in args[5]]
        kwargs = {k: v for k, v in job["kwargs"].items() if k != "task_key"}
        return job["func"], args, kwargs

    assert comparable(demo_job) == comparable(browser_job)


@pytest.mark.stack
def test_demo_submission_reports_conflicts(user, broker):
    ids = list(Book.objects.order_by("pk").values_list("pk", flat=True))
    first = submit_bulk_edit(views.BookCRUDView, ids[:2], {"status": "published"}, user)
    assert first.queued
    second = submit_bulk_edit(views.BookCRUDView, ids[1:3], {"status": "draft"}, user)
    assert second.outcome == "conflict"
    assert "Another bulk operation is already running on books" in second.message
    # the refusal names the held object and its job (a link to the job's trace)
    assert f"Book {ids[1]} is held by job {first.task_key[:8]}…" in second.message
    many = submit_bulk_edit(views.BookCRUDView, ids[:2], {"status": "draft"}, user)
    assert f"Books {ids[0]}, {ids[1]} are held by job" in many.message
    SampleAsyncManager().remove_active_task(first.task_key)


@pytest.mark.stack
def test_a_refusal_names_the_first_objects_and_how_many_more(user, broker):
    seed(books=8, chapters=1, albums=0, tracks=0)
    ids = list(Book.objects.order_by("pk").values_list("pk", flat=True))
    first = submit_bulk_edit(views.BookCRUDView, ids, {"status": "published"}, user)
    assert first.queued
    html = views.conflict_message(Book, ids)
    named = ", ".join(str(pk) for pk in ids[: views.NAMED_OBJECTS])
    assert f"Books {named} and {len(ids) - views.NAMED_OBJECTS} more are held by job" in html
    assert f'href="/taskctx/job/{first.task_key}/"' in html
    assert f'data-holder="{first.task_key}"' in html
    SampleAsyncManager().remove_active_task(first.task_key)


@pytest.mark.stack
def test_single_row_edit_runs_in_the_request_and_hands_chapters_to_a_job(signed_in, broker):
    book = Book.objects.order_by("pk").first()
    response = hx_post(
        signed_in,
        BULK_URL,
        {
            "selected_ids[]": [str(book.pk)],
            "bulk_submit": "1",
            "fields_to_update": ["edition"],
            "edition": "2",
        },
    )
    assert response.status_code == 200
    assert json.loads(response["HX-Trigger"]).get("bulkEditSuccess") is True
    book.refresh_from_db()
    assert book.edition == 2
    # outside a job Book.save() launches a job of its own for the chapters
    chapters = list(book.chapters.values_list("pk", flat=True))
    assert set(Chapter.objects.filter(pk__in=chapters).values_list("edition", flat=True)) == {1}
    (job,) = queued(broker)
    assert job["func"] == "sample.library.tasks.sync_book_chapters"
    assert job["args"] == (book.pk,) or list(job["args"]) == [book.pk]
    assert holders("library.chapter", chapters) == {str(c): job["name"] for c in chapters}
    SampleAsyncManager().remove_active_task(job["name"])


@pytest.mark.stack
def test_a_follow_on_job_names_the_signed_in_user(signed_in, broker):
    """A book's status changed in its form launches the chapters' job: the dashboard
    attributes it to the user who saved the book, not to "anonymous"."""
    book = Book.objects.order_by("pk").first()
    response = signed_in.post(
        f"{BOOKS_URL}{book.pk}/edit/",
        {
            "title": book.title,
            "author": book.author,
            "genre": book.genre,
            "status": "published",
            "edition": book.edition,
            "published_on": "",
        },
    )
    assert response.status_code in (200, 302), response.content[:2000]
    (job,) = queued(broker)
    assert job["func"] == "sample.library.tasks.sync_book_chapters"
    record = AsyncTaskRecord.objects.get(task_name=job["name"])
    assert record.user_label == "demo"
    SampleAsyncManager().remove_active_task(job["name"])


def test_powercrud_progress_endpoint_refuses_a_signed_out_request(client, data):
    from sample.config.urls import progress_patterns

    progress = progress_patterns().url_patterns[0]
    request = RequestFactory().get("/", {"task_name": "made-up-key"})
    request.user = AnonymousUser()
    response = progress.callback(request)
    assert response.status_code == 403
    assert b"Completed successfully" not in response.content


# --------------------------------------------------------------------------------------------
# the two save() styles, inside a task (what a worker sees) and outside
# --------------------------------------------------------------------------------------------


@pytest.mark.stack
@override_settings(OTEL_TASKCTX=NO_THROTTLE)
def test_book_save_inside_a_task_updates_chapters_inline_under_its_key(data, broker):
    manager = SampleAsyncManager()
    book = Book.objects.order_by("pk").first()
    key = "c3b1f0a2-0000-4000-8000-000000000001"
    with task_context(key, SampleAsyncManager.class_path()):
        book.status = Book.Status.PUBLISHED
        book.save()
    chapters = list(book.chapters.order_by("number"))
    assert {c.status for c in chapters} == {"published"}
    assert all(c.synced_at is not None for c in chapters)
    assert holders("library.chapter", [c.pk for c in chapters]) == {
        str(c.pk): key for c in chapters
    }
    n = len(chapters)
    assert manager.get_progress(key).endswith(f"chapter {n}/{n} synced (100%)")
    assert broker.queue_size() == 0  # nothing escaped to the queue
    manager.remove_active_task(key)


@pytest.mark.stack
@override_settings(OTEL_TASKCTX=NO_THROTTLE)
def test_book_progress_in_a_bulk_job_is_the_jobs_fraction(data, broker):
    """In powercrud's bulk job the nested message carries the job's fraction: books done
    (powercrud's own "updating: i/n") plus chapters within the current book."""
    manager = SampleAsyncManager()
    key = "c3b1f0a2-0000-4000-8000-000000000003"
    first, second = Book.objects.order_by("pk")[:2]
    # the dashboard row powercrud writes at launch: bulk_update_task's args (selected_ids 2nd)
    AsyncTaskRecord.objects.create(
        task_name=key, task_args=["library.Book", [1, 2, 3, 4], None, [], ["status"], []]
    )
    with task_context(key, SampleAsyncManager.class_path()):
        manager.update_progress(key, "starting update")  # powercrud, before the first book
        first.status = Book.Status.PUBLISHED
        first.save()
        n = first.chapters.count()
        assert manager.get_progress(key).endswith(f"(book 1/4): chapter {n}/{n} synced (25%)")
        manager.update_progress(key, "updating: 1/4")  # powercrud: one of four books done
        book = second
        book.status = Book.Status.PUBLISHED
        book.save()
        n = book.chapters.count()
        # 1 book + all n chapters of the second, of 4 books x n chapters
        assert manager.get_progress(key).endswith(f"(book 2/4): chapter {n}/{n} synced (50%)")
        manager.update_progress(key, "completed update: 4 processed")
    manager.remove_active_task(key)


@pytest.mark.stack
def test_the_fan_out_page_queues_a_bulk_edit_that_fans_out(signed_in, user, broker):
    """The sample's fan-out switch: the *Albums (fan-out)* page's bulk edit runs powercrud's
    update with the FanOutBulkUpdate backend, under which Album.save() launches the
    fan-out twin of the repricing (a child job on another worker)."""
    from otel_taskctx.policy import may_fan_out

    ids = list(Album.objects.order_by("pk").values_list("pk", flat=True))[:2]
    submission = submit_bulk_edit(views.AlbumFanOutCRUDView, ids, {"price_tier": "premium"}, user)
    assert submission.queued, submission
    (job,) = queued(broker)
    assert job["func"] == "powercrud.tasks.bulk_update_task"
    assert job["kwargs"]["bulk_update_persistence_backend_path"] == (
        "sample.library.bulk.FanOutBulkUpdate"
    )
    assert may_fan_out("sample.library.tasks.reprice_album_tracks_fanned_out")
    assert not may_fan_out("sample.library.tasks.reprice_album_tracks")
    SampleAsyncManager().remove_active_task(submission.task_key)
    response = signed_in.get("/sample/library/album-fan-out/")
    assert response.status_code == 200 and b"Albums (fan-out)" in response.content


@pytest.mark.stack
@override_settings(OTEL_TASKCTX=NO_THROTTLE)
def test_unchanged_album_save_inside_a_task_runs_its_nested_launch_inline(data, broker):
    manager = SampleAsyncManager()
    album = Album.objects.order_by("pk").first()
    key = "c3b1f0a2-0000-4000-8000-000000000002"
    with task_context(key, SampleAsyncManager.class_path()):
        album.price_tier = Album.PriceTier.PREMIUM
        album.save()  # calls AsyncManager().launch_async_task(...) for the tracks
    tracks = list(album.tracks.all())
    assert {t.price for t in tracks} == {Decimal("1.29")}
    assert holders("library.track", [t.pk for t in tracks]) == {str(t.pk): key for t in tracks}
    assert "repriced" in manager.get_progress(key)
    assert broker.queue_size() == 0
    manager.remove_active_task(key)


@pytest.mark.stack
def test_album_save_outside_a_task_queues_the_track_job(data, broker):
    album = Album.objects.order_by("pk").first()
    album.price_tier = Album.PriceTier.PREMIUM
    album.save()
    (job,) = queued(broker)
    assert job["func"] == "sample.library.tasks.reprice_album_tracks"
    tracks = list(album.tracks.values_list("pk", flat=True))
    assert holders("library.track", tracks) == {str(t): job["name"] for t in tracks}
    assert set(Track.objects.filter(pk__in=tracks).values_list("price", flat=True)) != {
        Decimal("1.29")
    }
    SampleAsyncManager().remove_active_task(job["name"])


def test_saves_that_change_nothing_tracked_launch_nothing(data, broker):
    book = Book.objects.order_by("pk").first()
    book.title = "A new title"
    book.save()
    album = Album.objects.order_by("pk").first()
    album.label = "Another label"
    album.save()
    assert broker.queue_size() == 0


# --------------------------------------------------------------------------------------------
# seeding and the dashboard
# --------------------------------------------------------------------------------------------


def test_seed_command_sizes(db, capsys):
    call_command("sample_seed", books=3, chapters=2, albums=2, tracks=4)
    assert (Book.objects.count(), Chapter.objects.count()) == (3, 6)
    assert (Album.objects.count(), Track.objects.count()) == (2, 8)
    assert not Book.objects.filter(status="published").exists()
    call_command("sample_seed", books=1, chapters=1, albums=0, tracks=0, keep=True)
    assert Book.objects.count() == 4
    call_command("sample_seed", books=2, chapters=0, albums=0, tracks=0)
    assert (Book.objects.count(), Chapter.objects.count(), Album.objects.count()) == (2, 0, 0)
    user = ensure_demo_user()
    assert user.is_staff and user.check_password("demo")
    assert "Seeded 2 books" in capsys.readouterr().out


def test_dashboard_row_links_to_the_job_tree(signed_in):
    record = AsyncTaskRecord.objects.create(task_name="c3b1f0a2-0000-4000-8000-000000000003")
    listing = signed_in.get("/sample/library/jobs/").content.decode()
    trace_url = f"/sample/library/jobs/{record.pk}/trace/"
    assert trace_url in listing
    response = signed_in.get(trace_url)
    assert response.status_code == 302
    assert response["Location"] == reverse(
        "otel_taskctx:tree_detail", kwargs={"task_key": record.task_name}
    )


def test_dashboard_lists_the_newest_job_first(signed_in):
    now = timezone.now()
    keys = [f"c3b1f0a2-0000-4000-8000-00000000001{i}" for i in range(3)]
    for age, key in zip((3, 1, 2), keys, strict=True):  # launched 3, 1 and 2 minutes ago
        record = AsyncTaskRecord.objects.create(task_name=key)
        AsyncTaskRecord.objects.filter(pk=record.pk).update(created_at=now - timedelta(minutes=age))

    def listed(url):
        page = signed_in.get(url).content.decode()
        return sorted(keys, key=page.index)

    assert listed("/sample/library/jobs/") == [keys[1], keys[2], keys[0]]
    # a click on a column header still sorts by that column
    assert listed("/sample/library/jobs/?sort=created_at") == [keys[0], keys[2], keys[1]]
