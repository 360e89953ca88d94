"""URLs of the sample project."""

from __future__ import annotations

import importlib.util
from functools import wraps

from django.contrib.auth.views import LogoutView
from django.http import JsonResponse
from django.urls import include, path
from powercrud.async_manager import AsyncManager

from sample.library import views

#: the sample's own pages (the test suite mounts these under /sample/)
site_patterns = [
    path("", views.home, name="home"),
    path("accounts/login/", views.SampleLoginView.as_view(), name="login"),
    path("accounts/demo-login/", views.demo_login, name="demo-login"),
    path("accounts/logout/", LogoutView.as_view(), name="logout"),
    path("library/", include("sample.library.urls")),
]


def signed_in_only(view):
    """powercrud's progress endpoint answers anyone; here only a signed-in user (403 JSON)."""

    @wraps(view)
    def wrapper(request, *args, **kwargs):
        if not request.user.is_authenticated:
            return JsonResponse({"error": "sign in to read a job's progress"}, status=403)
        return view(request, *args, **kwargs)

    return wrapper


def progress_patterns():
    """powercrud's ``AsyncManager.get_urlpatterns()`` (same URL and namespace), signed-in only."""
    progress = AsyncManager.get_url(name="async_progress")
    progress.callback = signed_in_only(progress.callback)
    return path("powercrud/", include(([progress], "powercrud"), namespace="powercrud"))


urlpatterns = [
    *site_patterns,
    # powercrud's progress endpoint, polled by its bulk-edit modal (namespace "powercrud")
    progress_patterns(),
]


def _viewer_spec():
    try:
        return importlib.util.find_spec("otel_taskctx.viewer.urls")
    except ModuleNotFoundError:  # no otel_taskctx.viewer package
        return None


# otel_taskctx's job-tree viewer (namespace "otel_taskctx"), when installed
if _viewer_spec() is not None:
    urlpatterns.append(path("taskctx/", include("otel_taskctx.viewer.urls")))
