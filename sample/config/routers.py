"""Route the "runtime" tables (cache, locks, spans) to their own connection (see settings)."""

from __future__ import annotations

from django.conf import settings

#: app labels of the runtime tables: DatabaseCache's internal model, otel_taskctx's models
RUNTIME_APPS = {"django_cache", "otel_taskctx"}
#: single runtime models of other apps: powercrud's dashboard rows (written on every progress
#: event, also by threads other than the job's)
RUNTIME_MODELS = {("library", "asynctaskrecord")}
#: models of the runtime apps that stay with the jobs' own tables: the carrier of a queued
#: ``django.tasks`` task is written in the transaction that writes the task's row
JOB_MODELS = {("otel_taskctx", "taskcarrier")}


def is_runtime(app_label: str, model_name: str | None) -> bool:
    if (app_label, model_name) in JOB_MODELS:
        return False
    return app_label in RUNTIME_APPS or (app_label, model_name) in RUNTIME_MODELS


class RuntimeRouter:
    @property
    def alias(self) -> str:
        return getattr(settings, "RUNTIME_DB", "runtime")

    def _route(self, model) -> str | None:
        meta = model._meta
        return self.alias if is_runtime(meta.app_label, meta.model_name) else None

    def db_for_read(self, model, **hints):
        return self._route(model)

    def db_for_write(self, model, **hints):
        return self._route(model)

    def allow_relation(self, obj1, obj2, **hints):
        return None

    def allow_migrate(self, db, app_label, model_name=None, **hints):
        runtime = db == self.alias
        if app_label == "django_cache":  # createcachetable
            return runtime
        if not getattr(settings, "RUNTIME_DB_SEPARATE", True):
            # one physical database (PostgreSQL): migrations run once, through "default"
            return not runtime
        if is_runtime(app_label, model_name):
            return runtime
        return False if runtime else None
