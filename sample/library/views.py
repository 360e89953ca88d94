"""powercrud screens of the sample: CRUD with async bulk edit/delete, and the async dashboard."""

from __future__ import annotations

from django.apps import apps
from django.conf import settings
from django.contrib.auth import get_user_model, login
from django.contrib.auth.decorators import login_required
from django.contrib.auth.mixins import LoginRequiredMixin
from django.contrib.auth.views import LoginView
from django.http import Http404, HttpResponseBadRequest
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html, format_html_join
from django.utils.http import url_has_allowed_host_and_scheme
from neapolitan.views import CRUDView, Role
from powercrud.mixins import PowerCRUDAsyncMixin

from sample.library import models
from sample.library.async_manager import SampleAsyncManager

DEMO_USERNAME = "demo"
DEMO_PASSWORD = "demo"


class SampleCRUDView(LoginRequiredMixin, PowerCRUDAsyncMixin, CRUDView):
    """Shared configuration: HTMX + modals, async bulk edit with the dashboard manager."""

    namespace = "library"
    base_template_path = "library/base.html"
    use_htmx = True
    use_modal = True
    use_crispy = False
    paginate_by = 25
    page_size_options = [10, 25, 50, 100]
    async_manager_class_path = SampleAsyncManager.class_path()
    bulk_async = True
    # two or more selected rows run as a background job (one row runs in the request)
    bulk_min_async_records = 2
    bulk_async_conflict_checking = True
    bulk_delete = True
    show_record_count = True
    #: the refused ids of this request (powercrud's conflict message then names their holders)
    refused_ids: list | None = None

    def dispatch(self, request, *args, **kwargs):
        # a save() in this request that launches a follow-on job (a book's form -> its
        # chapters' job) names the signed-in user on powercrud's dashboard
        token = models.launching_user.set(request.user)
        try:
            return super().dispatch(request, *args, **kwargs)
        finally:
            models.launching_user.reset(token)

    def _check_for_conflicts(self, selected_ids=None):
        refused = super()._check_for_conflicts(selected_ids)
        self.refused_ids = list(selected_ids or []) if refused else None
        return refused

    def _render_bulk_conflict_response(self, request, selected_ids, delete_selected):
        self.refused_ids = list(selected_ids)
        return super()._render_bulk_conflict_response(request, selected_ids, delete_selected)

    def get_bulk_form_component_context(self):
        # powercrud spreads this over its conflict context: name the objects and their job
        context = super().get_bulk_form_component_context()
        if self.refused_ids:
            message = conflict_message(self.model, self.refused_ids)
            if message:
                context["conflict_message"] = message
        return context

    def _handle_async_bulk_operation(
        self, request, selected_ids, delete_selected, bulk_fields, fields_to_update, field_data
    ):
        # powercrud 0.9.16 puts each field's rendered form control (a BoundField) into the
        # job's arguments; once a form has been rendered, pickling it drags in the template
        # engine and fails ("Can't pickle <function ...>"), so the job is never queued. The
        # worker never reads the control: queue the job without it.
        return super()._handle_async_bulk_operation(
            request,
            selected_ids,
            delete_selected,
            bulk_fields,
            fields_to_update,
            worker_field_data(field_data),
        )


#: how many refused objects a conflict message names before "and N more"
NAMED_OBJECTS = 5


