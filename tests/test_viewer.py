"""The viewer with Django's test client: list, job page, JSON, permissions and scoping."""

from __future__ import annotations

import json
import time

import pytest
from django.contrib.auth.models import Permission, User
from django.urls import reverse

from otel_taskctx.models import TaskSpan
from otel_taskctx.spans.rows import ns_to_datetime

pytestmark = pytest.mark.stack

MS = 1_000_000
BASE = time.time_ns() - 3600 * 10**9
DASHBOARD = "tests.viewerapp.managers.DashboardManager"
_ids = iter(range(1, 10**6))


def span(
    root,
    name,
    parent=None,
    start=0,
    end=10,
    kind="INTERNAL",
    status="ok",
    task=None,
    user_id=None,
    manager="",
    events=None,
    descendants=0,
    message="",
    trace=None,
    **attrs,
):
    trace = trace or (parent.trace_id if parent is not None else f"{abs(hash(root)) % 16**32:032x}")
    task = task or root
    attributes = {"taskctx.task_key": task, "taskctx.root_task_key": root, **attrs}
    if manager:
        attributes["taskctx.manager_class_path"] = manager
    return TaskSpan.objects.create(
        trace_id=trace,
        span_id=f"{next(_ids):016x}",
        parent_span_id=parent.span_id if parent is not None else "",
        name=name,
        kind=kind,
        start_ns=BASE + start * MS,
        end_ns=None if end is None else BASE + end * MS,
        started_at=ns_to_datetime(BASE + start * MS),
        status=status,
        status_message=message,
        attributes=attributes,
        events=events or [],
        task_key=task,
        root_task_key=root,
        user_id=user_id,
        descendants_count=descendants,
        manager=manager,
        process="host:1",
    )


def job(root, user_id=None, status="ok", running=False, offset=0, manager="", nested_task=None):
    """request -> send -> process -> save -> step; returns the spans by name."""
    trace = f"{abs(hash(root)) % 16**32:032x}"
    req = TaskSpan.objects.create(
        trace_id=trace,
        span_id=f"{next(_ids):016x}",
        name="POST /bulk/",
        kind="SERVER",
        start_ns=BASE + offset * MS,
        end_ns=BASE + (offset + 5) * MS,
        started_at=ns_to_datetime(BASE + offset * MS),
        status="unset",
        attributes={"http.request.method": "POST", "http.route": "bulk/"},
    )
    send = span(
        root, "send job", req, offset + 1, offset + 2, "PRODUCER", user_id=user_id, manager=manager
    )
    run = span(
        root,
        "process job",
        send,
        offset + 10,
        None if running else offset + 100,
        "CONSUMER",
        manager=manager,
        status="error" if status == "error" else "ok",
        message="ValueError: refused" if status == "error" else "",
    )
    save = span(
        root,
        "Invoice.save",
        run,
        offset + 12,
        None if running else offset + 60,
        status="error" if status == "error" else "ok",
        message="ValueError: refused" if status == "error" else "",
        events=[
            {
                "name": "taskctx.descendants",
                "time_ns": BASE + (offset + 13) * MS,
                "attributes": {
                    "taskctx.descendants.model": "testapp.invoiceline",
                    "taskctx.descendants.ids": ["1", "2", "3"],
                    "taskctx.descendants.count": 3,
                },
            },
            {
                "name": "taskctx.progress",
                "time_ns": BASE + (offset + 20) * MS,
                "attributes": {"taskctx.progress": "line 1/3"},
            },
        ],
        descendants=3,
    )
    step = span(
        root,
        "update_invoice_lines",
        save,
        offset + 14,
        None if running else offset + 50,
        task=nested_task or root,
        status="error" if status == "error" else "ok",
        message="ValueError: refused" if status == "error" else "",
        events=[
            {
                "name": "exception",
                "time_ns": BASE + (offset + 49) * MS,
                "attributes": {
                    "exception.type": "ValueError",
                    "exception.message": "refused",
                    "exception.stacktrace": "Traceback (most recent call last): ...",
                },
            }
        ]
        if status == "error"
        else [],
    )
    return {"req": req, "send": send, "run": run, "save": save, "step": step}


