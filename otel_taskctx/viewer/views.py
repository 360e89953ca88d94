"""Viewer pages: the list of job trees, one job's tree, and the same as JSON."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET

from otel_taskctx.conf import get_setting
from otel_taskctx.spans import queries
from otel_taskctx.spans.render import format_duration, render_text
from otel_taskctx.spans.rows import ns_to_datetime
from otel_taskctx.viewer.access import dashboard_user, has_viewer_access, visible_spans

PAGE_SIZE = 25
#: milliseconds between two refreshes of a running job's page
REFRESH_MS = 2000
NOSCRIPT_LINES = 2000


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


def _base_template() -> str:
    return get_setting("VIEWER_BASE_TEMPLATE") or "otel_taskctx/base.html"


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
        "base_template": _base_template(),
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
        "base_template": _base_template(),
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
