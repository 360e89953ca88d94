"""Tree building from stored span rows (pure Python: no database)."""

from __future__ import annotations

import json
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from otel_taskctx.spans.queries import build_tree
from otel_taskctx.spans.render import format_duration, render_text

TRACE = "a" * 32
MS = 1_000_000


def row(
    span_id,
    parent="",
    start=0,
    end=10,
    name=None,
    task="T",
    root="T",
    kind="INTERNAL",
    status="ok",
    process="host:1",
    trace=TRACE,
    events=None,
    message="",
    **attrs,
):
    attributes = (
        {"taskctx.task_key": task, "taskctx.root_task_key": root, **attrs} if task else dict(attrs)
    )
    return {
        "trace_id": trace,
        "span_id": span_id,
        "parent_span_id": parent,
        "name": name or span_id,
        "kind": kind,
        "start_ns": start * MS,
        "end_ns": None if end is None else end * MS,
        "status": status,
        "status_message": message,
        "attributes": attributes,
        "events": events or [],
        "links": [],
        "task_key": task,
        "root_task_key": root,
        "user_id": None,
        "user_label": "",
        "descendants_count": 0,
        "service": "",
        "process": process,
    }


def job_rows():
    """request -> send -> worker run -> save -> nested step (two), across two processes."""
    return [
        row(
            "req", "", 0, 5, name="POST /bulk", task=None, root=None, kind="SERVER", process="web:1"
        ),
        row("send", "req", 1, 2, name="send bulk", kind="PRODUCER", process="web:1"),
        row("run", "send", 10, 100, name="process bulk", kind="CONSUMER", process="worker:7"),
        row("save1", "run", 12, 40, name="Parent.save", process="worker:7"),
        row("step1", "save1", 15, 35, name="recompute", process="worker:7"),
        row("save2", "run", 45, 95, name="Parent.save", process="worker:7"),
        row("step2", "save2", 50, 90, name="recompute", process="worker:7"),
    ]


def shape(tree):
    return [(n.depth, n.span_id, n.parent.span_id if n.parent else None) for n in tree.nodes]


def test_links_parents_children_depths_and_order():
    tree = build_tree(job_rows(), now_ns=200 * MS, root_task_key="T")
    assert shape(tree) == [
        (0, "req", None),
        (1, "send", "req"),
        (2, "run", "send"),
        (3, "save1", "run"),
        (4, "step1", "save1"),
        (3, "save2", "run"),
        (4, "step2", "save2"),
    ]
    assert tree.find("req").context and not tree.find("send").context
    summary = tree.summary()
    assert summary["status"] == "ok"
    assert summary["request"] == "POST /bulk"
    assert summary["spans"] == 6  # the request is context, not part of the job
    assert summary["nested_steps"] == 4
    assert summary["processes"] == ["web:1", "worker:7"]
    assert tree.duration_ns == 99 * MS  # from the enqueue (1ms) to the worker run's end


@settings(max_examples=40, deadline=None)
@given(st.randoms(use_true_random=False))
def test_out_of_order_arrival_builds_the_same_tree(rnd):
    rows = job_rows()
    expected = shape(build_tree(rows, now_ns=200 * MS))
    rnd.shuffle(rows)
    assert shape(build_tree(rows, now_ns=200 * MS)) == expected


def test_finished_row_wins_over_running_duplicate_in_any_order():
    running = row("run", "", 0, None, kind="CONSUMER")
    finished = row("run", "", 0, 50, kind="CONSUMER", status="error", message="boom")
    for rows in ([running, finished], [finished, running]):
        tree = build_tree(rows, now_ns=60 * MS)
        assert len(tree) == 1
        assert tree.nodes[0].end_ns == 50 * MS and tree.status == "error"


def test_missing_parent_gets_a_placeholder_attached_by_task_lineage():
    rows = [
        row("run", "", 0, 100, kind="CONSUMER"),
        # the span "lost" (e.g. still buffered in another process) had two children
        row("c1", "lost", 20, 30),
        row("c2", "lost", 31, 40),
        # and a span whose parent is unknown and has no recorded task span to hang under
        row("x", "nowhere", 5, 6, task="OTHER", root="T"),
    ]
    tree = build_tree(rows, now_ns=200 * MS)
    ph = tree.find("missing-lost")
    assert ph is not None and ph.placeholder and ph.state == "missing"
    assert [c.span_id for c in ph.children] == ["c1", "c2"]
    assert ph.parent is tree.find("run")  # attached under the task's worker run
    assert ph.start_ns == 20 * MS and ph.effective_end == 40 * MS
    other = tree.find("missing-nowhere")
    assert other.parent is None and other in tree.roots
    assert tree.summary()["missing_spans"] == 2


