"""The Celery benchmarks' app: ``celery -A tests.benchmarks.celery_bench_app worker``.

Configured by environment (the same in the producer and the worker, see ``_celery.py``):
``BENCH_CELERY_BROKER`` (``filesystem:<dir>`` or a broker URL), ``BENCH_CELERY_QUEUE``,
``BENCH_OTEL_CELERY=1`` (an SDK tracer provider and opentelemetry-instrumentation-celery),
and Django's settings (``tests.settings``: ``TASKCTX_TEST_OTEL_TASKCTX`` turns otel_taskctx's
parts on or off, ``TASKCTX_DB_NAME`` its database). Django is set up before the app exists,
so otel_taskctx's instrumentation patches Celery through its post-import hook, as in a
project whose settings load first.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
if os.environ.get("BENCH_OTEL_CELERY") == "1":
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    trace.set_tracer_provider(TracerProvider())
django.setup()

from celery import Celery  # noqa: E402
from kombu.transport import filesystem  # noqa: E402
from kombu.utils.json import dumps  # noqa: E402

if os.environ.get("BENCH_OTEL_CELERY") == "1":
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    CeleryInstrumentor().instrument()


class AtomicChannel(filesystem.Channel):
    """kombu's filesystem channel, each message written aside and renamed into the folder.

    kombu writes a message file in place, and a consumer polling the folder can move it away
    (and read it empty: a ``JSONDecodeError`` that stops the worker's consumer) before the
    write; a name that does not end in ``.<queue>.msg`` is not taken, and a rename is atomic.
    """

    def _put(self, queue, payload, **kwargs):
        name = f"{int(round(time.monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        partial = os.path.join(self.data_folder_out, f".{name}.part")
        with open(partial, "wb") as out:
            out.write(dumps(payload).encode())
        os.replace(partial, os.path.join(self.data_folder_out, name))


class AtomicTransport(filesystem.Transport):
    Channel = AtomicChannel


QUEUE = os.environ.get("BENCH_CELERY_QUEUE", "taskctx-bench")
BROKER = os.environ.get("BENCH_CELERY_BROKER", "memory://")

app = Celery(QUEUE)
app.conf.update(
    task_default_queue=QUEUE,
    task_default_exchange=QUEUE,
    task_default_routing_key=QUEUE,
    control_exchange=f"{QUEUE}-control",
    event_exchange=f"{QUEUE}-events",
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    worker_prefetch_multiplier=4,
    broker_connection_retry_on_startup=True,
)
if BROKER.startswith("filesystem:"):
    folder = BROKER.split(":", 1)[1]
    app.conf.broker_url = None
    app.conf.broker_transport = f"{__name__}:AtomicTransport"
    app.conf.broker_transport_options = {
        "data_folder_in": folder,
        "data_folder_out": folder,
        "polling_interval": 0.05,
    }
else:
    app.conf.broker_url = BROKER


@app.task(name="bench.noop")
def noop(n: int) -> None:
    return None


@app.task(name="bench.mark")
def mark(path: str) -> None:
    """Written after the tasks published before it (one pool process: in order)."""
    Path(path).write_text(json.dumps({"end": time.time()}))


@app.task(name="bench.fan_child")
def fan_child(n: int, seconds: float, marker_dir: str) -> None:
    """A nested child: reserves its descendant (``testapp.Child`` ``n``) under the job's key,
    I/O-like work (a sleep), its end recorded for the early-end check."""
    from otel_taskctx import register_descendants
    from tests.testapp.models import Child

    reserved = bool(register_descendants(Child, [n]))
    time.sleep(seconds)
    Path(marker_dir, f"child-{n}.json").write_text(
        json.dumps({"end": time.time(), "reserved": reserved})
    )


@app.task(name="bench.fan_job")
def fan_job(children: int, seconds: float, marker_dir: str) -> None:
    """The job: launches its children inside itself (inline or fanned out, as the policy says)."""
    for n in range(1, children + 1):
        fan_child.delay(n, seconds, marker_dir)


def _job_completed(sender=None, task_id=None, error=None, **kwargs) -> None:
    """otel_taskctx's job completion (after its last descendant), recorded for the bench."""
    marker_dir = os.environ.get("BENCH_CELERY_MARKERS")
    if marker_dir and sender == "bench.fan_job":
        Path(marker_dir, f"completed-{task_id}.json").write_text(
            json.dumps({"end": time.time(), "error": str(error or "")})
        )


try:  # the core's completion signal (its fan-out stage); absent before it lands
    from otel_taskctx.signals import job_completed
except ImportError:
    job_completed = None
else:
    job_completed.connect(_job_completed, dispatch_uid="bench.celery.job_completed")
