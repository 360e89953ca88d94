"""The sample's embedded Celery broker (``sample/config/celery_transport.py``): kombu's
filesystem transport, with each message renamed into place once written. These tests fail
when kombu changes what the sample's channel relies on: how it names a message file, that a
consumer skips names with a leading dot, and ``Channel._put``'s signature."""

from __future__ import annotations

import inspect
import os
from queue import Empty

import pytest
from kombu import Connection, Exchange, Queue
from kombu.transport import filesystem

from sample.config.celery_transport import Channel, Transport

QUEUE = f"taskctx-sample-{os.environ.get('TASKCTX_INSTANCE', 'main')}"


@pytest.fixture
def connection(tmp_path):
    queue, control = tmp_path / "queue", tmp_path / "control"
    queue.mkdir()
    control.mkdir()
    options = {
        "data_folder_in": str(queue),
        "data_folder_out": str(queue),
        "control_folder": str(control),
    }
    with Connection(transport=Transport, transport_options=options) as conn:
        yield conn, queue


def test_a_message_is_written_whole_under_kombus_name_and_taken(connection):
    conn, folder = connection
    queue = Queue(QUEUE, Exchange(QUEUE), QUEUE)
    conn.Producer().publish({"n": 1}, exchange=queue.exchange, routing_key=QUEUE, declare=[queue])
    (name,) = os.listdir(folder)  # no part file left behind
    assert name.partition(".")[2] == f"{QUEUE}.msg" and not name.startswith(".")
    with conn.SimpleQueue(queue) as simple:
        message = simple.get(block=False)
        assert message.payload == {"n": 1}
        message.ack()
        with pytest.raises(Empty):
            simple.get(block=False)
    assert os.listdir(folder) == []


def test_a_message_still_being_written_is_not_taken(connection):
    """A part file (an empty one: its writer has not written yet) is invisible to consumers:
    kombu's own transport would take an empty visible file and fail to decode it."""
    conn, folder = connection
    queue = Queue(QUEUE, Exchange(QUEUE), QUEUE)
    part = folder / f".1_00000000-0000-0000-0000-000000000000.{QUEUE}.msg.part"
    part.write_bytes(b"")
    with conn.SimpleQueue(queue) as simple:
        with pytest.raises(Empty):
            simple.get(block=False)
        assert simple.qsize() == 0
    assert part.exists()


def test_the_channel_overrides_kombus_put_as_it_is():
    ours, theirs = inspect.signature(Channel._put), inspect.signature(filesystem.Channel._put)
    assert (
        list(ours.parameters) == list(theirs.parameters) == ["self", "queue", "payload", "kwargs"]
    )
    assert Transport.Channel is Channel and issubclass(Transport, filesystem.Transport)