def test_placeholder_never_creates_a_cycle():
    # the only recorded span of task T is the placeholder's own child: stays a root
    rows = [row("run", "gone", 10, 20, kind="CONSUMER"), row("inner", "run", 11, 12)]
    tree = build_tree(rows, now_ns=30 * MS)
    assert [n.span_id for n in tree.roots] == ["gone"]
    assert shape(tree) == [(0, "gone", None), (1, "run", "gone"), (2, "inner", "run")]


def test_spans_from_several_processes_and_traces():
    rows = job_rows() + [
        row("other-root", "", 0, 3, trace="b" * 32, task="U", root="U", process="worker:8"),
        # same span id in another trace does not collide
        row("run", "other-root", 1, 2, trace="b" * 32, task="U", root="U", process="worker:8"),
    ]
    tree = build_tree(rows, now_ns=200 * MS)
    ids = [n.id for n in tree.nodes]
    assert len(ids) == len(set(ids)) == 9
    assert {n.process for n in tree.nodes} == {"web:1", "worker:7", "worker:8"}


def test_very_deep_tree_needs_no_recursion():
    depth = 20_000
    rows = [row("s0", "", 0, depth * 2)]
    rows += [row(f"s{i}", f"s{i - 1}", i, depth * 2 - i) for i in range(1, depth)]
    random.Random(1).shuffle(rows)
    tree = build_tree(rows, now_ns=depth * 3 * MS)
    assert len(tree) == depth
    assert tree.nodes[-1].depth == depth - 1
    assert all(n.critical for n in tree.nodes)
    data = tree.to_dict()
    json.dumps(data)  # flat: no nesting depth problem for the encoder
    assert data["nodes"][-1]["depth"] == depth - 1
    lines = render_text(tree)
    assert len(lines) == depth and lines[-1].lstrip().startswith(f"[{depth - 1}]")
    assert max(len(line) for line in lines) < 300


def test_very_wide_tree():
    width = 20_000
    rows = [row("root", "", 0, width + 10)] + [row(f"c{i}", "root", i, i + 1) for i in range(width)]
    tree = build_tree(rows, now_ns=(width + 20) * MS)
    assert len(tree.roots) == 1 and len(tree.roots[0].children) == width
    assert [c.span_id for c in tree.roots[0].children[:3]] == ["c0", "c1", "c2"]
    assert len(tree.to_dict()["nodes"]) == width + 1


def test_critical_path_follows_the_work_that_finished_last():
    rows = [
        row("root", "", 0, 100),
        row("a", "root", 0, 30),  # then a gap: b overlaps a
        row("b", "root", 10, 60),
        row("b1", "b", 10, 20),
        row("b2", "b", 25, 59),
        row("b3", "b", 30, 40),  # runs in parallel with b2, which ends later
        row("c", "root", 65, 100),
        row("short", "root", 62, 63),
    ]
    tree = build_tree(rows, now_ns=200 * MS)
    critical = {n.span_id for n in tree.critical_path}
    assert critical == {"root", "c", "short", "b", "b2", "b1", "a"}
    assert "b3" not in critical


def test_critical_path_follows_async_work_that_outlives_its_parent():
    rows = [
        row("send", "", 0, 1, kind="PRODUCER"),
        row("run", "send", 5, 50, kind="CONSUMER"),
        row("step", "run", 10, 45),
    ]
    tree = build_tree(rows, now_ns=60 * MS)
    assert {n.span_id for n in tree.critical_path} == {"send", "run", "step"}
    assert tree.find("send").effective_end == 50 * MS


