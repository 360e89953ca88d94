#: Libraries this instrumentation needs. django-q2 (``django-q2 >= 1.10``), powercrud
#: (``django-powercrud >= 0.9.16``) and django.tasks (Django 6+) are each patched when present
#: and none is required: a ``django.tasks``-only project (``otel-taskctx[tasks]``) has no
#: django-q2, and BaseInstrumentor refuses to instrument at all when a listed one is missing.
_instruments = ("django >= 5.2",)

_supports_metrics = False
