"""Settings of the host configurations a user has, one module each (``<name>_settings.py``).

``tests/test_host_configs.py`` starts each in subprocesses: ``django.setup()``, ``manage.py
check``, a nested launch on every queue the configuration has (``probe.py``) and ``manage.py
test`` of the tiny app (``tinyapp``). The database is an SQLite file in
``$TASKCTX_CONFIG_DIR`` (a temporary directory per run).
"""