def test_fanned_out_children_show_their_worker_run_in_parallel_and_mark_the_critical_path():
    fan = {"taskctx.nested.mode": "fan_out"}
    rows = [
        row("send", "", 0, 1, kind="PRODUCER", process="web:1"),
        row("run", "send", 5, 20, kind="CONSUMER", process="w:1"),
        row("send-a", "run", 6, 7, kind="PRODUCER", process="w:1"),
        row("send-b", "run", 8, 9, kind="PRODUCER", process="w:1"),
        row("a", "send-a", 10, 60, kind="CONSUMER", process="w:2", **fan),
        row("b", "send-b", 12, 90, kind="CONSUMER", process="w:3", **fan),
    ]
    tree = build_tree(rows, now_ns=100 * MS)
    critical = {n.span_id for n in tree.critical_path}
    assert "b" in critical and "a" not in critical  # the child that ended last
    nodes = {n["span_id"]: n for n in tree.to_dict()["nodes"]}
    assert (nodes["a"]["mode"], nodes["a"]["worker"]) == ("fan_out", "w:2")
    assert (nodes["b"]["mode"], nodes["b"]["worker"]) == ("fan_out", "w:3")
    assert (nodes["run"]["mode"], nodes["run"]["worker"]) == ("", "w:1")
    assert nodes["send-a"]["worker"] == ""  # not a run: no worker of its own
    # siblings in parallel: b starts before a ends
    assert nodes["b"]["offset_ms"] < nodes["a"]["offset_ms"] + nodes["a"]["duration_ms"]
    lines = {line.split()[0]: line for line in render_text(tree)}
    assert "fan-out" in lines["b"] and "worker=w:3" in lines["b"] and lines["b"].endswith("*")
    assert "fan-out" in lines["a"] and not lines["a"].endswith("*")


def test_celery_runs_are_badged_with_the_celery_worker_that_ran_them():
    """A Celery job: the worker badge of a run is Celery's name of its worker
    (``celery.hostname``), for the job's run and each fanned-out child; an inline nested
    run in the job's process has none; a publisher's anonymous name (``gen<pid>@host``,
    which opentelemetry-instrumentation-celery copies from the message's ``origin``) is no
    worker's: the badge then names the process."""
    fan = {"taskctx.nested.mode": "fan_out"}
    key = "celery-5d0c"
    rows = [
        row("send", "", 0, 1, kind="PRODUCER", task=key, root=key, process="web:1"),
        row("run", "send", 2, 90, kind="CONSUMER", task=key, root=key, process="box:11")
        | {"attributes": {"celery.hostname": "demo@box", "taskctx.task_key": key}},
        row("inline", "run", 3, 9, kind="CONSUMER", task=key, root=key, process="box:11")
        | {"attributes": {"celery.hostname": "box", "taskctx.nested.mode": "inline"}},
        row("send-a", "run", 10, 11, kind="PRODUCER", task=key, root=key, process="box:11"),
        row("a", "send-a", 12, 60, kind="CONSUMER", task=key, root=key, process="box:12")
        | {"attributes": {"celery.hostname": "demo@box", **fan}},
        row("send-b", "run", 12, 13, kind="PRODUCER", task=key, root=key, process="box:11"),
        row("b", "send-b", 14, 80, kind="CONSUMER", task=key, root=key, process="box:13")
        | {"attributes": {"celery.hostname": "gen11@box", **fan}},
    ]
    tree = build_tree(rows, now_ns=100 * MS)
    nodes = {n["span_id"]: n for n in tree.to_dict()["nodes"]}
    assert [nodes[s]["worker"] for s in ("run", "inline", "a", "b")] == [
        "demo@box",
        "",
        "demo@box",
        "box:13",
    ]
    assert nodes["a"]["process"] == "box:12"  # the pool process stays in the JSON
    assert nodes["send-a"]["worker"] == ""  # a publish is no run
    assert tree.status == "ok" and tree.summary()["tasks"] == 1


def test_target_is_the_deepest_failure_and_expand_path_leads_there():
    rows = job_rows()
    rows[3] = {**rows[3], "status": "error", "status_message": "ValueError: bad"}  # save1
    rows[4] = {
        **rows[4],
        "status": "error",
        "status_message": "ValueError: bad",
        "events": [
            {
                "name": "exception",
                "time_ns": 30 * MS,
                "attributes": {
                    "exception.type": "ValueError",
                    "exception.message": "bad",
                    "exception.stacktrace": "Traceback...",
                },
            }
        ],
    }
    tree = build_tree(rows, now_ns=200 * MS, root_task_key="T")
    assert tree.status == "error"
    assert tree.target.span_id == "step1" and tree.target_reason == "failed"
    assert [n.span_id for n in tree.expand] == ["req", "send", "run", "save1"]
    errors = tree.target.errors()
    assert errors[0]["type"] == "ValueError" and errors[0]["message"] == "bad"
    data = tree.to_dict()
    assert data["target"] == "step1" and data["expand"] == ["req", "send", "run", "save1"]