def conflict_message(model: type, ids: list) -> str | None:
    """'Books 19, 20 and 3 more are held by job 193414a3…' (a link to its trace): the refused
    objects that are locked, by holding job (otel_taskctx's conflict store); None if none is."""
    from otel_taskctx import get_conflict_store

    label = f"{model._meta.app_label}.{model._meta.model_name}"
    try:
        held = get_conflict_store(SampleAsyncManager()).holders({label: ids}).get(label, {})
    except Exception:  # the store cannot be read: powercrud's own message stays
        return None
    by_job: dict[str, list[str]] = {}
    for obj_id in ids:
        holder = held.get(obj_id, held.get(str(obj_id)))
        if holder is not None:
            by_job.setdefault(holder, []).append(str(obj_id))
    parts = []
    for job, objects in by_job.items():
        named = ", ".join(objects[:NAMED_OBJECTS])
        if len(objects) > NAMED_OBJECTS:
            named += f" and {len(objects) - NAMED_OBJECTS} more"
        url = viewer_url(job)
        link = format_html('<a class="link" href="{}">{}…</a>', url, job[:8]) if url else job
        meta = model._meta
        noun, verb = (
            (meta.verbose_name, "is") if len(objects) == 1 else (meta.verbose_name_plural, "are")
        )
        parts.append((str(noun).capitalize(), named, verb, job, link))
    if not parts:
        return None
    return format_html(
        "Another bulk operation is already running on {}: {} Try again when it has ended.",
        model._meta.verbose_name_plural,
        format_html_join(
            " ",
            '{} {} {} held by job <span data-holder="{}">{}</span>.',
            parts,
        ),
    )


def worker_field_data(field_data: list[dict]) -> list[dict]:
    """powercrud's bulk ``field_data`` without the form controls that cannot be pickled."""
    return [
        {**item, "info": {k: v for k, v in (item.get("info") or {}).items() if k != "control"}}
        for item in field_data
    ]


class BookCRUDView(SampleCRUDView):
    model = models.Book
    view_title = "Books"
    view_instructions = (
        "Book.save() uses the otel_taskctx helpers: in a bulk-edit job it locks the chapters "
        "under the job's key and updates them inline, with progress."
    )
    fields = ["title", "author", "genre", "status", "edition", "published_on"]
    properties = ["chapter_count"]
    detail_fields = ["title", "author", "genre", "status", "edition", "published_on", "updated_at"]
    detail_properties = ["chapter_count"]
    form_fields = ["title", "author", "genre", "status", "edition", "published_on"]
    bulk_fields = ["status", "edition", "genre"]
    filterset_fields = ["status", "genre", "author"]


class ChapterCRUDView(SampleCRUDView):
    model = models.Chapter
    view_title = "Chapters"
    view_instructions = "Descendants of books: a book's status and edition are copied here."
    fields = ["book", "number", "title", "words", "status", "edition", "synced_at"]
    detail_fields = fields
    form_fields = ["book", "number", "title", "words", "status", "edition"]
    bulk_fields = ["status", "edition"]
    filterset_fields = ["book", "status", "edition"]
    column_value_formats = {"synced_at": "datetime"}


class AlbumCRUDView(SampleCRUDView):
    model = models.Album
    view_title = "Albums"
    view_instructions = (
        "Album.save() is unchanged powercrud-style code: it launches a nested job for its "
        "tracks. Inside a bulk-edit job, otel_taskctx runs that job inline, under the "
        "bulk job's key."
    )
    fields = ["title", "artist", "label", "price_tier", "released_on"]
    properties = ["track_count"]
    detail_fields = ["title", "artist", "label", "price_tier", "released_on", "updated_at"]
    detail_properties = ["track_count"]
    form_fields = ["title", "artist", "label", "price_tier", "released_on"]
    bulk_fields = ["price_tier", "label"]
    filterset_fields = ["price_tier", "artist"]


class AlbumFanOutCRUDView(AlbumCRUDView):
    """The albums again, with the sample's fan-out switch on for their bulk edits."""

    url_base = "album-fan-out"
    view_title = "Albums (fan-out)"
    view_instructions = (
        "The same albums. A bulk edit here fans out: each Album.save() launches the repricing "
        "of its tracks as a child job on another worker, and the bulk job completes when the "
        "last child has."
    )
    bulk_update_persistence_backend_path = "sample.library.bulk.FanOutBulkUpdate"


class TrackCRUDView(SampleCRUDView):
    model = models.Track
    view_title = "Tracks"
    view_instructions = "Descendants of albums: repriced when the album's price tier changes."
    fields = ["album", "number", "title", "duration_seconds", "price", "repriced_at"]
    detail_fields = fields
    form_fields = ["album", "number", "title", "duration_seconds", "price"]
    bulk_fields = ["price"]
    filterset_fields = ["album", "price"]
    column_value_formats = {"repriced_at": "datetime"}


