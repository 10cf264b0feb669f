"""A database that is down: its DSN, pointing at a local port nobody listens on.

The Paxos benchmark's "one log database stopped" needs a DSN that fails the
way a stopped server's does — the connection is refused at once — without
stopping a server the other contenders use. A socket bound to a loopback port
and never put to listen does exactly that (the kernel answers every connection
attempt with a reset), and holding it keeps the port from being taken by a
server someone else starts meanwhile.
"""

from __future__ import annotations

import socket

from psycopg.conninfo import conninfo_to_dict, make_conninfo

__all__ = ["ClosedPort"]


class ClosedPort:
    """A loopback port that refuses connections for as long as this object is open."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        self.port: int = self._sock.getsockname()[1]

    def dsn_like(self, dsn: str) -> str:
        """``dsn`` (same database, user, password, options) aimed at this port instead."""
        params = {k: v for k, v in conninfo_to_dict(dsn).items() if k != "hostaddr"}
        params.update(host="127.0.0.1", port=str(self.port))
        return make_conninfo("", **params)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ClosedPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
