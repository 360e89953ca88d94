"""No thread of ours is alive when django-q2's cluster forks its processes.

Python 3.12 warns ("This process ... is multi-threaded, use of fork() may lead to deadlocks in
the child") at each fork of a process with threads. The span store's writer, the flusher and
the exporters start their threads in the process that makes spans (a worker, the monitor),
never in the cluster's parent that forks them.
"""

from __future__ import annotations

import pytest
from django_q.models import Task
from django_q.tasks import async_task

from otel_taskctx.models import TaskSpan

pytestmark = [pytest.mark.cluster, pytest.mark.stack, pytest.mark.django_db(transaction=True)]

FORK_WARNING = "multi-threaded, use of fork() may lead to deadlocks"


@pytest.mark.parametrize("host_provider", [False, True], ids=["our-provider", "host-provider"])
def test_a_cluster_forks_its_processes_with_no_thread_of_ours(cluster_factory, host_provider):
    env = {"PYTHONWARNINGS": "always::DeprecationWarning"}
    if not host_provider:
        env["TASKCTX_NO_PROVIDER"] = "1"  # nobody configured a provider: our private one
    # recycle=1: the sentinel forks a new worker after the job (a fork after spans were made)
    cluster = cluster_factory(q_cluster={"workers": 2, "recycle": 1}, env=env, span_dir=None)
    task_id = async_task("math.floor", 2.5)
    cluster.wait_for(lambda: Task.objects.filter(id=task_id).exists(), what="the job's result")
    cluster.wait_for(
        lambda: TaskSpan.objects.filter(name="process math.floor").exists(),
        what="the job's spans in the store",
    )
    cluster.wait_for(lambda: len(cluster.worker_pids()) >= 3, what="a recycled worker")
    cluster.stop()
    log = cluster.log_text()
    assert FORK_WARNING not in log, log
