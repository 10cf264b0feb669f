"""Transaction deadlines (issue 16): ``tm.transaction(timeout=…)`` and ``[transaction]
timeout`` end a transaction that waits — on a lock, on a server that stopped
answering, or idle — before its decision, with TransactionTimeout and every
branch rolled back. Outcomes are asserted, never durations.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

import txmgr
from support import START, Bank, query
from txmgr.testing import Server

UPDATE = "UPDATE accounts SET balance = balance + 1 WHERE id = 1"


def _locked_now(dsn: str) -> bool:
    """Whether account 1 is locked by someone (a NOWAIT lock attempt fails)."""
    with psycopg.connect(dsn) as c:
        try:
            c.execute("SELECT 1 FROM accounts WHERE id = 1 FOR UPDATE NOWAIT")
        except psycopg.errors.LockNotAvailable:
            return True
        return False


def _tagged(dsn: str) -> int:
    return int(query(dsn, "SELECT count(*) FROM pg_stat_activity WHERE "
                          "datname = current_database() AND "
                          "starts_with(application_name, 'txm:')")[0][0])


def test_a_deadline_ends_a_lock_wait_and_rolls_every_branch_back(bank: Bank) -> None:
    tm = bank.manager()
    with psycopg.connect(bank.dsns["a"]) as holder:
        holder.execute(UPDATE)  # holds account 1 on a until the end of the test
        with pytest.raises(txmgr.TransactionTimeout) as info:
            with tm.transaction(timeout=1) as tx:
                tx.connection("b").execute(UPDATE)
                tx.connection("a").execute(UPDATE)  # waits for the holder
        assert not _locked_now(bank.dsns["b"])  # b's branch was rolled back
        holder.rollback()
    error = info.value
    assert isinstance(error, txmgr.TransactionAborted)
    assert error.txid is not None and error.timeout == 1
    assert bank.balance("a") == bank.balance("b") == START
    assert bank.prepared() == []


def _timeouts_count() -> float:
    prom = pytest.importorskip("prometheus_client")
    return prom.REGISTRY.get_sample_value("txmgr_transaction_timeouts_total") or 0.0


def test_a_deadline_expiry_counts_one_transaction_timeout(bank: Bank) -> None:
    before = _timeouts_count()
    tm = bank.manager()
    with psycopg.connect(bank.dsns["a"]) as holder:
        holder.execute(UPDATE)  # holds account 1 on a
        with pytest.raises(txmgr.TransactionTimeout):
            with tm.transaction(timeout=1) as tx:
                tx.connection("a").execute(UPDATE)  # waits for the holder
        holder.rollback()
    assert _timeouts_count() == before + 1
    with tm.transaction(timeout=60) as tx:  # a transaction in time counts nothing
        tx.connection("a").execute(UPDATE)
    assert _timeouts_count() == before + 1


def test_the_config_default_applies_and_an_argument_overrides_it(bank: Bank) -> None:
    config = txmgr.Config(participants=bank.dsns, log=bank.log, transaction_timeout=1)
    tm = txmgr.TransactionManager.from_config(config)
    try:
        with psycopg.connect(bank.dsns["a"]) as holder:
            holder.execute(UPDATE)
            with pytest.raises(txmgr.TransactionTimeout):
                with tm.transaction() as tx:  # the default: 1 s
                    tx.connection("a").execute(UPDATE)
            release = threading.Timer(1.5, holder.rollback)  # the wait outlives 1 s
            release.start()
            with tm.transaction(timeout=60) as tx:
                tx.connection("a").execute(UPDATE)
            release.join()
        assert bank.balance("a") == START + 1
    finally:
        tm.close()


def test_a_deadline_ends_an_idle_transaction_at_its_next_statement_or_commit(
    bank: Bank,
) -> None:
    tm = bank.manager()
    for last in ("statement", "commit"):
        with pytest.raises(txmgr.TransactionTimeout):
            with tm.transaction(timeout=0.5) as tx:
                tx.connection("a").execute(UPDATE)
                threading.Event().wait(1)  # the application is busy elsewhere
                if last == "statement":
                    tx.connection("a").execute(UPDATE)
    assert bank.balance("a") == START
    assert bank.prepared() == []


@contextmanager
def _stopped(server: Server, backend_pid: int) -> Iterator[None]:
    """SIGSTOP the server's postmaster and one backend (TCP stays up, nothing answers)."""
    data_dir = Path(server.data_dir)  # type: ignore[union-attr]
    postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
    pids = [postmaster, backend_pid]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def test_a_deadline_ends_a_statement_on_a_stopped_server(bank: Bank, pg_servers: list[Server]
                                                        ) -> None:
    if not hasattr(pg_servers[1], "data_dir"):
        pytest.skip("needs a server started by the harness (its processes are stopped)")
    tm = bank.manager()
    with pytest.raises(txmgr.TransactionTimeout) as info:
        with tm.transaction(timeout=2) as tx:
            tx.connection("a").execute(UPDATE)
            b = tx.connection("b")
            with _stopped(pg_servers[1], b.info.backend_pid):
                b.execute(UPDATE)  # nobody answers: only the client can end this
    assert isinstance(info.value.__cause__, psycopg.OperationalError)
    assert not _locked_now(bank.dsns["a"])
    # The resumed server notices the closed connection and rolls its branch back.
    end = threading.Event()
    for _ in range(600):
        if _tagged(bank.dsns["b"]) == 0:
            break
        end.wait(0.05)
    assert _tagged(bank.dsns["b"]) == 0
    assert bank.balance("a") == bank.balance("b") == START
    assert bank.prepared() == []


