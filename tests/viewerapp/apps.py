from django.apps import AppConfig


class ViewerAppConfig(AppConfig):
    name = "tests.viewerapp"
    label = "viewerapp"
    default_auto_field = "django.db.models.BigAutoField"
