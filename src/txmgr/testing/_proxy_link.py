"""One client connection through the fault proxy: two pumps and the faults they apply.

The frontend pump reads the client's messages and forwards them to the server,
applying the first rule that fires on a Query or Parse; the backend pump
forwards the server's messages to the client and counts ReadyForQuery messages,
which is how a fault knows that the server finished a statement.

ReadyForQuery bookkeeping: the startup packet, every Query, Sync and
FunctionCall is answered by exactly one ReadyForQuery, in order. ``_synced``
counts those the client sent, ``_ready`` those the server answered; the reply
to a message forwarded when ``_synced`` was *n* is whatever the server sends
after its *n*-th ReadyForQuery, up to and including the next one. A rule that
matches a Parse applies to its extended-protocol batch, i.e. up to its Sync.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from ._proxy_rules import Action, Rule, RuleSet
from ._proxy_wire import (
    GSSENC_REQUEST,
    PROTOCOL_3,
    READY_FOR_QUERY,
    SSL_REQUEST,
    SYNCING,
    ProtocolViolation,
    query_text,
    read_message,
    read_startup,
    startup_code,
)

__all__ = ["Link"]

logger = logging.getLogger("txmgr.testing.proxy")

_CLOSE_GRACE = 5.0  # seconds a closing socket may take to flush before it is aborted


class Link:
    """A client connection and its upstream connection; runs on the proxy's loop."""

    def __init__(
        self,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        upstream: tuple[str, int],
        rules: RuleSet,
    ) -> None:
        self._client_reader = client_reader
        self._client_writer = client_writer
        self._upstream = upstream
        self._rules = rules
        self._server_writer: asyncio.StreamWriter | None = None
        self._closed = asyncio.Event()
        self._synced = 0  # messages sent to the server that it ends with a ReadyForQuery
        self._ready = 0  # ReadyForQuery messages the server sent
        self._mute_after: int | None = None  # drop the server's messages once _ready reaches it
        self._close_at: int | None = None  # close both sides when _ready reaches it
        self._armed: Action | None = None  # a drop_after_* rule waiting for its batch's end
        self._blackholed = False  # nothing passes, in either direction
        self._swallow_client = False  # read the client's messages, forward none

    def close(self) -> None:
        """Close both sides (buffered data is still flushed); idempotent."""
        self._closed.set()
        for writer in (self._client_writer, self._server_writer):
            if writer is not None:
                writer.close()  # a no-op on a transport already closing

    async def run(self) -> None:
        """Connect upstream and pump both ways until either side ends or close() is called."""
        tasks: list[asyncio.Task[None]] = []
        try:
            try:
                server_reader, self._server_writer = await asyncio.open_connection(
                    *self._upstream
                )
            except OSError as e:
                logger.debug("fault proxy: cannot reach %s:%d: %s", *self._upstream, e)
                return
            if self._closed.is_set():  # dropped while connecting (finally closes it)
                return
            tasks = [
                asyncio.create_task(self._guard(self._frontend(self._server_writer))),
                asyncio.create_task(self._guard(self._backend(server_reader))),
            ]
            await self._closed.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.close()
            await self._wait_closed()

    async def _wait_closed(self) -> None:
        writers = [w for w in (self._client_writer, self._server_writer) if w is not None]
        for writer in writers:
            try:
                await asyncio.wait_for(writer.wait_closed(), _CLOSE_GRACE)
            except (TimeoutError, OSError):
                writer.transport.abort()  # the peer does not read: give up its data

    async def _guard(self, pump: Coroutine[Any, Any, None]) -> None:
        """Run a pump; a broken connection or a protocol violation ends the link quietly."""
        try:
            await pump
        except (OSError, ProtocolViolation) as e:
            logger.debug("fault proxy: connection ends: %r", e)
            self.close()
        except Exception:
            logger.exception("fault proxy: unexpected error; closing the connection")
            self.close()

    # -- client -> server ---------------------------------------------------------

    async def _frontend(self, server: asyncio.StreamWriter) -> None:
        while True:  # untyped messages until the startup packet
            raw = await read_startup(self._client_reader)
            if raw is None:
                self.close()
                return
            if startup_code(raw) in (SSL_REQUEST, GSSENC_REQUEST):
                # No encryption through the proxy: it must read the queries. The
                # client goes on in plain text (sslmode=prefer) or gives up (require).
                await _send(self._client_writer, b"N")
                continue
            if startup_code(raw) == PROTOCOL_3:
                self._synced = 1  # the server ends the startup with a ReadyForQuery
            await _send(server, raw)  # a startup packet or a CancelRequest
            break
        while True:
            message = await read_message(self._client_reader)
            if message is None:
                self.close()
                return
            if self._blackholed or self._swallow_client:
                continue
            mtype, raw = message
            sql = query_text(mtype, raw)
            rule = self._rules.match(sql) if sql is not None else None
            if rule is not None:
                logger.debug("fault proxy: %s on %.80r", rule.action, sql)
                if not await self._apply(rule):
                    return
                if self._blackholed:
                    continue
            if self._armed is not None and mtype in SYNCING:
                # The reply to this batch ends the connection: set before sending,
                # so the backend pump cannot see the ReadyForQuery first.
                self._close_at = self._synced + 1
                self._armed = None
                self._swallow_client = True
            if mtype in SYNCING:
                self._synced += 1
            await _send(server, raw)

    async def _apply(self, rule: Rule) -> bool:
        """Start ``rule``'s fault on the message at hand; False: the link is gone."""
        if rule.action == "drop_before":
            self.close()
            return False
        if rule.action == "blackhole":
            self._blackholed = True
        elif rule.action == "delay":
            await asyncio.sleep(rule.delay)
        else:
            if rule.action == "drop_after_forward":
                self._mute_after = self._synced  # replies from this batch on never pass
            self._armed = rule.action
        return True

    # -- server -> client ---------------------------------------------------------

    async def _backend(self, server_reader: asyncio.StreamReader) -> None:
        while True:
            message = await read_message(server_reader)
            if message is None:
                # Behind a blackhole the client cannot learn the server went away.
                if not self._blackholed:
                    self.close()
                return
            if self._blackholed:
                continue
            mtype, raw = message
            muted = self._mute_after is not None and self._ready >= self._mute_after
            if mtype == READY_FOR_QUERY:
                self._ready += 1
                if self._close_at is not None and self._ready >= self._close_at:
                    # The server finished the faulted batch: drop the connection
                    # (after the reply, for drop_after_reply).
                    if not muted:
                        await _send(self._client_writer, raw)
                    self.close()
                    return
            if not muted:
                await _send(self._client_writer, raw)


async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
    # Writing to a closed transport makes asyncio log warnings: fail instead.
    if writer.is_closing():
        raise ConnectionResetError("the peer's side of the proxy is closed")
    writer.write(data)
    await writer.drain()