@pytest.fixture
def users(transactional_db):
    """Users, and an empty span store (spans other tests' processes left are written first)."""
    from otel_taskctx.spans import flush_span_store

    flush_span_store()
    TaskSpan.objects.all().delete()
    return {
        "root": User.objects.create_superuser("root", "r@x", None),
        "alice": User.objects.create_user("alice", is_staff=True),
        "bob": User.objects.create_user("bob", is_staff=True),
        "eve": User.objects.create_user("eve"),
    }


@pytest.fixture
def trees(users):
    return {
        "A": job("job-A", user_id=str(users["alice"].pk)),
        "B": job("job-B", user_id=str(users["bob"].pk), status="error", offset=1000),
        "C": job("job-C", user_id=str(users["alice"].pk), running=True, offset=2000),
    }


def client_for(client, user):
    client.force_login(user)
    return client


LIST = "/taskctx/"


def test_urls_are_stable_permalinks():
    assert reverse("otel_taskctx:tree_list") == LIST
    assert reverse("otel_taskctx:tree_detail", args=["job-A"]) == "/taskctx/job/job-A/"
    assert reverse("otel_taskctx:tree_json", args=["job-A"]) == "/taskctx/api/job/job-A"
    assert reverse("otel_taskctx:tree_detail", args=["a b?#"]) == "/taskctx/job/a%20b%3F%23/"


@pytest.mark.django_db(transaction=True)
def test_anonymous_users_are_sent_to_login_and_non_staff_are_refused(client, users, trees):
    for url in (LIST, "/taskctx/job/job-A/", "/taskctx/api/job/job-A", "/taskctx/jobs.json"):
        response = client.get(url)
        assert response.status_code == 302 and "/login/" in response["Location"]
    client_for(client, users["eve"])
    for url in (LIST, "/taskctx/job/job-A/", "/taskctx/api/job/job-A"):
        assert client.get(url).status_code == 403


@pytest.mark.django_db(transaction=True)
def test_superuser_sees_every_tree_with_its_columns(client, users, trees):
    response = client_for(client, users["root"]).get(LIST)
    assert response.status_code == 200
    html = response.content.decode()
    for key in ("job-A", "job-B", "job-C"):
        assert f'href="/taskctx/job/{key}/"' in html
    rows = {t["root_task_key"]: t for t in response.context["trees"]}
    assert [t["root_task_key"] for t in response.context["trees"]] == ["job-C", "job-B", "job-A"]
    a = rows["job-A"]
    assert a["status"] == "ok" and a["steps"] == 2 and a["descendants"] == 3 and a["spans"] == 4
    assert a["duration"] == "99.0ms" and a["request"] == "POST /bulk/"
    assert a["user_id"] == str(users["alice"].pk)
    assert rows["job-B"]["status"] == "error" and rows["job-C"]["status"] == "running"


@pytest.mark.django_db(transaction=True)
def test_staff_sees_only_the_jobs_they_launched(client, users, trees):
    client_for(client, users["alice"])
    keys = [t["root_task_key"] for t in client.get(LIST).context["trees"]]
    assert keys == ["job-C", "job-A"]
    assert client.get("/taskctx/job/job-A/").status_code == 200
    # another user's job is not found (no hint that it exists), page and JSON alike
    assert client.get("/taskctx/job/job-B/").status_code == 404
    assert client.get("/taskctx/api/job/job-B").status_code == 404
    data = client.get("/taskctx/jobs.json").json()
    assert [t["root_task_key"] for t in data["trees"]] == ["job-C", "job-A"]


@pytest.mark.django_db(transaction=True)
def test_status_filter_search_and_pagination(client, users, trees, monkeypatch):
    client_for(client, users["root"])
    by = lambda **q: [t["root_task_key"] for t in client.get(LIST, q).context["trees"]]  # noqa: E731
    assert by(status="error") == ["job-B"]
    assert by(status="running") == ["job-C"]
    assert by(status="ok") == ["job-A"]
    assert by(status="bogus") == ["job-C", "job-B", "job-A"]
    assert by(q="-B") == ["job-B"]
    assert by(q="nothing-like-it") == []
    job("job-D", nested_task="nested-child-key", offset=3000)
    assert by(q="nested-child") == ["job-D"]  # a nested task's key finds its tree
    from otel_taskctx.viewer import views

    monkeypatch.setattr(views, "PAGE_SIZE", 2)
    page1 = client.get(LIST)
    assert [t["root_task_key"] for t in page1.context["trees"]] == ["job-D", "job-C"]
    assert "page=2" in page1.content.decode()
    assert by(page=2) == ["job-B", "job-A"]
    assert by(page=99) == ["job-B", "job-A"]  # out of range: the last page
    assert by(page=1, status="ok") == ["job-D", "job-A"]
    assert "status=ok" in client.get(LIST, {"status": "ok", "q": "job"}).context["query"]


