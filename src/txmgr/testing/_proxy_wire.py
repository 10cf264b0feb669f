"""The PostgreSQL wire protocol (v3), framed just enough for the fault proxy.

A connection starts with one *untyped* message from the client: a 4-byte length
(counting itself) and a payload whose first 4 bytes say what it is — a startup
packet (protocol 3.0), an SSLRequest or GSSENCRequest (the client then waits for
one byte, ``S``/``G`` or ``N``, and sends another untyped message), or a
CancelRequest (the server closes the connection after it). Every later message
in either direction is a type byte and a 4-byte length (counting itself, not the
type byte). Nothing here does I/O beyond reading whole messages from a stream.
"""

from __future__ import annotations

import asyncio
import struct

__all__ = [
    "CANCEL_REQUEST",
    "GSSENC_REQUEST",
    "PROTOCOL_3",
    "READY_FOR_QUERY",
    "SSL_REQUEST",
    "SYNCING",
    "ProtocolViolation",
    "query_text",
    "read_message",
    "read_startup",
    "startup_code",
]

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
PROTOCOL_3 = 3 << 16

READY_FOR_QUERY = b"Z"
#: Frontend messages the server answers with exactly one ReadyForQuery: a
#: simple Query, an extended-protocol Sync, a FunctionCall. (An error in the
#: extended protocol skips messages up to the Sync, whose ReadyForQuery still
#: comes; a COPY started by a Query ends with that Query's ReadyForQuery.)
SYNCING = frozenset({b"Q", b"S", b"F"})

_STARTUP_MAX = 10_000  # the server's own limit for an untyped first message
_MESSAGE_MAX = 1 << 30  # the server refuses anything longer


class ProtocolViolation(Exception):
    """The byte stream is not the PostgreSQL protocol: the proxy closes the connection."""


async def read_startup(reader: asyncio.StreamReader) -> bytes | None:
    """The whole untyped first message (length included), or None at end of stream."""
    try:
        header = await reader.readexactly(4)
        (length,) = struct.unpack("!I", header)
        if not 8 <= length <= _STARTUP_MAX:
            raise ProtocolViolation(f"untyped message of length {length}")
        return header + await reader.readexactly(length - 4)
    except asyncio.IncompleteReadError:
        return None


def startup_code(raw: bytes) -> int:
    """The request code (or protocol version) of an untyped message."""
    code: int = struct.unpack_from("!I", raw, 4)[0]
    return code


async def read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """``(type byte, whole message)`` of the next typed message, or None at end of stream."""
    try:
        header = await reader.readexactly(5)
        (length,) = struct.unpack_from("!I", header, 1)
        if not 4 <= length <= _MESSAGE_MAX:
            raise ProtocolViolation(f"message {header[:1]!r} of length {length}")
        return header[:1], header + await reader.readexactly(length - 4)
    except asyncio.IncompleteReadError:
        return None


def query_text(mtype: bytes, raw: bytes) -> str | None:
    """The SQL of a Query (``Q``) or Parse (``P``) message, leading whitespace
    stripped; None for any other message.

    Parse is: statement name, NUL, query, NUL, parameter types. The text is
    decoded as UTF-8 (psycopg's default client encoding), undecodable bytes replaced.
    """
    body = raw[5:]
    if mtype == b"Q":
        sql = body.split(b"\0", 1)[0]
    elif mtype == b"P":
        parts = body.split(b"\0", 2)
        if len(parts) < 2:
            return None
        sql = parts[1]
    else:
        return None
    return sql.decode("utf-8", errors="replace").lstrip()
