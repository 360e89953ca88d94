"""Viewer pages: the list of job trees, one job's tree, and the same as JSON.

Who may use the viewer, and which job trees each user may see (docs/viewer.md, "Who sees
what"): superusers every tree, others the trees of the jobs they launched, as powercrud's
async dashboard attributes them, or ``OTEL_TASKCTX["VIEWER_TASK_FILTER"]``'s choice.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Q, QuerySet
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.module_loading import import_string
from django.views.decorators.http import require_GET

from otel_taskctx.conf import get_setting
from otel_taskctx.models import TaskSpan
from otel_taskctx.spans import queries
from otel_taskctx.spans.render import format_duration, render_text
from otel_taskctx.spans.rows import ns_to_datetime

PAGE_SIZE = 25
#: milliseconds between two refreshes of a running job's page
REFRESH_MS = 2000
NOSCRIPT_LINES = 2000
log = logging.getLogger("otel_taskctx.viewer")


def has_viewer_access(user: Any) -> bool:
    """``VIEWER_PERMISSION``: "staff" (default), "superuser", a permission "app.codename", or
    a callable (or its dotted path) ``f(user) -> bool``."""
    if user is None or not getattr(user, "is_authenticated", False) or not user.is_active:
        return False
    if user.is_superuser:
        return True
    rule = get_setting("VIEWER_PERMISSION") or "staff"
    if rule in ("staff", "superuser"):
        return rule == "staff" and bool(user.is_staff)
    if isinstance(rule, str):
        try:  # a dotted path to a function f(user) -> bool ...
            rule = import_string(rule)
        except ImportError:  # ... or a permission "app_label.codename"
            return bool(user.has_perm(rule))
    if not callable(rule):
        log.error("OTEL_TASKCTX['VIEWER_PERMISSION'] = %r is not understood", rule)
        return False
    return bool(rule(user))


class _Dashboard:
    """A ``ModelTrackingAsyncManager``'s dashboard records, read through powercrud's public
    API: the manager's ``format_user`` and its ``AsyncDashboardConfig`` (record model path,
    ``resolve_field``)."""

    def __init__(self, cls: type, config: Any) -> None:
        from django.apps import apps
        from powercrud.async_dashboard import AsyncDashboardConfig

        if isinstance(config, dict):
            config = AsyncDashboardConfig(**config)
        self.manager = cls(config=config) if config is not None else cls()
        if config is None:
            path, fields = self.manager.get_record_model_path(), self.manager.field_map
            config = AsyncDashboardConfig(record_model_path=path, field_map=fields)
        self.model = apps.get_model(config.record_model_path)
        self.task_field = config.resolve_field("task_name", "task_name")
        self.user_field = config.resolve_field("user", "user_label")
        for name in (self.task_field, self.user_field):
            self.model._meta.get_field(name)  # none or a missing field: this dashboard is skipped

    def records(self, **lookup: Any) -> QuerySet:
        return self.model.objects.filter(**lookup)

    def user_value(self, user: Any) -> Any:
        """The user field's value for ``user`` (as powercrud writes it: text for a text field)."""
        label = self.manager.format_user(user)
        field = self.model._meta.get_field(self.user_field)
        if field.get_internal_type() in ("CharField", "TextField") and not isinstance(label, str):
            label = json.dumps(label, default=str)
        return label


def _dashboards(spans: QuerySet) -> list[_Dashboard]:
    """The dashboards of the managers that launched stored jobs (and the project's default)."""
    try:
        from powercrud.async_dashboard import ModelTrackingAsyncManager
        from powercrud.conf import get_powercrud_setting
    except ImportError:
        return []
    managers = spans.exclude(manager="").values_list("manager", flat=True).distinct()[:50]
    paths: dict[str, Any] = dict.fromkeys(managers)
    default = get_powercrud_setting("ASYNC_MANAGER_DEFAULT", {}) or {}
    if isinstance(default, dict) and default.get("manager_class"):
        paths[default["manager_class"]] = default.get("config")
    out = []
    for path in sorted(paths):
        try:
            cls = import_string(path)
            if isinstance(cls, type) and issubclass(cls, ModelTrackingAsyncManager):
                out.append(_Dashboard(cls, paths[path]))
        except Exception:
            log.debug("could not load the dashboard of %s", path, exc_info=True)
    return out


def dashboard_user(root_task_key: str, spans: QuerySet | None = None) -> str | None:
    """The user label powercrud's dashboard record holds for a job, if there is one."""
    for dashboard in _dashboards(queries.of_tree(root_task_key) if spans is None else spans):
        records = dashboard.records(**{dashboard.task_field: root_task_key})
        value = records.values_list(dashboard.user_field, flat=True).first()
        if value:
            return str(value)
    return None


def own_spans(user: Any, spans: QuerySet | None = None) -> QuerySet:
    """The spans of the job trees ``user`` launched (the default scope)."""
    from django.db import router

    spans = TaskSpan.objects.all() if spans is None else spans
    getter = getattr(user, "get_username", None)
    label = str(getter()) if callable(getter) else str(user)
    mine = TaskSpan.objects.filter(Q(user_id=str(user.pk)) | Q(user_label=label))
    roots = Q(root_task_key__in=mine.exclude(root_task_key=None).values("root_task_key"))
    for dashboard in _dashboards(spans):
        records = dashboard.records(**{dashboard.user_field: dashboard.user_value(user)})
        names = records.values_list(dashboard.task_field, flat=True)
        if router.db_for_read(dashboard.model) != router.db_for_read(TaskSpan):
            names = list(names[:10000])  # another database: no subquery
        roots |= Q(root_task_key__in=names)
    return spans.filter(roots)