class AsyncTaskRecordCRUDView(SampleCRUDView):
    """powercrud's async dashboard: one row per job, kept by ``SampleAsyncManager``."""

    model = models.AsyncTaskRecord
    url_base = "jobs"
    view_title = "Async jobs"
    view_instructions = "powercrud's dashboard: every queued job, its status and progress."
    fields = [
        "task_name",
        "status",
        "user_label",
        "affected_objects",
        "progress_payload",
        "created_at",
        "completed_at",
    ]
    detail_fields = "__all__"
    column_value_formats = {"created_at": "datetime", "completed_at": "datetime"}
    # seven columns of powercrud's default 25ch are wider than a laptop's page: the long
    # texts (task name, affected objects, progress) are cut with an ellipsis instead
    table_max_col_width = 16
    filterset_fields = ["status"]
    # the task name opens the job's span tree (otel_taskctx's viewer)
    link_fields = {"task_name": {"view_name": "library:job-trace", "open_in": "current"}}
    bulk_fields = []
    bulk_async = False
    bulk_delete = True

    def _apply_queryset_sorting(self, queryset):
        # powercrud sorts by primary key (oldest first) unless a column header was clicked;
        # a job list shows the newest job, the one just launched, first
        if not self.request.GET.get("sort"):
            return queryset.order_by("-created_at", "-pk")
        return super()._apply_queryset_sorting(queryset)


def viewer_url(task_key: str | None = None) -> str | None:
    """otel_taskctx's job-tree viewer (a job's page with ``task_key``), when it is mounted."""
    try:
        if task_key:
            return reverse("otel_taskctx:tree_detail", kwargs={"task_key": task_key})
        return reverse("otel_taskctx:tree_list")
    except NoReverseMatch:
        return None


@login_required
def job_trace(request, pk):
    """From a dashboard row to the job's span tree in otel_taskctx's viewer."""
    record = get_object_or_404(models.AsyncTaskRecord, pk=pk)
    url = viewer_url(record.task_name)
    if url is None:
        raise Http404("otel_taskctx's viewer is not mounted")
    return redirect(url)


@login_required
def home(request):
    counts = {
        "books": models.Book.objects.count(),
        "chapters": models.Chapter.objects.count(),
        "albums": models.Album.objects.count(),
        "tracks": models.Track.objects.count(),
        "jobs": models.AsyncTaskRecord.objects.count(),
    }
    context = {
        "counts": counts,
        "viewer_url": viewer_url(),
        "stack": getattr(settings, "STACK", ""),
        "instrumented": apps.is_installed("otel_taskctx"),
    }
    return render(request, "library/home.html", context)


class SampleLoginView(LoginView):
    template_name = "library/login.html"
    extra_context = {"demo_username": DEMO_USERNAME, "demo_password": DEMO_PASSWORD}


def demo_login(request):
    """Sign in as the seeded demo user in one click (this is a sample, not a product)."""
    if request.method != "POST":
        return HttpResponseBadRequest("POST only")
    user = get_user_model().objects.filter(username=DEMO_USERNAME).first()
    if user is None:
        return HttpResponseBadRequest(
            "No demo user: run `python sample/manage.py sample_seed` first."
        )
    login(request, user, backend="django.contrib.auth.backends.ModelBackend")
    target = request.POST.get("next") or reverse("home")
    if not url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}):
        target = reverse("home")
    return redirect(target)


def crud_urls():
    from django.urls import path

    return [
        path("jobs/<int:pk>/trace/", job_trace, name="job-trace"),
        *BookCRUDView.get_urls(),
        *ChapterCRUDView.get_urls(),
        *AlbumCRUDView.get_urls(),
        *AlbumFanOutCRUDView.get_urls(),
        *TrackCRUDView.get_urls(),
        *AsyncTaskRecordCRUDView.get_urls(roles={Role.LIST, Role.DETAIL, Role.DELETE}),
    ]
