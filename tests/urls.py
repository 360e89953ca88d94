from django.urls import path

from tests.testapp import views as testapp_views

urlpatterns = [
    path("probe/nested/", testapp_views.nested_probe, name="nested-probe"),
]