@pytest.mark.django_db(transaction=True)
def test_job_page_embeds_the_tree_and_a_text_fallback(client, users, trees):
    response = client_for(client, users["root"]).get("/taskctx/job/job-B/")
    assert response.status_code == 200
    html = response.content.decode()
    assert 'id="taskctx-tree-data"' in html and 'id="tc-rows"' in html
    assert "update_invoice_lines [internal]" in html  # the <noscript> text tree
    data = response.context["tree"]
    assert data["status"] == "error" and data["target_reason"] == "failed"
    target = next(n for n in data["nodes"] if n["id"] == data["target"])
    assert target["name"] == "update_invoice_lines"
    assert target["errors"][0] == {
        "type": "ValueError",
        "message": "refused",
        "stacktrace": "Traceback (most recent call last): ...",
    }
    names = {n["id"]: n["name"] for n in data["nodes"]}
    assert [names[i] for i in data["expand"]] == [
        "POST /bulk/",
        "send job",
        "process job",
        "Invoice.save",
    ]
    assert data["urls"]["detail"].endswith("/taskctx/job/job-B/")


@pytest.mark.django_db(transaction=True)
def test_json_endpoint_returns_the_tree(client, users, trees):
    response = client_for(client, users["alice"]).get("/taskctx/api/job/job-C")
    assert response.status_code == 200 and response["Content-Type"] == "application/json"
    data = json.loads(response.content)
    assert data["root_task_key"] == "job-C" and data["status"] == "running"
    assert data["end_ns"] is None
    nodes = {n["name"]: n for n in data["nodes"]}
    assert nodes["process job"]["parent"] == nodes["send job"]["id"]
    assert nodes["Invoice.save"]["children"] == [nodes["update_invoice_lines"]["id"]]
    assert nodes["Invoice.save"]["descendants"][0]["count"] == 3
    assert nodes["POST /bulk/"]["context"] is True
    assert (
        data["target"] == nodes["update_invoice_lines"]["id"] and data["target_reason"] == "running"
    )
    assert [p["message"] for p in data["progress"]] == ["line 1/3"]
    assert set(data["critical_path"]) >= {nodes["process job"]["id"], nodes["send job"]["id"]}


@pytest.mark.django_db(transaction=True)
def test_a_nested_task_key_redirects_to_the_jobs_permalink(client, users):
    spans = job("job-N", nested_task="child-task", user_id=str(users["alice"].pk))
    response = client_for(client, users["alice"]).get("/taskctx/job/child-task/")
    assert response.status_code == 302
    assert response["Location"] == f"/taskctx/job/job-N/#span-{spans['step'].span_id}"
    assert client.get("/taskctx/api/job/child-task").json()["root_task_key"] == "job-N"


@pytest.mark.django_db(transaction=True)
def test_viewer_permission_setting(client, users, trees, settings):
    settings.OTEL_TASKCTX = {"VIEWER_PERMISSION": "superuser"}
    assert client_for(client, users["alice"]).get(LIST).status_code == 403
    assert client_for(client, users["root"]).get(LIST).status_code == 200
    settings.OTEL_TASKCTX = {"VIEWER_PERMISSION": "otel_taskctx.view_taskspan"}
    assert client_for(client, users["alice"]).get(LIST).status_code == 403
    users["eve"].user_permissions.add(Permission.objects.get(codename="view_taskspan"))
    eve = User.objects.get(pk=users["eve"].pk)
    assert client_for(client, eve).get(LIST).status_code == 200
    settings.OTEL_TASKCTX = {"VIEWER_PERMISSION": "tests.test_viewer.only_bob"}
    assert client_for(client, users["alice"]).get(LIST).status_code == 403
    assert client_for(client, users["bob"]).get(LIST).status_code == 200


