"""Submit powercrud's bulk-edit form from Python, through the view, as the browser does.

The demo uses this to launch its jobs: the request goes through the same view method, so
powercrud's own code checks conflicts, reserves the locks and queues
``powercrud.tasks.bulk_update_task`` with exactly the arguments a click in the browser gives.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from html import unescape
from typing import Any

from django.contrib.sessions.backends.cache import SessionStore
from django.test import RequestFactory
from django.urls import reverse
from django_htmx.middleware import HtmxDetails
from powercrud.bulk_persistence import DefaultBulkUpdatePersistenceBackend
from powercrud.mixins import BulkEditRole


@dataclass
class BulkSubmission:
    """What the bulk-edit view answered: ``queued`` (with ``task_key``), ``conflict`` or ``error``."""

    outcome: str
    task_key: str | None
    message: str
    status_code: int

    @property
    def queued(self) -> bool:
        return self.outcome == "queued"


def _text(html: str) -> str:
    text = re.sub(r"<script.*?</script>", " ", html, flags=re.S)
    text = re.sub(r"<[^>]+>", " ", text)
    return re.sub(r"\s+", " ", unescape(text)).strip()


def submit_bulk_edit(
    view_class: type,
    selected_ids: Iterable[Any],
    values: Mapping[str, Any],
    user: Any,
) -> BulkSubmission:
    """POST the bulk-edit form of ``view_class`` for ``selected_ids`` setting ``values``."""
    ids = [str(pk) for pk in selected_ids]
    url = reverse(f"{view_class.namespace}:{view_class.url_base}-bulk-edit")
    data: dict[str, Any] = {
        "selected_ids[]": ids,
        "bulk_submit": "1",
        "fields_to_update": list(values),
        **{name: str(value) for name, value in values.items()},
    }
    request = RequestFactory().post(url, data, HTTP_HX_REQUEST="true")
    request.user = user
    request.session = SessionStore()
    request.htmx = HtmxDetails(request)
    response = view_class.as_view(role=BulkEditRole())(request)
    content = response.content.decode("utf-8", "replace")
    trigger = response.headers.get("HX-Trigger")
    if trigger:
        try:
            payload = json.loads(trigger)
        except ValueError:
            payload = {}
        if payload.get("bulkEditQueued"):
            return BulkSubmission(
                "queued", payload.get("taskName"), payload.get("message", ""), response.status_code
            )
    if 'data-powercrud-bulk-outcome="conflict"' in content or "bulk_edit_conflict" in content:
        outcome = "conflict"
    elif response.status_code == 200 and not content.strip():
        outcome = "done"  # processed synchronously (fewer rows than the async threshold)
    else:
        outcome = "error"
    return BulkSubmission(outcome, None, _text(content), response.status_code)


#: set while a job of the "Albums (fan-out)" page saves its albums (see FanOutBulkUpdate)
fan_out_requested: ContextVar[bool] = ContextVar("sample_fan_out_requested", default=False)


class FanOutBulkUpdate(DefaultBulkUpdatePersistenceBackend):
    """powercrud's own bulk update, with the sample's fan-out switch on: ``Album.save()`` then
    launches the repricing of its tracks as a child job on another worker (fan-out)."""

    def persist_bulk_update(self, **kwargs: Any) -> dict[str, Any]:
        token = fan_out_requested.set(True)
        try:
            return super().persist_bulk_update(**kwargs)
        finally:
            fan_out_requested.reset(token)
