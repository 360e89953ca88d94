"""Who may use the viewer, and which job trees each user may see.

* ``OTEL_TASKCTX["VIEWER_PERMISSION"]``: ``"staff"`` (default), ``"superuser"``, a permission
  ``"app_label.codename"``, or a dotted path / callable ``f(user) -> bool``.
* Superusers see every tree. Everyone else sees the trees of jobs they launched, the same
  scoping as powercrud's async dashboard: the dashboard record (``ModelTrackingAsyncManager``)
  of the job's root task names them (its user field equals the manager's
  ``format_user(user)``), or the job's spans carry their user id (``enduser.id``,
  ``taskctx.user_id``) or label.
* ``OTEL_TASKCTX["VIEWER_TASK_FILTER"]``: a dotted path of ``f(request, spans) -> spans``
  replacing that default for non-superusers (e.g. to scope by tenant).
"""

from __future__ import annotations

import logging
from typing import Any

from django.db.models import Q, QuerySet

from otel_taskctx.conf import get_setting
from otel_taskctx.models import TaskSpan
from otel_taskctx.spans.queries import of_tree

log = logging.getLogger("otel_taskctx.viewer")


def _load(value: Any) -> Any:
    if isinstance(value, str):
        from django.utils.module_loading import import_string

        return import_string(value)
    return value


def has_viewer_access(user: Any) -> bool:
    if user is None or not getattr(user, "is_authenticated", False) or not user.is_active:
        return False
    if user.is_superuser:
        return True
    rule = get_setting("VIEWER_PERMISSION") or "staff"
    if rule == "staff":
        return bool(user.is_staff)
    if rule == "superuser":
        return False
    if callable(rule):
        return bool(rule(user))
    if not isinstance(rule, str):
        log.error("OTEL_TASKCTX['VIEWER_PERMISSION'] = %r is not understood", rule)
        return False
    try:  # a dotted path to a function f(user) -> bool ...
        check = _load(rule)
    except ImportError:  # ... or a permission "app_label.codename"
        return bool(user.has_perm(rule))
    if not callable(check):
        log.error("OTEL_TASKCTX['VIEWER_PERMISSION'] = %r is not callable", rule)
        return False
    return bool(check(user))


def _dashboard_managers(spans: QuerySet) -> list[Any]:
    """The ``ModelTrackingAsyncManager`` instances that launched stored jobs."""
    try:
        from powercrud.async_dashboard import ModelTrackingAsyncManager
        from powercrud.async_manager import AsyncManager
    except Exception:
        return []
    paths: dict[str, Any] = {
        p: None for p in spans.exclude(manager="").values_list("manager", flat=True).distinct()[:50]
    }
    try:  # the project's default manager (and its config) launches most jobs
        from powercrud.conf import get_powercrud_setting

        default = get_powercrud_setting("ASYNC_MANAGER_DEFAULT", {}) or {}
        if isinstance(default, dict) and default.get("manager_class"):
            paths[default["manager_class"]] = default.get("config")
    except Exception:
        pass
    managers = []
    for path in sorted(paths):
        try:
            from django.utils.module_loading import import_string

            cls = import_string(path)
            if isinstance(cls, type) and issubclass(cls, ModelTrackingAsyncManager):
                managers.append(AsyncManager.resolve_manager(path, paths[path]))
        except Exception:
            log.debug("could not load async manager %s", path, exc_info=True)
    return managers


def dashboard_task_names(user: Any, spans: QuerySet | None = None) -> list[Any]:
    """Querysets of the task names powercrud's dashboard records attribute to ``user``."""
    spans = TaskSpan.objects.all() if spans is None else spans
    out = []
    for manager in _dashboard_managers(spans):
        try:
            task_field, user_field = _record_fields(manager)
            if not task_field or not user_field:
                continue
            label = manager.format_user(user)
            if label in (None, ""):
                continue
            label = manager._prepare_field_value(user_field, label)
            names = manager._record_model.objects.filter(**{user_field: label}).values_list(
                task_field, flat=True
            )
            out.append(names if _same_database(manager._record_model) else list(names[:10000]))
        except Exception:
            log.debug("could not read dashboard records of %r", manager, exc_info=True)
    return out


def dashboard_user(root_task_key: str, spans: QuerySet | None = None) -> str | None:
    """The user label powercrud's dashboard record holds for a job, if there is one."""
    spans = of_tree(root_task_key) if spans is None else spans
    for manager in _dashboard_managers(spans):
        try:
            task_field, user_field = _record_fields(manager)
            if not task_field or not user_field:
                continue
            value = (
                manager._record_model.objects.filter(**{task_field: root_task_key})
                .values_list(user_field, flat=True)
                .first()
            )
            if value:
                return str(value)
        except Exception:
            log.debug("could not read the dashboard record of %s", root_task_key, exc_info=True)
    return None


def _record_fields(manager: Any) -> tuple[str | None, str | None]:
    """The task-name and user fields of a manager's dashboard record model (None: absent)."""
    return manager._field("task_name", "task_name"), manager._field("user", "user_label")


def _same_database(model: Any) -> bool:
    from django.db import router

    return router.db_for_read(model) == router.db_for_read(TaskSpan)


def _user_label(user: Any) -> str:
    getter = getattr(user, "get_username", None)
    return str(getter()) if callable(getter) else str(user)


def own_spans(user: Any, spans: QuerySet | None = None) -> QuerySet:
    """The spans of the job trees ``user`` launched (the default scope)."""
    spans = TaskSpan.objects.all() if spans is None else spans
    mine = Q(user_id=str(user.pk)) | Q(user_label=_user_label(user))
    roots = Q(
        root_task_key__in=TaskSpan.objects.filter(mine)
        .exclude(root_task_key=None)
        .values("root_task_key")
    )
    for names in dashboard_task_names(user, spans):
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
        return _load(hook)(request, spans)
    return own_spans(user, spans)
