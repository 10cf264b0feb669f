"""Security checks (issue 4): hostile names and gids never reach a server, and no
DSN password appears in any exception, log line, CLI output or the decision log.

Passwords are those of the harness's servers (every DSN the tests use carries
the superuser's) plus :data:`MARKER`, written into DSNs of servers that are
down or that refuse it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import txmgr
from ops_support import Cluster, prepare_branch, query, run_cli, write_config
from txmgr._dsn import mask, redact
from txmgr._gid import Gid, check_participant_name, log_prefix
from txmgr._logging import JsonFormatter, RedactingFormatter
from txmgr._sqlscan import role_change_statement, transaction_control_statement
from txmgr.daemon import Daemon

MARKER = "Pw-M4rker-7c1e"

HOSTILE_NAMES = [
    "a'; DROP TABLE accounts; --",
    'a"; DROP TABLE accounts; --',
    "a;b",
    "a b",
    "a\x00b",
    "a\nb",
    "a\\b",
    "ä",
    "a$1",
    "../a",
]


@contextlib.contextmanager
def listener() -> Iterator[tuple[str, Callable[[], int]]]:
    """(a DSN pointing at a local socket, how many connections it has received).

    A client's connect() returns only after the kernel has queued the
    connection, so a refusal raised before any connect leaves the count at 0.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        sock.setblocking(False)
        accepted = 0

        def count() -> int:
            nonlocal accepted
            while True:
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    return accepted
                conn.close()
                accepted += 1

        port = sock.getsockname()[1]
        yield f"postgresql://app:{MARKER}@127.0.0.1:{port}/db", count


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# -- injection: refused before anything is sent -----------------------------------------


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_participant_name_is_refused_before_connecting(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with listener() as (dsn, connections):
        with pytest.raises(txmgr.InvalidParticipantName, match="rename it"):
            txmgr.TransactionManager({name: dsn, "b": dsn}, dsn, connect_timeout=2)
        with pytest.raises(txmgr.InvalidParticipantName):
            txmgr.Config.from_mapping({"log": {"dsn": dsn}, "participants": {name: dsn}})
        # The same through a configuration file and the command line.
        config = tmp_path / "hostile.toml"
        config.write_text(f"[log]\ndsn = {json.dumps(dsn)}\n[participants]\n"
                          f"{json.dumps(name)} = {json.dumps(dsn)}\n")
        for command in (["status"], ["recover"], ["resolve", "g", "--commit"]):
            code, out, err = run_cli(capsys, *command, "--config", str(config))
            assert code == 2 and "configuration error" in err and "rename it" in err
            assert MARKER not in out + err
        assert connections() == 0


def test_hostile_log_participant_is_refused() -> None:
    with listener() as (dsn, connections):
        data = {"log": {"participant": HOSTILE_NAMES[0]}, "participants": {"a": dsn}}
        with pytest.raises(txmgr.ConfigError, match=r"is not in \[participants\]"):
            txmgr.Config.from_mapping(data)
        assert connections() == 0


def test_hostile_name_in_a_transaction_is_unknown(make_database: Any) -> None:
    log = make_database()
    txmgr.migrate(log)
    with listener() as (dsn, connections), txmgr.TransactionManager({"a": dsn}, log) as tm:
        with pytest.raises(txmgr.UnknownParticipant, match="configured participants are"):
            with tm.transaction() as tx:
                tx.connection(HOSTILE_NAMES[0])
        assert connections() == 0


@pytest.mark.parametrize(
    "text",
    [
        "txm1_0a1b2c3d_0123456789abcdef_12_a'; DROP TABLE kv; --",
        "txm1_0a1b2c3d_0123456789abcdef_12_a\n",
        "txm1_0a1b2c3d_0123456789abcdef_12_a\x00",
        "txm1_0a1b2c3d_0123456789abcdef_١٢_a",  # digits, but not ASCII ones
        "txm1_0a1b2c3d_0123456789abcdef_12_\uff41",  # a full-width letter a
        "txm1_0a1b2c3d_0123456789abcdef_" + "9" * 10_000 + "_a",
        "txm1_" + "0" * 100_000,
        "",
    ],
)
def test_hostile_gid_is_not_ours(text: str) -> None:
    assert Gid.parse(text) is None


def test_gid_parse_never_raises_on_other_types() -> None:
    for value in (None, 7, b"txm1_0a1b2c3d_0123456789abcdef_12_a", ["x"]):
        assert Gid.parse(value) is None


def test_gid_parts_are_validated() -> None:
    with pytest.raises(ValueError, match="txid"):
        Gid("0a1b2c3d", "0123456789abcde'", 1, "a")
    with pytest.raises(ValueError, match="logid"):
        Gid("0a1b2c3'", "0123456789abcdef", 1, "a")
    with pytest.raises(txmgr.InvalidParticipantName):
        Gid("0a1b2c3d", "0123456789abcdef", 1, "a'--")
    with pytest.raises(ValueError, match="logid"):
        log_prefix("'; --")
    for name in HOSTILE_NAMES:
        with pytest.raises(txmgr.InvalidParticipantName):
            check_participant_name(name)


def test_resolve_takes_a_hostile_gid_as_a_literal(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    """A gid is sent as a quoted literal: one that does not exist is reported
    missing, one that does (PostgreSQL allows any text) is finished exactly."""
    hostile = "x'; DROP TABLE kv; --"
    code, _, err = run_cli(capsys, "resolve", hostile, "--rollback", "--force",
                             "--config", str(cluster.config_path))
    assert code == 1 and "BranchNotFound" in err and "no prepared transaction" in err
    code, _, err = run_cli(capsys, "resolve", "g", "--commit", "--participant", hostile,
                             "--config", str(cluster.config_path))
    assert code == 2 and "unknown participant" in err  # a ConfigError: exit 2
    assert query(cluster.log, "SELECT count(*) FROM txmgr_resolution_audit") == [(0,)]

    odd = "it's \"odd\"; DROP TABLE kv; --"
    prepare_branch(cluster.participants["orders"], odd, ["INSERT INTO kv VALUES ('odd', 1)"])
    code, _, err = run_cli(capsys, "resolve", odd, "--rollback", "--force",
                             "--config", str(cluster.config_path))
    assert code == 0, err
    assert cluster.prepared("orders") == [] and cluster.kv("orders") == {}  # kv still exists
    rows = query(cluster.log, "SELECT gid, action FROM txmgr_resolution_audit")
    assert rows == [(odd, "rollback")]


# -- the guard's scanner (pure) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "found"),
    [
        ("SET ROLE app", "SET ROLE"),
        ("set role none", "SET ROLE"),
        ("SET LOCAL ROLE app", "SET ROLE"),
        ("SET SESSION ROLE app", "SET ROLE"),
        ("SET role = 'app'", "SET ROLE"),
        ("SET role TO DEFAULT", "SET ROLE"),
        ('SET "role" TO app', "SET ROLE"),
        ("SET LOCAL \"role\" = 'app'", "SET ROLE"),
        ("RESET ROLE", "RESET ROLE"),
        ("reset role;", "RESET ROLE"),
        ("SET SESSION AUTHORIZATION app", "SET SESSION AUTHORIZATION"),
        ("SET LOCAL SESSION AUTHORIZATION DEFAULT", "SET SESSION AUTHORIZATION"),
        ("SET session_authorization = app", "SET SESSION AUTHORIZATION"),
        ("RESET SESSION AUTHORIZATION", "RESET SESSION AUTHORIZATION"),
        ("/* x */ SET ROLE app", "SET ROLE"),
        ("SELECT 1; -- note\n SET ROLE app", "SET ROLE"),
        ("SELECT set_config('role', 'app', true)", "set_config('role', …)"),
        ("select pg_catalog.set_config ( 'ROLE' , 'app', false)", "set_config('role', …)"),
        ("SELECT set_config(E'role', 'app', true)", "set_config('role', …)"),
        ("SELECT set_config('session_authorization', 'app', false)",
         "set_config('session_authorization', …)"),
        ("SET search_path = role", None),
        ("SET LOCAL statement_timeout = 100", None),
        ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", None),
        ("SELECT role FROM users", None),
        ("SELECT 'SET ROLE app'", None),
        ("SELECT $$ SET ROLE app $$", None),
        ('SELECT "SET ROLE app"', None),
        ("-- SET ROLE app\nSELECT 1", None),
        ("CREATE ROLE app", None),
        ("ALTER ROLE app SET role = x", None),
        ("GRANT app TO other", None),
        ("SELECT set_config('search_path', 'role', false)", None),
        ("SELECT set_config(%s, 'app', true)", None),  # a parameter: not seen (documented)
    ],
)
def test_role_change_statement(sql: str, found: str | None) -> None:
    assert role_change_statement(sql) == found


def test_role_change_without_standard_conforming_strings() -> None:
    sql = "SELECT 'x\\''; SET ROLE app; --'"
    assert role_change_statement(sql, standard_strings=False) == "SET ROLE"
    assert role_change_statement(sql, standard_strings=True) is None


def test_scanner_survives_unterminated_quotes() -> None:
    for sql in ("SELECT 'commit", 'SELECT "role', "SELECT $$ commit", "SELECT /* commit",
                "SELECT E'\\"):
        assert transaction_control_statement(sql) is None
        assert role_change_statement(sql) is None


# -- DSN masking (pure) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "secret"),
    [
        ("postgresql://u:p@ss@h:5432/db", "ss"),  # an unencoded "@" in the password
        ("postgresql://u:s3cr%40t@h/db", "s3cr"),
        ("postgresql://u@h/db?password=s3cr3t&sslmode=disable", "s3cr3t"),
        ("host=h password='se cret' user=u", "cret"),
        ("host=h password='unterminated secret", "secret"),
        ("host=h password=s3cr3t", "s3cr3t"),
        ("host=h PASSWORD = s3cr3t", "s3cr3t"),
        ("host=h sslpassword=k3y user=u", "k3y"),
        ("postgresql://u@h/db?sslpassword=k3y", "k3y"),
    ],
)
def test_mask_hides_every_password_spelling(dsn: str, secret: str) -> None:
    assert secret not in mask(dsn)
    assert "****" in mask(dsn)
    assert secret not in redact(f"cannot connect to {dsn!r}: refused")


