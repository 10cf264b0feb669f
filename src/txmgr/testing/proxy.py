"""A PostgreSQL wire-protocol proxy that loses, delays or swallows chosen queries.

Tests put it between a client and one PostgreSQL server to make network faults
happen at an exact protocol step — a connection lost while ``PREPARE
TRANSACTION`` is in flight, a ``COMMIT`` executed whose reply never arrives::

    from txmgr.testing.proxy import FaultProxy

    with FaultProxy("127.0.0.1", server_port) as proxy:
        dsn = proxy.dsn(direct_dsn)       # same DSN, through the proxy
        rule = proxy.add_rule(r"^PREPARE TRANSACTION", "drop_after_forward")
        ...                               # the client's PREPARE runs, its reply is lost
        assert rule.hits == 1

Rules match the SQL of the client's Query messages (simple protocol) and of
its Parse messages (extended protocol: ``conn.execute(sql, params)``), with
``re.search`` ignoring case, after leading whitespace is stripped. Rules are
tried in order; the first one that still has hits left fires. Actions:

``drop_before``
    close both sides instead of forwarding the message: the server never sees it.
``drop_after_forward``
    forward it; once the server has answered it completely (its ReadyForQuery
    arrived), close both sides without passing any of that answer on: the server
    executed it, the client gets a lost connection.
``drop_after_reply``
    forward it and pass its whole answer on, up to and including the
    ReadyForQuery, then close both sides: the client's *next* statement fails.
``delay``
    hold the message (and whatever the client sends after it) ``delay`` seconds.
``blackhole``
    forward nothing more in either direction on that connection and keep both
    sockets open: the client waits, like behind a network partition (even the
    server closing its side is not passed on). ``drop_all()`` or ``stop()`` ends it.

A rule matched by a Parse applies to its whole extended-protocol batch (up to
the Sync) for the two ``drop_after`` actions. Statements that psycopg prepared
earlier are sent without a Parse and are not seen. The proxy answers SSL and
GSSAPI encryption requests with "no", so clients connect in plain text
(``sslmode=prefer`` or ``disable``; ``require`` fails). One proxy forwards to
one server; give each database whose connections a test drops its own proxy.

The proxy is an asyncio server on a daemon thread with its own event loop; its
methods may be called from any thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from types import TracebackType
from typing import Any, Self

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ._proxy_link import Link
from ._proxy_rules import Action, Rule, RuleSet

__all__ = ["Action", "FaultProxy", "Rule"]

logger = logging.getLogger("txmgr.testing.proxy")

_CALL_TIMEOUT = 30.0  # seconds drop_all() waits for the proxy's loop


class FaultProxy:
    """Forwards loopback connections to ``host:port``, applying fault rules.

    Listens on ``listen_host`` (default 127.0.0.1) at a free port chosen by
    :meth:`start`; ``upstream`` is the ``(host, port)`` it forwards to. Use it as a
    context manager, or call ``start()`` and ``stop()``.
    """

    def __init__(self, host: str, port: int, *, listen_host: str = "127.0.0.1") -> None:
        self.upstream = (host, port)
        self._listen_host = listen_host
        self._rules = RuleSet()
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None  # set on the loop to stop serving
        self._startup_error: BaseException | None = None
        self._lock = threading.Lock()  # guards _links and stop()
        self._links: dict[Link, asyncio.Task[Any]] = {}  # open connections -> their tasks

    def __repr__(self) -> str:
        where = f":{self._port}" if self._port is not None else " (not started)"
        return f"<FaultProxy{where} -> {self.upstream[0]}:{self.upstream[1]}>"

    # -- life cycle ---------------------------------------------------------------

    def start(self) -> Self:
        """Start listening (on a background thread); returns the proxy itself."""
        if self._thread is not None:
            raise RuntimeError("FaultProxy.start(): this proxy was started already; make a new one")
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(_quiet_connection_errors)
        ready = threading.Event()
        self._loop = loop
        self._thread = threading.Thread(
            target=self._run, args=(loop, ready), name="txmgr-fault-proxy", daemon=True
        )
        self._thread.start()
        ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            raise self._startup_error
        return self

    def stop(self) -> None:
        """Close every connection and the listening socket; join the thread. Idempotent."""
        with self._lock:
            loop, thread, stopping = self._loop, self._thread, self._stopping
            if loop is None or thread is None or stopping is None or not thread.is_alive():
                return
            loop.call_soon_threadsafe(stopping.set)
        thread.join()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The loopback port the proxy listens on."""
        if self._port is None:
            raise RuntimeError("FaultProxy.port: the proxy is not started; call start() first")
        return self._port

    def dsn(self, dsn: str) -> str:
        """``dsn`` (URL or key/value) with its host and port replaced by the proxy's."""
        params = conninfo_to_dict(dsn)
        params.pop("hostaddr", None)
        params["host"] = self._listen_host
        params["port"] = str(self.port)
        return make_conninfo("", **params)

    # -- faults -------------------------------------------------------------------

    def add_rule(
        self,
        pattern: str,
        action: Action,
        times: int | None = 1,
        delay: float = 0.0,
    ) -> Rule:
        """Apply ``action`` to the next ``times`` queries matching ``pattern`` (None: all).

        Raises ValueError for an unknown action or a bad ``times``/``delay``, and
        ``re.error`` for a bad pattern.
        """
        return self._rules.add(pattern, action, times, delay)

    def remove_rule(self, rule: Rule) -> None:
        """Stop applying ``rule`` (nothing happens if it is not there any more)."""
        self._rules.remove(rule)

    def clear_rules(self) -> None:
        """Remove every rule; connections in the middle of a fault stay as they are."""
        self._rules.clear()

    def drop_all(self) -> None:
        """Close every current client connection, both sides; returns once they are closed."""
        loop = self._loop
        if loop is None or self._thread is None or not self._thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self._close_links(until_empty=False), loop)
        future.result(timeout=_CALL_TIMEOUT)

    @property
    def connections(self) -> int:
        """How many client connections are open through the proxy."""
        with self._lock:
            return len(self._links)

    # -- the event loop's side ----------------------------------------------------

    def _run(self, loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve(ready))
        except BaseException as e:
            if ready.is_set():
                logger.exception("fault proxy on port %s failed", self._port)
            else:
                self._startup_error = e
        finally:
            ready.set()
            loop.close()

    async def _serve(self, ready: threading.Event) -> None:
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._accept, self._listen_host, 0)
        self._port = int(server.sockets[0].getsockname()[1])
        threading.current_thread().name = f"txmgr-fault-proxy-{self._port}"
        ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            await self._close_links(until_empty=True)
            await server.wait_closed()

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        link = Link(reader, writer, self.upstream, self._rules)
        task = asyncio.current_task()
        assert task is not None
        with self._lock:
            self._links[link] = task
        try:
            await link.run()
        finally:
            with self._lock:
                del self._links[link]

    async def _close_links(self, *, until_empty: bool) -> None:
        while True:
            with self._lock:
                links = dict(self._links)
            if not links:
                return
            for link in links:
                link.close()
            # run() returns once both sockets are closed (or aborted after a grace).
            # (asyncio.wait, unlike gather, never cancels the connections' tasks.)
            await asyncio.wait(links.values())
            if not until_empty:
                return


def _quiet_connection_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A connection that breaks is what this proxy is for: not worth a traceback."""
    if isinstance(context.get("exception"), ConnectionError):
        logger.debug("fault proxy: %s", context.get("message"))
        return
    loop.default_exception_handler(context)