def test_a_deadline_bounds_the_prepare_too(bank: Bank) -> None:
    """A PREPARE that waits (a deferred trigger wanting a lock) past the deadline:
    TransactionTimeout, nothing prepared or committed."""
    from test_async import GATE, gated

    gated(bank)
    tm = bank.manager()
    with psycopg.connect(bank.dsns["b"]) as gate:
        gate.execute("SELECT pg_advisory_xact_lock(%s)", (GATE,))
        with pytest.raises(txmgr.TransactionTimeout):
            with tm.transaction(timeout=1) as tx:
                tx.connection("a").execute(UPDATE)
                tx.connection("b").execute("INSERT INTO gated VALUES (1)")
        gate.rollback()
    assert bank.balance("a") == START
    assert query(bank.dsns["b"], "SELECT count(*) FROM gated") == [(0,)]
    assert bank.prepared() == []


def test_async_a_deadline_ends_a_lock_wait(bank: Bank) -> None:
    async def main() -> Any:
        async with txmgr.AsyncTransactionManager(bank.dsns, bank.log) as tm:
            with pytest.raises(txmgr.TransactionTimeout) as info:
                async with tm.transaction(timeout=1) as tx:
                    await (await tx.connection("b")).execute(UPDATE)
                    await (await tx.connection("a")).execute(UPDATE)
            return info.value

    with psycopg.connect(bank.dsns["a"]) as holder:
        holder.execute(UPDATE)
        error = asyncio.run(main())
        assert not _locked_now(bank.dsns["b"])
        holder.rollback()
    assert isinstance(error, txmgr.TransactionAborted)
    assert bank.balance("a") == bank.balance("b") == START
    assert bank.prepared() == []


def test_async_a_deadline_ends_a_statement_on_a_stopped_server(
    bank: Bank, pg_servers: list[Server]
) -> None:
    if not hasattr(pg_servers[1], "data_dir"):
        pytest.skip("needs a server started by the harness (its processes are stopped)")

    async def main() -> None:
        async with txmgr.AsyncTransactionManager(bank.dsns, bank.log) as tm:
            with pytest.raises(txmgr.TransactionTimeout):
                async with tm.transaction(timeout=2) as tx:
                    await (await tx.connection("a")).execute(UPDATE)
                    b = await tx.connection("b")
                    with _stopped(pg_servers[1], b.info.backend_pid):
                        await b.execute(UPDATE)

    asyncio.run(main())
    assert not _locked_now(bank.dsns["a"])
    assert bank.balance("a") == bank.balance("b") == START


def test_sqlalchemy_a_deadline_ends_a_lock_wait(bank: Bank) -> None:
    import sqlalchemy as sa

    from txmgr.sqlalchemy import SQLAlchemy

    db = SQLAlchemy(bank.manager())
    with psycopg.connect(bank.dsns["a"]) as holder:
        holder.execute(UPDATE)
        with pytest.raises(txmgr.TransactionTimeout) as info:
            with db.transaction(timeout=1) as tx:
                tx.connection("b").execute(sa.text(UPDATE))
                tx.connection("a").execute(sa.text(UPDATE))
        assert not _locked_now(bank.dsns["b"])
        holder.rollback()
    assert info.value.txid == tx.txid
    assert bank.balance("a") == bank.balance("b") == START
    assert bank.prepared() == []


def test_sqlalchemy_a_session_commit_past_the_configured_deadline_is_refused(
    bank: Bank,
) -> None:
    import sqlalchemy as sa

    import txmgr.sqlalchemy

    config = txmgr.Config(participants=bank.dsns, log=bank.log, transaction_timeout=0.5)
    tm = txmgr.TransactionManager.from_config(config)
    try:
        session_factory = txmgr.sqlalchemy.sessionmaker(tm, bind="a")
        with session_factory() as session:
            session.execute(sa.text(UPDATE))
            threading.Event().wait(1)  # the application is busy past the deadline
            with pytest.raises(txmgr.TransactionTimeout):
                session.commit()
    finally:
        tm.close()
    assert bank.balance("a") == START
    assert bank.prepared() == []
