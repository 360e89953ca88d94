"""Who may use the viewer, and which job trees each user may see (docs/viewer.md, "Who sees
what"): superusers every tree, others the trees of the jobs they launched, as powercrud's
async dashboard attributes them, or ``OTEL_TASKCTX["VIEWER_TASK_FILTER"]``'s choice."""

from __future__ import annotations

import json
import logging
from typing import Any

from django.db.models import Q, QuerySet
from django.utils.module_loading import import_string

from otel_taskctx.conf import get_setting
from otel_taskctx.models import TaskSpan
from otel_taskctx.spans.queries import of_tree

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
            if name:
                self.model._meta.get_field(name)  # a missing field: this dashboard is skipped

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
    for dashboard in _dashboards(of_tree(root_task_key) if spans is None else spans):
        if dashboard.task_field and dashboard.user_field:
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
        if not (dashboard.task_field and dashboard.user_field):
            continue
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
