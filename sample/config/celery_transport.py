"""The sample's embedded Celery broker: kombu's filesystem transport, each message written
whole before a consumer can see it.

kombu's own ``Channel._put`` creates the message file and then writes it; a worker that lists
the folder in between moves the empty file away, fails to decode it and stops with
"Unrecoverable error: JSONDecodeError" (celery/kombu#1551). Here a message is written under a
name no consumer reads (a leading dot: kombu takes a message's queue from the name after its
first dot) and renamed into place, which is atomic within one folder. Settings:
``CELERY_BROKER_TRANSPORT`` names this class (sample/config/settings.py); the test
``tests/test_sample_celery.py`` fails when kombu's file naming or ``_put`` changes.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        """Put ``payload`` on ``queue``: named as kombu names it, visible only once written."""
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        hidden = os.path.join(self.data_folder_out, f".{name}.part")
        try:
            with open(hidden, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(hidden, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    Channel = Channel