def only_bob(user):
    return user.username == "bob"


def tenant_filter(request, spans):
    """A project's own scoping: staff see every job whose key starts with their tenant."""
    return spans.filter(root_task_key__startswith=f"{request.user.username}-")


@pytest.mark.django_db(transaction=True)
def test_viewer_task_filter_hook(client, users, settings):
    job("alice-1")
    job("bob-1", user_id=str(users["alice"].pk))  # launched by alice, but bob's tenant
    settings.OTEL_TASKCTX = {"VIEWER_TASK_FILTER": "tests.test_viewer.tenant_filter"}
    client_for(client, users["alice"])
    assert [t["root_task_key"] for t in client.get(LIST).context["trees"]] == ["alice-1"]
    assert client.get("/taskctx/job/bob-1/").status_code == 404


@pytest.mark.django_db(transaction=True)
def test_scoping_mirrors_powercrud_dashboard_records(client, users):
    """No user id on the spans: the dashboard record of the root task decides, as in
    powercrud's async dashboard (user label from the manager's ``format_user``)."""
    from tests.viewerapp.managers import DashboardManager
    from tests.viewerapp.models import AsyncTaskRecord

    manager = DashboardManager()
    for key, user in (("dash-alice", users["alice"]), ("dash-bob", users["bob"])):
        job(key, manager=DASHBOARD)
        manager.async_task_lifecycle("create", key, status="pending", user=user)
    assert AsyncTaskRecord.objects.get(task_name="dash-alice").user_label == "user:alice"
    client_for(client, users["alice"])
    response = client.get(LIST)
    assert [t["root_task_key"] for t in response.context["trees"]] == ["dash-alice"]
    assert response.context["trees"][0]["user_label"] == "user:alice"  # from the record
    assert client.get("/taskctx/job/dash-alice/").status_code == 200
    assert client.get("/taskctx/job/dash-bob/").status_code == 404
    client_for(client, users["root"])
    assert len(client.get(LIST).context["trees"]) == 2


@pytest.mark.django_db(transaction=True)
def test_empty_store_and_unknown_job(client, users):
    client_for(client, users["root"])
    assert "No job trees stored yet" in client.get(LIST).content.decode()
    assert client.get("/taskctx/job/unknown/").status_code == 404
    assert client.get("/taskctx/api/job/unknown").status_code == 404


@pytest.mark.django_db(transaction=True)
def test_pages_extend_a_configurable_base_template(client, users, trees, settings, tmp_path):
    (tmp_path / "site_base.html").write_text(
        "<html><body><nav>SITE NAV</nav>{% block content %}{% endblock %}</body></html>"
    )
    settings.TEMPLATES = [{**settings.TEMPLATES[0], "DIRS": [str(tmp_path)]}]
    settings.OTEL_TASKCTX = {"VIEWER_BASE_TEMPLATE": "site_base.html"}
    client_for(client, users["root"])
    for url in (LIST, "/taskctx/job/job-A/"):
        html = client.get(url).content.decode()
        assert "SITE NAV" in html and "tc-" in html