def test_target_while_running_is_where_the_job_is_now():
    rows = [
        row("run", "", 0, None, kind="CONSUMER"),
        row("save1", "run", 1, 5),
        row("save2", "run", 6, None),
        row("step", "save2", 7, None),
    ]
    tree = build_tree(rows, now_ns=50 * MS)
    assert tree.status == "running" and tree.end_ns is None
    assert tree.target.span_id == "step" and tree.target_reason == "running"
    assert tree.find("step").effective_end == 50 * MS
    node = tree.to_dict()["nodes"][-1]
    assert node["state"] == "running" and node["duration_ms"] == 43.0
    # opened down to the step; "now at" names the steps of the job down to it
    assert [n.span_id for n in tree.expand] == ["run", "save2"]
    assert tree.to_dict()["target_path"] == ["save2", "step"]


def test_a_running_run_between_its_steps_opens_on_the_steps_done():
    # the step the run is in is not recorded yet: the run is the deepest running span
    rows = [
        row("run", "", 0, None, kind="CONSUMER"),
        row("save1", "run", 1, 5),
        row("save2", "run", 6, 9),
    ]
    tree = build_tree(rows, now_ns=50 * MS)
    assert tree.target.span_id == "run" and tree.target_reason == "running"
    assert [n.span_id for n in tree.expand] == ["run"]  # its finished steps are shown
    assert tree.to_dict()["target_path"] == ["run"]
    # a failed target is opened at, not into
    rows.append(row("save3", "run", 10, 12, status="error"))
    failed = build_tree(rows, now_ns=50 * MS)
    assert failed.target.span_id == "save3" and [n.span_id for n in failed.expand] == ["run"]


def test_progress_in_time_order_and_descendants_per_step():
    rows = job_rows()
    rows[3]["events"] = [
        {
            "name": "taskctx.descendants",
            "time_ns": 13 * MS,
            "attributes": {
                "taskctx.descendants.model": "testapp.child",
                "taskctx.descendants.ids": ["1", "2"],
                "taskctx.descendants.count": 2,
            },
        },
        {
            "name": "taskctx.progress",
            "time_ns": 39 * MS,
            "attributes": {"taskctx.progress": "second"},
        },
    ]
    rows[3]["descendants_count"] = 2
    rows[2]["events"] = [
        {
            "name": "taskctx.progress",
            "time_ns": 11 * MS,
            "attributes": {"taskctx.progress": "first"},
        },
        {
            "name": "taskctx.progress",
            "time_ns": 96 * MS,
            "attributes": {"taskctx.progress": "third"},
        },
    ]
    tree = build_tree(rows, now_ns=200 * MS)
    assert [p["message"] for p in tree.progress()] == ["first", "second", "third"]
    assert tree.find("save1").descendants() == [
        {"model": "testapp.child", "count": 2, "ids": ["1", "2"], "time_ns": 13 * MS}
    ]
    assert tree.summary()["descendants_locked"] == 2


def test_render_text_one_line_per_span_indented_with_duration_and_status():
    rows = job_rows()
    rows[6] = {**rows[6], "status": "error", "status_message": "RuntimeError: nope"}
    rows[5] = {**rows[5], "attributes": {**rows[5]["attributes"], "taskctx.label": "Book #2 'X'"}}
    lines = render_text(build_tree(rows, now_ns=200 * MS))
    assert len(lines) == 7
    assert lines[0].startswith("POST /bulk [server] 5.0ms OK")
    assert lines[4].startswith("        recompute [internal] 20.0ms OK")
    assert lines[5].startswith("""      Parent.save "Book #2 'X'" [internal] 50.0ms OK""")
    assert lines[6].startswith("        recompute [internal] 40.0ms ERROR")
    assert lines[6].endswith("-- RuntimeError: nope")
    assert "task=T" in lines[1] and "worker=worker:7" in lines[2]


def test_format_duration():
    assert format_duration(2_000) == "2µs"
    assert format_duration(1_500_000) == "1.5ms"
    assert format_duration(2_500_000_000) == "2.50s"
    assert format_duration(125 * 10**9) == "2m05s"
    assert format_duration(2 * 3600 * 10**9 + 60 * 10**9) == "2h01m"
