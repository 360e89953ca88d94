"""powercrud's async dashboard for the sample: lifecycle events go to ``AsyncTaskRecord``."""

from __future__ import annotations

from typing import Any

from powercrud.async_dashboard import ModelTrackingAsyncManager


class SampleAsyncManager(ModelTrackingAsyncManager):
    record_model_path = "library.AsyncTaskRecord"

    @classmethod
    def class_path(cls) -> str:
        return f"{cls.__module__}.{cls.__qualname__}"

    def format_user(self, user: Any) -> str:
        if not user or getattr(user, "is_anonymous", False):
            return "anonymous"
        return user.get_username() if hasattr(user, "get_username") else str(user)
