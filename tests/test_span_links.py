"""Job trees read back without an index on every span's trace id.

The span table indexes trace ids only for the spans outside any task and the enqueues (see
``otel_taskctx.span_models``). ``load_tree`` must still find every span above and below a job
in its traces: the launching request, the job that launched it (and the one above that), the
jobs it launched (and theirs), spans outside any task in between. Hypothesis builds random
launch forests and compares each job's tree with the brute-force answer (every span of the
job's traces, filtered to ancestors and descendants), the answer of the old trace-wide query.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest
from django.db import connections, router
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otel_taskctx.span_models import LINKING_SPANS, TaskSpan
from otel_taskctx.spans.queries import _related, launching_request, load_tree
from otel_taskctx.spans.rows import LAUNCHED_TASK_KEY

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]


class Forest:
    """Requests that launch jobs, jobs that launch jobs, spans outside any task."""

    def __init__(self, rnd: random.Random) -> None:
        self.rnd = rnd
        self.rows: list[dict] = []
        self.jobs: list[str] = []
        self.clock = 1_700_000_000 * 10**9

    def _id(self, bits: int) -> str:
        return f"{self.rnd.getrandbits(bits):0{bits // 4}x}"

    def span(self, parent: dict | None, kind: str, root: str | None, task: str | None, **attrs):
        self.clock += 1000
        row = {
            "trace_id": parent["trace_id"] if parent else self._id(128),
            "span_id": self._id(64),
            "parent_span_id": parent["span_id"] if parent else "",
            "name": f"{kind.lower()} {len(self.rows)}",
            "kind": kind,
            "start_ns": self.clock,
            "end_ns": self.clock + 500,
            "status": "ok",
            "attributes": attrs,
            "task_key": task,
            "root_task_key": root,
        }
        self.rows.append(row)
        return row

    def request(self) -> dict:
        server = self.span(None, "SERVER", None, None)
        if self.rnd.random() < 0.5:
            self.span(server, "INTERNAL", None, None)  # a sibling outside any task
        return server

    def job(self, launcher: dict) -> None:
        key = f"job-{len(self.jobs)}"
        self.jobs.append(key)
        inside = launcher["root_task_key"]
        # an enqueue inside a job belongs to that job's tree; outside any task, to the job's
        producer = self.span(
            launcher,
            "PRODUCER",
            inside or key,
            launcher["task_key"] or key,
            **{LAUNCHED_TASK_KEY: key},
        )
        consumer = self.span(producer, "CONSUMER", key, key)
        for _ in range(self.rnd.randrange(3)):
            self.span(consumer, "INTERNAL", key, key)
        if self.rnd.random() < 0.2:
            # a span that lost the task's baggage but kept its parent (e.g. started with a
            # bare Context()): outside any task, below the job
            self.span(consumer, "INTERNAL", None, None)

    def build(self, requests: int, jobs: int) -> None:
        for _ in range(requests):
            self.request()
        for _ in range(jobs):
            launchers = [r for r in self.rows if r["kind"] != "PRODUCER"]
            self.job(self.rnd.choice(launchers))

    def save(self) -> None:
        TaskSpan.objects.all().delete()
        TaskSpan.objects.bulk_create(
            TaskSpan(
                **row,
                started_at=datetime.fromtimestamp(row["start_ns"] / 1e9, tz=UTC),
            )
            for row in self.rows
        )

    def expected(self, root: str) -> set[tuple[str, str]]:
        """The old trace-wide answer: every span of the job's traces, then its relatives."""
        job_rows = [r for r in self.rows if r["root_task_key"] == root]
        traces = {r["trace_id"] for r in job_rows}
        others = [r for r in self.rows if r["trace_id"] in traces and r["root_task_key"] != root]
        return {(r["trace_id"], r["span_id"]) for r in job_rows + _related(job_rows, others)}


def tree_keys(root: str) -> set[tuple[str, str]]:
    tree = load_tree(root)
    assert tree is not None
    assert not tree.truncated
    return {n.key for n in tree.nodes if not n.placeholder}


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(seed=st.integers(0, 2**32), requests=st.integers(1, 3), jobs=st.integers(1, 12))
def test_every_job_tree_matches_the_trace_wide_answer(seed, requests, jobs):
    forest = Forest(random.Random(seed))
    forest.build(requests, jobs)
    forest.save()
    for root in forest.jobs:
        assert tree_keys(root) == forest.expected(root), root


def test_a_chain_of_jobs_shows_the_request_and_every_job_above_and_below():
    forest = Forest(random.Random(7))
    server = forest.request()
    forest.job(server)  # job-0, launched by the request
    job0_step = next(
        r for r in forest.rows if r["root_task_key"] == "job-0" and r["kind"] == "CONSUMER"
    )
    forest.job(job0_step)  # job-1, launched inside job-0
    job1_step = next(
        r for r in forest.rows if r["root_task_key"] == "job-1" and r["kind"] == "CONSUMER"
    )
    forest.job(job1_step)  # job-2, launched inside job-1
    other = forest.request()
    forest.job(other)  # job-3: another trace, unrelated
    forest.save()

    keys = tree_keys("job-1")
    assert keys == forest.expected("job-1")
    names = {r["name"] for r in forest.rows if (r["trace_id"], r["span_id"]) in keys}
    kinds = sorted(r["kind"] for r in forest.rows if (r["trace_id"], r["span_id"]) in keys)
    assert server["name"] in names  # the launching request, two jobs up
    assert kinds.count("CONSUMER") == 3  # job-0 above, job-1, job-2 below
    assert not any(
        r["root_task_key"] == "job-3" for r in forest.rows if (r["trace_id"], r["span_id"]) in keys
    )
    # the request is found across two enqueues and a job's own span
    assert launching_request("job-2") == launching_request("job-0") is not None


def test_lookups_by_trace_use_the_partial_index():
    """The viewer's by-trace queries repeat the index's condition, so the database can use
    the small index instead of reading the table."""
    from django.db import transaction

    connection = connections[router.db_for_read(TaskSpan)]
    query = TaskSpan.objects.filter(LINKING_SPANS, trace_id__in=["a" * 32], span_id="b" * 16)
    sql, params = query.query.sql_with_params()
    with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # an empty table is read whole whatever its indexes: ask for the plan without that
            cursor.execute("SET LOCAL enable_seqscan = off")
            cursor.execute(f"EXPLAIN {sql}", params)
        else:
            cursor.execute(f"EXPLAIN QUERY PLAN {sql}", params)
        plan = " ".join(str(row) for row in cursor.fetchall())
    assert "otel_taskctx_span_link" in plan, plan
