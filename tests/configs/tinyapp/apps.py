from django.apps import AppConfig


class TinyAppConfig(AppConfig):
    name = "tests.configs.tinyapp"
    label = "tinyapp"
    default_auto_field = "django.db.models.BigAutoField"
