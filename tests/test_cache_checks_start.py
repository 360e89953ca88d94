"""A project on Django's default cache (LocMem) starts, checks and tests with the app installed.

Each case writes a tiny project (settings module and an app with one test) to a temporary
directory and runs ``django-admin check`` and ``django-admin test`` in a subprocess, as a user
would. Without powercrud in ``INSTALLED_APPS`` (installed in the environment is not enough)
no powercrud cache check runs and powercrud's ``AsyncManager`` is left as it is; with it, the
LocMem cache is a warning (``otel_taskctx.W004``), never an error that stops the project.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APP_TEST = """
from django.core.cache import cache
from django.test import SimpleTestCase


class CacheTest(SimpleTestCase):
    def test_default_cache(self):
        cache.set("k", 1)
        self.assertEqual(cache.get("k"), 1)
"""


def _project(tmp_path: Path, apps: list[str]) -> dict[str, str]:
    (tmp_path / "tinyapp").mkdir()
    (tmp_path / "tinyapp" / "__init__.py").write_text("")
    (tmp_path / "tinyapp" / "tests.py").write_text(APP_TEST)
    installed = ["django.contrib.contenttypes", "django.contrib.auth", *apps, "tinyapp"]
    (tmp_path / "tiny_settings.py").write_text(
        f"SECRET_KEY = 'tiny-project-0123456789abcdef0123456789abcdef'\n"
        f"INSTALLED_APPS = {installed!r} + ['otel_taskctx']\n"
        f"DATABASES = {{'default': {{'ENGINE': 'django.db.backends.sqlite3', "
        f"'NAME': {str(tmp_path / 'db.sqlite3')!r}}}}}\n"
        "USE_TZ = True\n"  # no CACHES: Django's default LocMemCache
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "OTEL_"))}
    env.update(
        PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]),
        DJANGO_SETTINGS_MODULE="tiny_settings",
    )
    return env


def _admin(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "django", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


# django_tasks_db is in INSTALLED_APPS here so that the project starts whatever the state of
# the instrumentor's django-tasks-db detection (another configuration of the same issue)
@pytest.mark.parametrize(
    ("apps", "expected"),
    [
        (["django_tasks_db"], None),
        (["django_tasks_db", "django_q", "powercrud"], "otel_taskctx.W004"),
    ],
    ids=["no-powercrud", "powercrud"],
)
def test_default_locmem_cache_starts_checks_and_tests(tmp_path, apps, expected):
    env = _project(tmp_path, apps)
    check = _admin(env, tmp_path, "check")
    assert check.returncode == 0, check.stderr
    found = [w for w in ("otel_taskctx.E", "otel_taskctx.W") if w in check.stdout + check.stderr]
    if expected is None:
        assert found == [] and "no issues" in check.stdout
    else:
        assert expected in check.stderr and "WARNINGS" in check.stderr
        assert "otel_taskctx.E" not in check.stderr
    test = _admin(env, tmp_path, "test", "tinyapp")
    assert test.returncode == 0, test.stderr
    assert "Ran 1 test" in test.stderr and "OK" in test.stderr
    shell = _admin(
        env,
        tmp_path,
        "shell",
        "-c",
        "from otel_taskctx import powercrud_cache; print('wrapped', powercrud_cache.installed())",
    )
    assert shell.returncode == 0, shell.stderr
    # powercrud importable but unused: its AsyncManager is left alone
    assert f"wrapped {expected is not None}" in shell.stdout
