"""URLs of the job-tree viewer: ``path("taskctx/", include("otel_taskctx.viewer.urls"))``."""

from django.urls import path

from otel_taskctx.viewer import views

app_name = "otel_taskctx"

urlpatterns = [
    path("", views.tree_list, name="tree_list"),
    path("jobs.json", views.tree_list_json, name="tree_list_json"),
    path("job/<path:task_key>/", views.tree_detail, name="tree_detail"),
    path("api/job/<path:task_key>", views.tree_json, name="tree_json"),
]
