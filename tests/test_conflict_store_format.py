"""The appendable tracking-set pickle: what lets Redis append lock keys in place."""

from __future__ import annotations

import pickle

from hypothesis import given
from hypothesis import strategies as st

from otel_taskctx.conflicts.base import normalise_ids
from otel_taskctx.conflicts.tracking import TRACKING_TAIL, encode_tracking, tracking_chunk

text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=300)
keys = st.lists(text, max_size=20)


@given(st.lists(keys, min_size=1, max_size=5))
def test_appended_chunks_load_as_the_union(batches):
    data = encode_tracking(batches[0])
    for batch in batches[1:]:
        data = data[: -len(TRACKING_TAIL)] + tracking_chunk(batch) + TRACKING_TAIL
    expected = {k for batch in batches for k in batch}
    assert pickle.loads(data) == expected


@given(keys, keys)
def test_a_powercrud_pickle_can_be_appended_to(existing, added):
    """powercrud writes a plain pickled set; its STOP is replaced by a chunk and our tail."""
    for protocol in (4, 5):
        data = pickle.dumps(set(existing), protocol)
        data = data[:-1] + tracking_chunk(added) + TRACKING_TAIL
        assert pickle.loads(data) == set(existing) | set(added)


def test_normalise_ids_keeps_types_and_deduplicates_by_text():
    import uuid

    u = uuid.uuid4()
    assert normalise_ids([1, "1", 2, None, u, str(u), "a"]) == [1, 2, u, "a"]
    for bad in ("abc", b"abc"):
        try:
            normalise_ids(bad)
        except TypeError:
            pass
        else:  # pragma: no cover
            raise AssertionError("a single string is not a list of ids")
    try:
        normalise_ids([True])
    except TypeError:
        pass
    else:  # pragma: no cover
        raise AssertionError("bool is not a primary key")


@given(st.text(max_size=60), keys)
def test_the_prefixed_chunk_is_the_generic_chunk(prefix, suffixes):
    from otel_taskctx.conflicts.tracking import prefixed_chunk

    expected = tracking_chunk([prefix + s for s in suffixes])
    assert prefixed_chunk(prefix, suffixes) == expected
