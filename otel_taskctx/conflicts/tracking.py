"""The tracking set's format: a pickle of a python ``set`` that can be appended to.

powercrud reads ``powercrud:async:conflict:<task key>`` with ``cache.get`` and gets a ``set``
of lock keys. The Redis backend's Lua script adds keys to it atomically, in the same round
trip that takes the locks, without reading it back: the pickle is built so that appending is
overwriting its 3-byte tail (``SETRANGE``). The database backend does not need this: it
rewrites the set with ``pickle.dumps`` under the tracking row's lock.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

# ---------------------------------------------------------------------------------------------
# the appendable tracking-set pickle
#
#   PROTO 4, EMPTY_SET | MARK, item..., ADDITEMS | ... | NONE, POP, STOP
#
# Every chunk between the header and the 3-byte tail adds items to the set on the stack. To
# append, overwrite the tail with ``chunk + tail``.
# ---------------------------------------------------------------------------------------------
TRACKING_HEADER = b"\x80\x04\x8f"
TRACKING_TAIL = b"N0."


_SHORT = [b"\x8c" + bytes((n,)) for n in range(256)]  # SHORT_BINUNICODE <length byte>


def _pickled_parts(raw: bytes) -> tuple[bytes, bytes]:
    if len(raw) < 256:
        return _SHORT[len(raw)], raw
    return b"X" + len(raw).to_bytes(4, "little"), raw  # BINUNICODE


def tracking_chunk(keys: Iterable[str]) -> bytes:
    """Pickle opcodes that add ``keys`` to the set below them on the unpickler's stack."""
    return b"".join(
        [b"("] + [p for k in keys for p in _pickled_parts(k.encode("utf-8"))] + [b"\x90"]
    )


def prefixed_chunk(prefix: str, texts: list[str]) -> bytes:
    """``tracking_chunk([prefix + t for t in texts])``, faster."""
    head = prefix.encode("utf-8")
    encoded = "\x00".join(texts).encode("utf-8").split(b"\x00")
    if len(encoded) != len(texts) or len(head) + max(map(len, encoded), default=0) >= 256:
        return tracking_chunk([prefix + t for t in texts])
    size = len(head)
    parts = [b"("]
    for raw in encoded:
        parts += (_SHORT[size + len(raw)], head, raw)
    parts.append(b"\x90")
    return b"".join(parts)


def encode_tracking(keys: Iterable[str]) -> bytes:
    """A pickle of ``set(keys)`` that stays loadable after :func:`tracking_chunk` appends."""
    return TRACKING_HEADER + tracking_chunk(keys) + TRACKING_TAIL


def chunked(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
