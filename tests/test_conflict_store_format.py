"""Primary keys as the conflict store takes them."""

from __future__ import annotations

import uuid

import pytest

from otel_taskctx.conflicts.base import normalise_ids


def test_normalise_ids_keeps_types_and_deduplicates_by_text():
    u = uuid.uuid4()
    assert normalise_ids([1, "1", 2, None, u, str(u), "a"]) == [1, 2, u, "a"]
    for bad in ("abc", b"abc"):
        with pytest.raises(TypeError):  # a single string is not a list of ids
            normalise_ids(bad)
    with pytest.raises(TypeError):  # bool is not a primary key
        normalise_ids([True])
