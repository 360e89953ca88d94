from django.urls import include, path
from powercrud.async_manager import AsyncManager

from sample.config.urls import site_patterns as sample_patterns
from tests.testapp import views as testapp_views

urlpatterns = [
    path("probe/nested/", testapp_views.nested_probe, name="nested-probe"),
    path("taskctx/", include("otel_taskctx.viewer.urls")),
    # the sample project's pages, and powercrud's progress endpoint (namespace "powercrud")
    path("sample/", include(sample_patterns)),
    AsyncManager.get_urlpatterns(),
]
