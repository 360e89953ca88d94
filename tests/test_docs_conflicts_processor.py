"""The ```python blocks of docs/conflicts.md, core.md, processor.md, django_tasks.md and
celery.md run as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]
ROOT = Path(__file__).resolve().parents[1]
RUNNER = """
import sys
import django
django.setup()
from django.core.cache import cache
cache.clear()
namespace = {"__name__": "__doc_example__"}
exec(compile(sys.stdin.read(), sys.argv[1], "exec"), namespace)
print("ok")
"""


def blocks(doc: str) -> str:
    text = (ROOT / "docs" / doc).read_text()
    return "\n\n".join(re.findall(r"```python\n(.*?)```", text, flags=re.S))


@pytest.mark.parametrize(
    "doc", ["conflicts.md", "core.md", "processor.md", "django_tasks.md", "celery.md"]
)
def test_doc_examples_run(doc, settings):
    code = blocks(doc)
    assert code.strip()
    env = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="tests.settings",
        TASKCTX_DB_NAME=str(settings.DATABASES["default"]["NAME"]),
        TASKCTX_TEST_OTEL_TASKCTX=json.dumps({"SPAN_STORE": False, "AUTO_INSTRUMENT": False}),
    )
    out = subprocess.run(
        [sys.executable, "-c", RUNNER, f"docs/{doc}"],
        input=code,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
