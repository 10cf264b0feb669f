"""Send one simple-protocol query to each of several connections at once.

The hand-written "parallel phases" two-phase commit uses it the way a careful
application would: send PREPARE (or COMMIT PREPARED) to every participant,
then collect every answer, so that a phase costs one round trip of wall time.
It is written here on purpose rather than borrowed from txmgr, so that the
baseline does not change when txmgr's internals do.
"""

from __future__ import annotations

import selectors
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import pq

_OK = (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK, pq.ExecStatus.EMPTY_QUERY)


def send_all(conns: Sequence[psycopg.Connection[Any]], queries: Sequence[bytes]) -> None:
    """Run ``queries[i]`` on ``conns[i]``, all at once; raise the first error."""
    errors: list[BaseException] = []
    waiting: dict[int, psycopg.Connection[Any]] = {}
    for conn, query in zip(conns, queries, strict=True):
        pg = conn.pgconn
        pg.send_query(query)
        while pg.flush():  # a short query: this loop does not normally turn
            pass
        waiting[pg.socket] = conn
    with selectors.DefaultSelector() as sel:
        for fd in waiting:
            sel.register(fd, selectors.EVENT_READ)
        while waiting:
            for fd, conn in list(waiting.items()):
                if _collect(conn, errors):
                    del waiting[fd]
                    sel.unregister(fd)
            if waiting:
                sel.select()
    if errors:
        raise errors[0]


def _collect(conn: psycopg.Connection[Any], errors: list[BaseException]) -> bool:
    pg = conn.pgconn
    pg.consume_input()
    while not pg.is_busy():
        res = pg.get_result()
        if res is None:
            return True
        if res.status not in _OK:
            errors.append(psycopg.errors.error_from_result(res, encoding=conn.info.encoding))
    return False
