"""Viewer pages: the list of job trees, one job's tree, and the same tree as JSON."""

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
from otel_taskctx.spans.queries import (
    STATUSES,
    decorate_summaries,
    load_tree,
    resolve_root_key,
    tree_summaries,
)
from otel_taskctx.spans.render import format_duration, render_text
from otel_taskctx.spans.rows import ns_to_datetime
from otel_taskctx.viewer.access import dashboard_user, has_viewer_access, visible_spans

PAGE_SIZE = 25
#: milliseconds between two refreshes of a running job's page
REFRESH_MS = 2000
NOSCRIPT_LINES = 2000


def viewer_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Anonymous users go to the login page; users without viewer access get 403."""

    @functools.wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        user = getattr(request, "user", None)
        if user is None or not user.is_authenticated:
            return redirect_to_login(request.get_full_path())
        if not has_viewer_access(user):
            raise PermissionDenied("you may not use the task viewer")
        return view(request, *args, **kwargs)

    return wrapper


def _base_context() -> dict[str, Any]:
    return {"base_template": get_setting("VIEWER_BASE_TEMPLATE") or "otel_taskctx/base.html"}


def _summaries(request: HttpRequest) -> tuple[Any, str, str]:
    status = request.GET.get("status") or ""
    if status not in STATUSES:
        status = ""
    search = (request.GET.get("q") or "").strip()[:200]
    rows = tree_summaries(visible_spans(request), status=status or None, search=search or None)
    return rows, status, search


def _display(row: dict[str, Any]) -> dict[str, Any]:
    row["started"] = ns_to_datetime(row["start_ns"])
    row["duration"] = format_duration(row["duration_ns"])
    if not row.get("user_label") and not row.get("user_id"):
        row["user_label"] = dashboard_user(row["root_task_key"]) or ""
    row["url"] = reverse("otel_taskctx:tree_detail", args=[row["root_task_key"]])
    return row


def _page(request: HttpRequest) -> tuple[Any, str, str]:
    """The requested page of job summaries, with the status filter and search text."""
    rows, status, search = _summaries(request)
    return Paginator(rows, PAGE_SIZE).get_page(request.GET.get("page")), status, search


@require_GET
@viewer_required
def tree_list(request: HttpRequest) -> HttpResponse:
    page, status, search = _page(request)
    items = [_display(r) for r in decorate_summaries(list(page.object_list))]
    query = request.GET.copy()
    query.pop("page", None)
    context = {
        **_base_context(),
        "page": page,
        "trees": items,
        "status": status,
        "statuses": STATUSES,
        "search": search,
        "query": query.urlencode(),
        "any_running": any(i["status"] == "running" for i in items),
    }
    return render(request, "otel_taskctx/tree_list.html", context)


@require_GET
@viewer_required
def tree_list_json(request: HttpRequest) -> JsonResponse:
    page, _, _ = _page(request)
    items = []
    for row in decorate_summaries(list(page.object_list)):
        row = _display(row)
        row["started"] = row["started"].isoformat()
        items.append(row)
    return JsonResponse(
        {
            "page": page.number,
            "pages": page.paginator.num_pages,
            "count": page.paginator.count,
            "trees": items,
        }
    )


def _load_visible(request: HttpRequest, task_key: str) -> Any:
    spans = visible_spans(request)
    root_key = resolve_root_key(task_key, spans)
    if root_key is None:  # unknown, or not this user's: the same answer either way
        raise Http404("no stored job tree for this task")
    tree = load_tree(root_key)
    if tree is None:
        raise Http404("no stored job tree for this task")
    return tree


def _tree_payload(request: HttpRequest, tree: Any) -> dict[str, Any]:
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


@require_GET
@viewer_required
def tree_detail(request: HttpRequest, task_key: str) -> HttpResponse:
    tree = _load_visible(request, task_key)
    if tree.root_task_key != task_key:  # a nested task: the job's permalink, focused on it
        url = reverse("otel_taskctx:tree_detail", args=[tree.root_task_key])
        focus = next((n for n in tree.nodes if n.task_key == task_key), None)
        return redirect(url + (f"#span-{focus.id}" if focus is not None else ""))
    data = _tree_payload(request, tree)
    summary = tree.summary()
    text = render_text(tree)
    context = {
        **_base_context(),
        "tree": data,
        "summary": summary,
        "started": ns_to_datetime(summary["start_ns"]) if summary["start_ns"] else None,
        "duration": format_duration(tree.duration_ns),
        "text_tree": text[:NOSCRIPT_LINES],
        "refresh_ms": REFRESH_MS,
        "generated_ns": time.time_ns(),
    }
    return render(request, "otel_taskctx/tree_detail.html", context)


@require_GET
@viewer_required
def tree_json(request: HttpRequest, task_key: str) -> JsonResponse:
    tree = _load_visible(request, task_key)
    return JsonResponse(_tree_payload(request, tree), json_dumps_params={"default": str})
