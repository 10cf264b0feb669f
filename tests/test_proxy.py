"""The fault proxy (txmgr.testing.proxy) against a real server: it forwards the
protocol transparently, and each fault does exactly what it says."""

from __future__ import annotations

import logging
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from txmgr.testing.proxy import FaultProxy
from txmgr.testing.pytest_plugin import MakeDatabase

# Statement forms: the simple protocol (a Query message; psycopg uses it when a
# statement has no parameters) and the extended one (Parse/Bind/Execute/Sync).
INSERT = {
    "simple": ("INSERT INTO t VALUES (1)", None),
    "extended": ("INSERT INTO t VALUES (%s)", (1,)),
}


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Wait for ``condition`` (something the proxy or server does on its own thread)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def proxy_for(dsn: str) -> FaultProxy:
    params = conninfo_to_dict(dsn)
    return FaultProxy(str(params["host"]), int(str(params["port"])))


def count(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM t").fetchone()
        assert row is not None
        return int(row[0])


@pytest.fixture
def db(make_database: MakeDatabase) -> str:
    dsn = make_database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int)")
    return dsn


@pytest.fixture
def proxy(db: str) -> Iterator[FaultProxy]:
    with proxy_for(db) as p:
        yield p


@pytest.fixture(autouse=True)
def quiet_loop(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Lost connections are the proxy's business: nothing may be logged as a problem."""
    caplog.set_level(logging.WARNING)
    yield
    noisy = [r for r in caplog.records if r.name in ("asyncio", "txmgr.testing.proxy")]
    assert noisy == [], [r.getMessage() for r in noisy]


def test_forwards_both_protocols_transparently(db: str, proxy: FaultProxy) -> None:
    with psycopg.connect(proxy.dsn(db)) as conn:
        assert proxy.connections == 1
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.execute("SELECT %s::int + 1", (1,)).fetchone() == (2,)
        for i in range(7):  # psycopg prepares a statement it runs often (named Parse, then Binds)
            conn.execute("INSERT INTO t VALUES (%s)", (i,), prepare=True)
        big = conn.execute("SELECT repeat('x', 3000000)").fetchone()  # many TCP segments
        assert big is not None and len(big[0]) == 3_000_000
        rows = conn.execute("SELECT g FROM generate_series(1, 20000) g").fetchall()
        assert rows[-1] == (20000,) and len(rows) == 20000
        with conn.cursor().copy("COPY t FROM STDIN") as copy:
            for i in range(1000):
                copy.write_row((i,))
        conn.commit()
        with conn.cursor().copy("COPY t TO STDOUT") as copy:
            assert len(list(copy.rows())) == 1007
        with conn.pipeline():  # many messages in flight, one Sync each
            curs = [conn.execute("SELECT %s::int * 2", (i,)) for i in range(50)]
        assert [c.fetchone() for c in curs] == [(i * 2,) for i in range(50)]
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1 / 0")
        conn.rollback()
        assert conn.execute("SELECT 'still fine'").fetchone() == ("still fine",)
    assert count(db) == 1007
    wait_until(lambda: proxy.connections == 0)


@pytest.mark.parametrize("sslmode", ["prefer", "disable"])
def test_plain_text_with_sslmode(db: str, proxy: FaultProxy, sslmode: str) -> None:
    with psycopg.connect(proxy.dsn(db), sslmode=sslmode) as conn:
        assert conn.execute("SELECT 'ok'").fetchone() == ("ok",)
        assert not conn.pgconn.ssl_in_use


def test_sslmode_require_is_refused(db: str, proxy: FaultProxy) -> None:
    with pytest.raises(psycopg.OperationalError, match="SSL"):
        psycopg.connect(proxy.dsn(db), sslmode="require", connect_timeout=10)


def test_answers_encryption_requests_itself(proxy: FaultProxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        for code in (80877103, 80877104):  # SSLRequest, GSSENCRequest
            sock.sendall(struct.pack("!II", 8, code))
            assert sock.recv(1) == b"N"


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_drop_before_never_reaches_the_server(db: str, proxy: FaultProxy, protocol: str) -> None:
    rule = proxy.add_rule(r"^insert into t", "drop_before")
    with psycopg.connect(proxy.dsn(db), autocommit=True) as conn:
        with pytest.raises(psycopg.OperationalError):
            conn.execute(*INSERT[protocol])
    assert rule.hits == 1
    assert count(db) == 0
    with psycopg.connect(proxy.dsn(db), autocommit=True) as conn:  # the rule fired once
        conn.execute(*INSERT[protocol])
    assert rule.hits == 1
    assert count(db) == 1


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_drop_after_forward_executes_but_loses_the_reply(
    db: str, proxy: FaultProxy, protocol: str
) -> None:
    rule = proxy.add_rule(r"^INSERT", "drop_after_forward")
    with psycopg.connect(proxy.dsn(db), autocommit=True) as conn:
        with pytest.raises(psycopg.OperationalError):
            conn.execute(*INSERT[protocol])
    assert rule.hits == 1
    assert count(db) == 1


def test_drop_after_forward_of_commit_commits(db: str, proxy: FaultProxy) -> None:
    rule = proxy.add_rule(r"^COMMIT", "drop_after_forward")
    with psycopg.connect(proxy.dsn(db)) as conn:
        conn.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(psycopg.OperationalError):
            conn.commit()  # a Query "COMMIT"
    assert rule.hits == 1
    assert count(db) == 1


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_drop_after_reply_fails_the_next_statement(
    db: str, proxy: FaultProxy, protocol: str
) -> None:
    rule = proxy.add_rule(r"^INSERT", "drop_after_reply")
    with psycopg.connect(proxy.dsn(db), autocommit=True) as conn:
        assert conn.execute(*INSERT[protocol]).rowcount == 1
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    assert rule.hits == 1
    assert count(db) == 1


def test_delay_holds_the_message(db: str, proxy: FaultProxy) -> None:
    rule = proxy.add_rule(r"^SELECT 42", "delay", delay=0.5)
    with psycopg.connect(proxy.dsn(db), autocommit=True) as conn:
        start = time.monotonic()
        assert conn.execute("SELECT 42").fetchone() == (42,)
        assert time.monotonic() - start >= 0.5  # a lower bound: a slow machine only adds
        assert conn.execute("SELECT 42").fetchone() == (42,)
    assert rule.hits == 1


class Background:
    """A statement run on a thread, so that the test can see it hang."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._fn = fn
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._fn()
        except BaseException as e:
            self.error = e
        finally:
            self.done.set()

    def join(self) -> None:
        self._thread.join(timeout=30)
        assert not self._thread.is_alive()


def test_blackhole_hangs_only_that_connection(db: str, proxy: FaultProxy) -> None:
    rule = proxy.add_rule(r"^SELECT 1234", "blackhole")
    with psycopg.connect(proxy.dsn(db), autocommit=True) as conn:
        stuck = Background(lambda: conn.execute("SELECT 1234"))
        try:
            # A bounded wait for something that cannot happen: nothing is forwarded.
            assert not stuck.done.wait(1.0)
            assert rule.hits == 1
            with psycopg.connect(db, autocommit=True) as direct:
                seen = direct.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE query = %s", ("SELECT 1234",)
                ).fetchone()
            assert seen == (0,)  # the server never got it
            with psycopg.connect(proxy.dsn(db), autocommit=True) as other:
                assert other.execute("SELECT 1").fetchone() == (1,)
            wait_until(lambda: proxy.connections == 1)
        finally:
            proxy.drop_all()  # the only way out for the stuck statement
            stuck.join()
        assert isinstance(stuck.error, psycopg.OperationalError)
    assert proxy.connections == 0


def test_times_order_and_removal(db: str, proxy: FaultProxy) -> None:
    first = proxy.add_rule(r"^INSERT", "drop_before", times=2)
    second = proxy.add_rule(r"^INSERT INTO t", "drop_after_reply", times=None)

    def insert() -> str:
        with psycopg.connect(proxy.dsn(db), autocommit=True) as conn:
            try:
                conn.execute("INSERT INTO t VALUES (1)")
            except psycopg.OperationalError:
                return "lost"
            try:
                conn.execute("SELECT 1")
            except psycopg.OperationalError:
                return "replied, then lost"
            return "ok"

    assert [insert(), insert()] == ["lost", "lost"]  # the first rule wins while it lasts
    assert (first.hits, second.hits, count(db)) == (2, 0, 0)
    assert [insert(), insert(), insert()] == ["replied, then lost"] * 3  # no limit
    assert (first.hits, second.hits, count(db)) == (2, 3, 3)
    proxy.remove_rule(second)
    proxy.remove_rule(second)  # already gone: nothing happens
    assert insert() == "ok"
    third = proxy.add_rule(r"^INSERT", "drop_before", times=None)
    proxy.clear_rules()
    assert insert() == "ok"
    assert (second.hits, third.hits, count(db)) == (3, 0, 5)


def test_drop_all_closes_every_connection(db: str, proxy: FaultProxy) -> None:
    conns = [psycopg.connect(proxy.dsn(db), autocommit=True) for _ in range(2)]
    try:
        assert proxy.connections == 2
        proxy.drop_all()
        assert proxy.connections == 0
        for conn in conns:
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
    finally:
        for conn in conns:
            conn.close()
    with psycopg.connect(proxy.dsn(db), autocommit=True) as conn:  # still listening
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_server_side_close_reaches_the_client(db: str, proxy: FaultProxy) -> None:
    with psycopg.connect(proxy.dsn(db), autocommit=True) as conn:
        with psycopg.connect(db, autocommit=True) as direct:
            direct.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    wait_until(lambda: proxy.connections == 0)


def test_client_side_close_reaches_the_server(db: str, proxy: FaultProxy) -> None:
    def backend_alive(pid: int) -> bool:
        with psycopg.connect(db, autocommit=True) as direct:
            row = direct.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
            return row.fetchone() == (1,)

    conn = psycopg.connect(proxy.dsn(db), autocommit=True)
    pid = conn.info.backend_pid
    assert backend_alive(pid)
    # Close the TCP connection without the protocol's Terminate message.
    sock = socket.socket(fileno=conn.pgconn.socket)
    try:
        sock.shutdown(socket.SHUT_RDWR)
    finally:
        sock.detach()  # the fd belongs to libpq
        conn.close()
    wait_until(lambda: not backend_alive(pid))
    wait_until(lambda: proxy.connections == 0)


def test_cancel_request_is_forwarded(db: str, proxy: FaultProxy) -> None:
    with psycopg.connect(proxy.dsn(db), autocommit=True) as conn:
        sleeper = Background(lambda: conn.execute("SELECT pg_sleep(60)"))

        def sleeping() -> bool:
            with psycopg.connect(db, autocommit=True) as direct:
                row = direct.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND state = 'active'",
                    (conn.info.backend_pid,),
                ).fetchone()
                return row == (1,)

        wait_until(sleeping)
        conn.cancel_safe()  # a CancelRequest on a new connection through the proxy
        sleeper.join()
        assert isinstance(sleeper.error, psycopg.errors.QueryCanceled)
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_upstream_down_fails_the_connect(proxy: FaultProxy) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with FaultProxy("127.0.0.1", closed_port) as down:
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(host="127.0.0.1", port=down.port, user="x", connect_timeout=10)
        wait_until(lambda: down.connections == 0)


def test_stop_closes_everything(db: str) -> None:
    proxy = proxy_for(db).start()
    port = proxy.port
    conn = psycopg.connect(proxy.dsn(db), autocommit=True)
    try:
        proxy.stop()
        assert proxy.connections == 0
        assert not [t for t in threading.enumerate() if t.name == f"txmgr-fault-proxy-{port}"]
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    finally:
        conn.close()
    proxy.stop()  # idempotent
    proxy.drop_all()  # no-op once stopped
    with pytest.raises(RuntimeError, match="started already"):
        proxy.start()


def test_dsn_keeps_everything_but_host_and_port(proxy: FaultProxy) -> None:
    url = "postgresql://app:p%40ss@db1:6543/orders?application_name=shop&options=-c%20a%3Db"
    assert conninfo_to_dict(proxy.dsn(url)) == {
        "user": "app", "password": "p@ss", "dbname": "orders", "application_name": "shop",
        "options": "-c a=b", "host": "127.0.0.1", "port": str(proxy.port),
    }
    kv = "host=db1 hostaddr=127.0.0.2 port=6543 dbname=x sslmode=disable"
    assert conninfo_to_dict(proxy.dsn(kv)) == {
        "dbname": "x", "sslmode": "disable", "host": "127.0.0.1", "port": str(proxy.port),
    }


def test_bad_arguments_are_refused(proxy: FaultProxy) -> None:
    with pytest.raises(ValueError, match="unknown fault proxy action 'explode'"):
        proxy.add_rule("x", "explode")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="times=0"):
        proxy.add_rule("x", "drop_before", times=0)
    with pytest.raises(ValueError, match="belongs to the action 'delay'"):
        proxy.add_rule("x", "drop_before", delay=1.0)
    with pytest.raises(ValueError, match="delay=-1"):
        proxy.add_rule("x", "delay", delay=-1)


    with pytest.raises(re.error):
        proxy.add_rule("(", "drop_before")
    with pytest.raises(RuntimeError, match="call start"):
        _ = FaultProxy("127.0.0.1", 1).port