@pytest.mark.django_db(transaction=True)
def test_a_fanned_out_job_opens_on_its_children_counted_with_their_progress(client, users):
    """Every fanned-out child's run is open (its ancestors in ``expand``), counted as a nested
    step, names its worker (the parent's own process too) and its ``taskctx.label``."""
    fan = {"taskctx.nested.mode": "fan_out"}
    send = span("fan", "send bulk", None, 0, 1, "PRODUCER", user_id=str(users["root"].pk))
    run = span("fan", "process bulk", send, 2, 50, "CONSUMER")
    runs = []
    for n in range(3):
        child_send = span("fan", "send reprice", run, 3 + n, 4 + n, "PRODUCER")
        event = {"name": "taskctx.progress", "time_ns": BASE + (10 + n) * MS}
        event["attributes"] = {"taskctx.progress": f"Album #{n}: track 1/1 repriced"}
        label = {"taskctx.label": f"Album #{n} 'Blue {n}'"}
        child = span("fan", "process reprice", child_send, 5, 40, "CONSUMER", events=[event])
        child.attributes.update(fan, **label)
        child.process = "host:1" if n == 0 else f"host:{n + 10}"  # the first in the parent's
        child.save()
        runs.append(child)
    client_for(client, users["root"])
    rows = {t["root_task_key"]: t for t in client.get(LIST).context["trees"]}
    assert rows["fan"]["steps"] == 3
    data = json.loads(client.get("/taskctx/api/job/fan").content)
    assert data["nested_steps"] == 3
    assert [p["message"] for p in data["progress"]] == [
        f"Album #{n}: track 1/1 repriced" for n in range(3)
    ]
    assert [p["label"] for p in data["progress"]] == [f"Album #{n} 'Blue {n}'" for n in range(3)]
    nodes = {n["span_id"]: n for n in data["nodes"]}
    children = [nodes[r.span_id] for r in runs]
    assert set(data["expand"]) == {nodes[send.span_id]["id"], nodes[run.span_id]["id"]} | {
        c["parent"] for c in children
    }
    assert [c["worker"] for c in children] == ["host:1", "host:11", "host:12"]
    assert [c["attributes"]["taskctx.label"] for c in children] == [
        f"Album #{n} 'Blue {n}'" for n in range(3)
    ]
    html = client.get("/taskctx/job/fan/").content.decode()
    assert '<span id="tc-steps">3</span>' in html and "taskctx.label" in html


def celery_job(root="celery-0f1e", user_id=None):
    """A Celery job's stored spans: published by a request's process, run by a worker's pool
    process, one nested task inline and two fanned out to other pool processes; by name."""
    fan = {"taskctx.nested.mode": "fan_out"}
    send = span(root, "apply_async/sample.publish_books", None, 0, 1, "PRODUCER", user_id=user_id)
    run = span(root, "run/sample.publish_books", send, 2, 90, "CONSUMER")
    run.attributes["celery.hostname"] = "demo@box"
    run.process = "box:11"
    inline = span(root, "run/sample.publish_book", run, 3, 9, "CONSUMER")
    inline.attributes.update({"celery.hostname": "box", "taskctx.nested.mode": "inline"})
    inline.process = "box:11"
    spans = {"send": send, "run": run, "inline": inline}
    for n, pid in ((1, 12), (2, 13)):
        child_send = span(root, "apply_async/sample.publish_book", run, 10 + n, 11 + n, "PRODUCER")
        child = span(root, "run/sample.publish_book", child_send, 12 + n, 60 + n, "CONSUMER")
        child.attributes.update({"celery.hostname": "demo@box", **fan})
        if n == 2:  # opentelemetry-instrumentation-celery's span: the message's origin at the end
            child.attributes.update({"celery.hostname": "gen7@web", "taskctx.worker": "demo@box"})
        child.process = f"box:{pid}"
        spans[f"child{n}"] = child
        child_send.process = "box:11"
        child_send.save()
    for item in spans.values():
        item.save()
    return spans


def test_a_celery_job_is_one_tree_whose_runs_name_their_celery_worker(client, users):
    """The job's runs are badged with Celery's name of their worker (``taskctx.worker``, else
    ``celery.hostname``): the job's own run and each fanned-out child, not the nested task run
    inline."""
    spans = celery_job(user_id=str(users["root"].pk))
    client_for(client, users["root"])
    rows = {t["root_task_key"]: t for t in client.get(LIST).context["trees"]}
    assert rows["celery-0f1e"]["steps"] == 3 and rows["celery-0f1e"]["status"] == "ok"
    data = json.loads(client.get("/taskctx/api/job/celery-0f1e").content)
    nodes = {n["span_id"]: n for n in data["nodes"]}
    workers = {name: nodes[s.span_id]["worker"] for name, s in spans.items()}
    assert workers == {
        "send": "",
        "run": "demo@box",
        "inline": "",
        "child1": "demo@box",
        "child2": "demo@box",
    }
    assert [nodes[spans[c].span_id]["process"] for c in ("child1", "child2")] == [
        "box:12",
        "box:13",
    ]
    html = client.get("/taskctx/job/celery-0f1e/").content.decode()
    assert "run/sample.publish_books" in html  # the text version, for pages without JavaScript
