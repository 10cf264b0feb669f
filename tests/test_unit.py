"""Unit tests of pure logic: gids, the SQL scanner, DSN masking, configuration."""

from __future__ import annotations

import pathlib

import pytest

import txmgr
from txmgr._dsn import mask, redact
from txmgr._gid import Gid, check_participant_name, log_prefix, new_txid
from txmgr._sqlscan import transaction_control_statement
from txmgr.config import Config, resolve_config_path
from txmgr.log import SCHEMA_REVISION
from txmgr.testing.killed_coordinator import KillingHooks


def test_gid_round_trip() -> None:
    gid = Gid("0a1b2c3d", "0123456789abcdef", 2**62 + 5, "order_items2")
    text = str(gid)
    assert text == f"txm1_0a1b2c3d_0123456789abcdef_{2**62 + 5}_order_items2"
    assert Gid.parse(text) == gid
    assert text.startswith(log_prefix("0a1b2c3d"))
    assert len(str(Gid("f" * 8, "f" * 16, 2**63 - 1, "z" * 32))) < 200


@pytest.mark.parametrize(
    "text",
    [
        "someone_elses",
        "txm1_0a1b2c3d_0123456789abcdef_12",  # no participant
        "txm1_0A1B2C3D_0123456789abcdef_12_a",  # upper case logid
        "txm1_0a1b2c3d_0123456789abcde_12_a",  # short txid
        "txm1_0a1b2c3d_0123456789abcdef_0_a",  # xid 0
        f"txm1_0a1b2c3d_0123456789abcdef_{2**64}_a",  # beyond 64 bits
        f"txm1_0a1b2c3d_0123456789abcdef_{2**63}_a",  # beyond bigint
        "txm1_0a1b2c3d_0123456789abcdef_12_A",
        "txm2_0a1b2c3d_0123456789abcdef_12_a",
    ],
)
def test_gid_parse_rejects_foreign(text: str) -> None:
    assert Gid.parse(text) is None


def test_gid_constructor_validates() -> None:
    with pytest.raises(ValueError, match="txid"):
        Gid("0a1b2c3d", "xyz", 1, "a")
    with pytest.raises(txmgr.InvalidParticipantName):
        Gid("0a1b2c3d", "0123456789abcdef", 1, "Bad")


def test_txids_are_random_hex() -> None:
    ids = {new_txid() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in ids)


@pytest.mark.parametrize("name", ["a", "orders", "a_1", "z" * 32])
def test_valid_names(name: str) -> None:
    assert check_participant_name(name) == name


@pytest.mark.parametrize(
    ("query", "found"),
    [
        ("COMMIT", "COMMIT"),
        ("commit;", "COMMIT"),
        ("insert into t values (1); commit", "COMMIT"),
        ("  end  ", "END"),
        ("-- note\nabort", "ABORT"),
        ("/* a /* nested */ comment */ rollback", "ROLLBACK"),
        ("ROLLBACK AND CHAIN", "ROLLBACK"),
        ("prepare transaction 'x'", "PREPARE TRANSACTION"),
        ("select 1", None),
        ("rollback to savepoint a", None),
        ("ROLLBACK TO a", None),
        ("savepoint commit_point", None),
        ("select 'commit'", None),
        ("select $$commit$$", None),
        ("select $tag$ ; commit $tag$", None),
        ("select e'\\';commit';", None),
        ('select "commit" from t', None),
        ("prepare stmt as select 1", None),
        ("update t set note = 'a;commit' where id = $1", None),
        ("(select 1)", None),
    ],
)
def test_transaction_control_statement(query: str, found: str | None) -> None:
    assert transaction_control_statement(query) == found


def test_backslash_quotes_without_standard_conforming_strings() -> None:
    query = "SELECT 'x\\''; COMMIT; --'"
    assert transaction_control_statement(query, standard_strings=False) == "COMMIT"
    assert transaction_control_statement(query, standard_strings=True) is None


@pytest.mark.parametrize(
    ("dsn", "masked"),
    [
        ("postgresql://u:s3cr%40t@h:5432/db", "postgresql://u:****@h:5432/db"),
        ("postgres://u@h/db", "postgres://u@h/db"),
        ("host=h password=s3cret user=u", "host=h password=**** user=u"),
        ("host=h password='s3 cret' user=u", "host=h password=**** user=u"),
        ("host=h user=u", "host=h user=u"),
    ],
)
def test_mask(dsn: str, masked: str) -> None:
    assert mask(dsn) == masked


def test_redact_inside_messages() -> None:
    msg = 'connection to "postgresql://app:hunter2@db/x" failed; password=hunter2 rejected'
    assert "hunter2" not in redact(msg)