def test_mask_keeps_the_rest() -> None:
    assert mask("postgresql://u:p@ss@h:5432/db") == "postgresql://u:****@h:5432/db"
    assert mask("host=h sslpassword=k3y user=u") == "host=h sslpassword=**** user=u"


def test_config_repr_masks_passwords() -> None:
    config = txmgr.Config(participants={"a": f"postgresql://u:{MARKER}@h/a"},
                          log=f"host=h password={MARKER} dbname=log")
    for text in (repr(config), str(config)):
        assert MARKER not in text and "postgresql://u:****@h/a" in text
    tm = txmgr.TransactionManager.from_config(config)
    assert MARKER not in repr(tm) and MARKER not in repr(tm.participant("a"))
    tm.close()


# -- no password anywhere -------------------------------------------------------------------


def with_password(dsn: str, password: str) -> str:
    params = conninfo_to_dict(dsn)
    params["password"] = password
    return make_conninfo("", **params)


def shown(error: BaseException) -> str:
    return "".join(traceback.format_exception(error)) + repr(error)


def test_no_password_in_errors_logs_cli_output_or_the_decision_log(
    cluster: Cluster,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = [p for s in cluster.servers if (p := s.password)] + [MARKER]
    port = closed_port()
    down = {
        "gone_url": f"postgresql://app:{MARKER}@127.0.0.1:{port}/gone",
        "gone_kv": f"host=127.0.0.1 port={port} dbname=gone user=app password='{MARKER} x'",
        "refused": with_password(cluster.participants["billing"], MARKER),
    }
    dead_log = f"postgresql://app:{MARKER}@127.0.0.1:{port}/txlog"
    texts: dict[str, str] = {}  # where -> what was shown there

    # 1. Exceptions: every failure that names a DSN, and one with a server message.
    def failure(where: str, participants: dict[str, str], log: str) -> None:
        with pytest.raises(txmgr.TxmgrError) as info:
            with txmgr.TransactionManager(participants, log, connect_timeout=2) as tm:
                tm.check()
        texts[where] = shown(info.value)

    for name, dsn in down.items():
        failure(f"error: {name}", {**cluster.participants, name: dsn}, cluster.log)
    failure("error: log down", cluster.participants, dead_log)
    failure("error: bad URL", {"a": f"postgresql://app:{MARKER}@h:{port}/x?nonsense=1"},
            cluster.log)
    failure("error: bad key/value", {"a": f"host=h password='{MARKER}"}, cluster.log)
    with pytest.raises(txmgr.TransactionAborted) as aborted:
        with txmgr.TransactionManager(cluster.participants, cluster.log) as tm:
            with tm.transaction() as tx:
                tx.connection("orders").execute("INSERT INTO kv VALUES ('t', 1)")
                tx.connection("billing").execute("INSERT INTO kv VALUES ('t', 1)")
                tx.connection("billing").execute("CREATE TEMP TABLE scratch (x int)")
            texts["repr: manager"] = repr(tm) + repr(tm.participant("orders"))
    texts["error: aborted at prepare"] = shown(aborted.value)
    texts["repr: config"] = repr(txmgr.Config({**cluster.participants, **down}, dead_log))

    # 2. A coordinator killed after its decision: a decision row, two prepared branches.
    cluster.transfer("after_decision", "k")
    rows = query(cluster.log, "SELECT row_to_json(d)::text FROM txmgr_decision d")
    assert len(rows) == 1
    texts["decision log"] = "\n".join(
        r[0] for r in rows + query(cluster.log, "SELECT row_to_json(m)::text FROM txmgr_log_meta m")
    )

    # 3. The command line, participants up, down, and the log down.
    configs = {
        "up": cluster.config_path,
        "down": write_config(tmp_path / "down.toml", {**cluster.participants, **down},
                             cluster.log),
        "log down": write_config(tmp_path / "logdown.toml", cluster.participants, dead_log),
    }

    def cli(*args: str, config: str) -> tuple[int, str]:
        code, out, err = run_cli(capsys, *args, "--config", str(configs[config]))
        texts[f"cli: {' '.join(args)} ({config})"] = out + err
        return code, out + err

    for config in configs:
        cli("status", config=config)
        cli("status", "--json", config=config)
    (gid,) = cluster.prepared("orders")
    assert gid in texts["cli: status (down)"]  # the outputs did show the prepared branch
    code, out = cli("resolve", gid, "--commit", "--reason", "test", config="down")
    assert code == 0, out
    for config in configs:
        cli("resolve", "txm1_nonsense", "--commit", config=config)
        cli("recover", "-v", config=config)
        cli("migrate", config=config)
    assert cluster.all_prepared() == {"orders": [], "billing": []}
    assert "UNREACHABLE" in texts["cli: status (down)"]
    audit = query(cluster.log, "SELECT row_to_json(a)::text FROM txmgr_resolution_audit a")
    texts["audit rows"] = "\n".join(r[0] for r in audit)
    assert gid in texts["audit rows"]

    # 4. The daemon: one step each, with participants down and with the log down.
    for config in ("down", "log down"):
        daemon = Daemon(txmgr.Config.from_file(configs[config]), interval=60,
                        wait=lambda seconds: True)
        daemon.run()
        texts[f"daemon health ({config})"] = daemon.health()[1]

    # 5. Every log record, raw and as the text and JSON formatters show it.
    records = caplog.records
    assert any(r.levelno >= logging.WARNING for r in records)  # the failures were logged
    plain, text_format, json_format = logging.Formatter(), RedactingFormatter(), JsonFormatter()
    for i, record in enumerate(records):
        texts[f"log {i} {record.name}"] = "\n".join(
            [plain.format(record), text_format.format(record), json_format.format(record),
             repr(record.args), repr(vars(record))]
        )

    leaks = [(where, s) for where, text in texts.items() for s in secrets if s in text]
    assert leaks == [], "\n\n".join(f"{where}:\n{texts[where]}" for where, _ in leaks)
