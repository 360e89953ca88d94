from django.apps import AppConfig


class LibraryConfig(AppConfig):
    name = "sample.library"
    label = "library"
    verbose_name = "Sample library"
    default_auto_field = "django.db.models.BigAutoField"