def write(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    path = tmp_path / "txmgr.toml"
    path.write_text(text)
    return path


def test_config_from_file(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, """
[log]
participant = "orders"
idle_timeout = 30

[participants]
orders = "postgresql://app@db1/orders"
billing = "host=db2 dbname=billing"

[pool]
max_size = 4

[recovery]
interval = 2.5

[metrics]
port = 9187
address = "0.0.0.0"
""")
    cfg = Config.from_file(path)
    assert cfg.log_participant == "orders" and cfg.log_dsn == "postgresql://app@db1/orders"
    assert cfg.log_idle_timeout == 30 and cfg.pool_max_size == 4
    assert cfg.recovery_interval == 2.5 and cfg.metrics_port == 9187
    assert cfg.metrics_address == "0.0.0.0"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('[participants]\na = "host=x"\n', r"missing \[log\]"),
        ('[log]\ndsn = "host=l"\n', r"missing \[participants\]"),
        ('[log]\ndsn = "host=l"\nparticipant = "a"\n[participants]\na = "host=x"\n',
         "exactly one of"),
        ('[log]\nparticipant = "zz"\n[participants]\na = "host=x"\n', "not in"),
        ('[log]\ndsn = "host=l"\nidle_timout = 3\n[participants]\na = "host=x"\n',
         "unknown key"),
        ('[log]\ndsn = "host=l"\n[participants]\nA = "host=x"\n', "invalid participant"),
        ('[log]\ndsn = "host=l"\n[participants]\na = "host=x"\n[pool]\nmax_size = 0\n',
         "pool sizes"),
        ("[log\n", "not valid TOML"),
    ],
)
def test_config_errors(tmp_path: pathlib.Path, text: str, match: str) -> None:
    with pytest.raises(txmgr.ConfigError, match=match):
        Config.from_file(write(tmp_path, text))


def test_config_missing_file(tmp_path: pathlib.Path) -> None:
    with pytest.raises(txmgr.ConfigError, match="does not exist"):
        Config.from_file(tmp_path / "nope.toml")


def test_config_path_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TXMGR_CONFIG", raising=False)
    with pytest.raises(txmgr.ConfigError, match="--config"):
        resolve_config_path(None)
    monkeypatch.setenv("TXMGR_CONFIG", "/etc/txmgr.toml")
    assert resolve_config_path(None) == "/etc/txmgr.toml"
    assert resolve_config_path("x.toml") == "x.toml"


def test_schema_revision_is_the_migrations_head() -> None:
    from txmgr._migrate import head_revision

    assert head_revision() == SCHEMA_REVISION


def test_killing_hooks_validate_point() -> None:
    with pytest.raises(ValueError, match="kill_at"):
        KillingHooks("sometime")


def test_error_tree() -> None:
    for name in txmgr.errors.__all__:
        assert issubclass(getattr(txmgr.errors, name), txmgr.TxmgrError)
        assert getattr(txmgr, name) is getattr(txmgr.errors, name)


class _OldServerInfo:
    server_version = 120011


class _OldServer:
    """Just enough of a psycopg connection to look like PostgreSQL 12."""

    info = _OldServerInfo()


def test_postgresql_older_than_13_is_refused() -> None:
    from txmgr.participant import check_server

    with pytest.raises(txmgr.UnsupportedServer, match=r"'orders' runs PostgreSQL 12.*13 or newer"):
        check_server(_OldServer(), "orders")  # type: ignore[arg-type]


def test_network_defaults_never_override_the_dsn() -> None:
    from txmgr.participant import NETWORK_DEFAULTS, network_defaults

    assert network_defaults("host=h dbname=d") == NETWORK_DEFAULTS
    mine = network_defaults("postgresql://u@h/d?keepalives_idle=60&tcp_user_timeout=0")
    assert "keepalives_idle" not in mine and "tcp_user_timeout" not in mine
    assert mine["keepalives"] == 1


def test_registrations_ahead_expire_well_within_the_recovery_grace() -> None:
    def paxos_log() -> txmgr.PaxosLog:
        return txmgr.PaxosLog([f"postgresql://x@127.0.0.1:1/{n}" for n in "abc"])

    dsns = {"a": "postgresql://x@127.0.0.1:1/a", "b": "postgresql://x@127.0.0.1:1/b"}
    for idle, expected in ((8.0, 2.0), (60.0, 5.0)):  # a quarter of it, at most the default
        log = paxos_log()
        tm = txmgr.TransactionManager(dsns, log=log, log_idle_timeout=idle, pool_min_size=0)
        try:
            assert log.ahead_max_age == expected
        finally:
            tm.close()
