#: Libraries this instrumentation patches. powercrud (``django-powercrud >= 0.9``) is patched
#: too when it is installed, but it is optional: plain django-q2 jobs are instrumented without it.
_instruments = ("django-q2 >= 1.6",)

_supports_metrics = False