def visible_spans(request: Any) -> QuerySet:
    """The spans whose trees ``request.user`` may see."""
    user = request.user
    spans = TaskSpan.objects.all()
    if not has_viewer_access(user):
        return spans.none()
    if user.is_superuser:
        return spans
    hook = get_setting("VIEWER_TASK_FILTER")
    if hook:
        return (import_string(hook) if isinstance(hook, str) else hook)(request, spans)
    return own_spans(user, spans)


def viewer_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """GET only; anonymous users go to the login page, users without viewer access get 403."""

    @require_GET
    @functools.wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        user = getattr(request, "user", None)
        if user is None or not user.is_authenticated:
            return redirect_to_login(request.get_full_path())
        if not has_viewer_access(user):
            raise PermissionDenied("you may not use the task viewer")
        return view(request, *args, **kwargs)

    return wrapper


def _page(request: HttpRequest) -> tuple[Any, list[dict[str, Any]], str, str]:
    """The requested page of job summaries (displayable), the status filter and search."""
    status = request.GET.get("status") or ""
    status = status if status in queries.STATUSES else ""
    search = (request.GET.get("q") or "").strip()[:200]
    rows = queries.tree_summaries(visible_spans(request), status or None, search or None)
    page = Paginator(rows, PAGE_SIZE).get_page(request.GET.get("page"))
    items = queries.decorate_summaries(list(page.object_list))
    for row in items:
        row["started"] = ns_to_datetime(row["start_ns"])
        row["duration"] = format_duration(row["duration_ns"])
        if not row.get("user_label") and not row.get("user_id"):
            row["user_label"] = dashboard_user(row["root_task_key"]) or ""
        row["url"] = reverse("otel_taskctx:tree_detail", args=[row["root_task_key"]])
    return page, items, status, search


@viewer_required
def tree_list(request: HttpRequest) -> HttpResponse:
    page, items, status, search = _page(request)
    query = request.GET.copy()
    query.pop("page", None)
    context = {
        "base_template": get_setting("VIEWER_BASE_TEMPLATE"),
        "page": page,
        "trees": items,
        "status": status,
        "statuses": queries.STATUSES,
        "search": search,
        "query": query.urlencode(),
        "any_running": any(i["status"] == "running" for i in items),
    }
    return render(request, "otel_taskctx/tree_list.html", context)


@viewer_required
def tree_list_json(request: HttpRequest) -> JsonResponse:
    page, items, _, _ = _page(request)
    for row in items:
        row["started"] = row["started"].isoformat()
    paginator = page.paginator
    data = {"page": page.number, "pages": paginator.num_pages, "count": paginator.count}
    return JsonResponse({**data, "trees": items})


def _tree(request: HttpRequest, task_key: str) -> Any:
    """The tree of ``task_key``'s job; 404 when unknown or not this user's (the same answer)."""
    root_key = queries.resolve_root_key(task_key, visible_spans(request))
    tree = queries.load_tree(root_key) if root_key is not None else None
    if tree is None:
        raise Http404("no stored job tree for this task")
    return tree


def _payload(request: HttpRequest, tree: Any) -> dict[str, Any]:
    data = tree.to_dict()
    key = tree.root_task_key
    data["urls"] = {
        "detail": request.build_absolute_uri(reverse("otel_taskctx:tree_detail", args=[key])),
        "json": reverse("otel_taskctx:tree_json", args=[key]),
        "list": reverse("otel_taskctx:tree_list"),
    }
    if not data.get("user_label") and not data.get("user_id"):
        data["user_label"] = dashboard_user(key) or ""
    return data


@viewer_required
def tree_detail(request: HttpRequest, task_key: str) -> HttpResponse:
    tree = _tree(request, task_key)
    if tree.root_task_key != task_key:  # a nested task: the job's permalink, focused on it
        url = reverse("otel_taskctx:tree_detail", args=[tree.root_task_key])
        focus = next((n for n in tree.nodes if n.task_key == task_key), None)
        return redirect(url + (f"#span-{focus.id}" if focus is not None else ""))
    summary = tree.summary()
    context = {
        "base_template": get_setting("VIEWER_BASE_TEMPLATE"),
        "tree": _payload(request, tree),
        "summary": summary,
        "started": ns_to_datetime(summary["start_ns"]) if summary["start_ns"] else None,
        "duration": format_duration(tree.duration_ns),
        "text_tree": render_text(tree)[:NOSCRIPT_LINES],
        "refresh_ms": REFRESH_MS,
        "generated_ns": time.time_ns(),
    }
    return render(request, "otel_taskctx/tree_detail.html", context)


@viewer_required
def tree_json(request: HttpRequest, task_key: str) -> JsonResponse:
    tree = _tree(request, task_key)
    return JsonResponse(_payload(request, tree), json_dumps_params={"default": str})
