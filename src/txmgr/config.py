"""Settings shared by the library, the CLI and the daemon, read from TOML.

A file looks like::

    [log]
    dsn = "postgresql://txmgr@db0/txlog"   # or: participant = "orders"
    idle_timeout = 60                       # seconds; see LogSettings

    # or, Paxos mode: a majority of 3 (5, 7, 9) log databases decides
    # [log]
    # mode = "paxos"
    # dsns = ["postgresql://txmgr@db0/txlog", "postgresql://txmgr@db1/txlog", …]

    [participants]
    orders = "postgresql://app@db1/orders"
    billing = "postgresql://app@db2/billing"

    [pool]
    min_size = 1
    max_size = 10
    prepare_threshold = 5                   # or "off"; always off through a pooler

    [recovery]
    interval = 10

    [transaction]
    timeout = 30        # seconds from tm.transaction() to the decision; default: none

    [deadlock]
    interval = 1        # seconds between the daemon's deadlock-detector passes

    [metrics]
    port = 9187
    address = "127.0.0.1"

Unknown tables and keys are errors, so a typo never silently means "default".
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import psycopg.conninfo

from txmgr._dsn import mask
from txmgr._gid import check_participant_name
from txmgr._pooler import DEFAULT_PREPARE_THRESHOLD
from txmgr.errors import ConfigError
from txmgr.paxos._log import PaxosLog

__all__ = ["CONFIG_ENV", "Config", "resolve_config_path"]

CONFIG_ENV = "TXMGR_CONFIG"


@dataclass(frozen=True, slots=True)
class Config:
    """Everything txmgr needs to know; build it directly or with :meth:`from_file`.

    ``log`` is either a DSN of a dedicated log database, the name of a
    participant that keeps the log tables in its own database, or a
    :class:`txmgr.PaxosLog` (Paxos mode: a majority of several log databases
    decides each transaction).
    """

    participants: Mapping[str, str]
    log: str | PaxosLog
    #: idle_in_transaction_session_timeout of the decision transaction, seconds:
    #: a coordinator that hangs this long inside the protocol is aborted by the
    #: log server itself, so recovery never waits on it forever.
    log_idle_timeout: float = 60.0
    pool_min_size: int = 1
    pool_max_size: int = 10
    connect_timeout: float = 10.0
    #: Seconds a commit's protocol step (vote, PREPARE, decision, COMMIT
    #: PREPARED) waits for a server's answer before it closes that connection
    #: and goes on as if the network had cut it; None (the default) waits as
    #: long as the connection lives. For servers that freeze while their host
    #: still acknowledges TCP, which no keepalive notices. Off by default: a
    #: PREPARE or COMMIT running long deferred triggers is not a dead server.
    step_timeout: float | None = None
    #: psycopg's ``prepare_threshold`` for txmgr's long-lived connections (pools,
    #: recovery): executions before a query is prepared on the server; None:
    #: never. Whatever it says, a connection found to go through a pooler
    #: (PgBouncer) never prepares anything (see :mod:`txmgr._pooler`): a pooled
    #: server session would run one client's statement for another.
    prepare_threshold: int | None = DEFAULT_PREPARE_THRESHOLD
    recovery_interval: float = 10.0
    #: Default deadline of a global transaction, seconds from ``tm.transaction()``
    #: to its decision (``tm.transaction(timeout=…)`` overrides it); None: no deadline.
    transaction_timeout: float | None = None
    #: Seconds between two passes of the daemon's distributed deadlock detector.
    deadlock_interval: float = 1.0
    metrics_port: int | None = None
    metrics_address: str = "127.0.0.1"
    source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.participants:
            raise ConfigError(
                "no participants configured: add a [participants] table of name = \"dsn\" "
                "(or pass participants={...})"
            )
        for name, dsn in self.participants.items():
            check_participant_name(name)
            if not isinstance(dsn, str) or not dsn.strip():
                raise ConfigError(f"participant {name!r}: the DSN must be a non-empty string")
            _check_dsn(name, dsn)
        if isinstance(self.log, PaxosLog):
            pass  # checked by its own constructor
        elif not isinstance(self.log, str) or not self.log.strip():
            raise ConfigError(
                "no decision log configured: set [log] dsn = \"postgresql://…\" or "
                "[log] participant = \"<participant name>\""
            )
        elif self.log not in self.participants and not _looks_like_dsn(self.log):
            raise ConfigError(
                f"log {mask(self.log)!r} is neither a configured participant nor a DSN: give "
                "a connection string such as 'postgresql://user@host/txlog' or one of "
                f"{sorted(self.participants)}"
            )
        elif self.log not in self.participants:
            _check_dsn("log", self.log)
        _positive("log idle_timeout", self.log_idle_timeout)
        _positive("connect_timeout", self.connect_timeout)
        if self.step_timeout is not None:
            _positive("step_timeout", self.step_timeout)
        _positive("recovery interval", self.recovery_interval)
        if self.prepare_threshold is not None and (
            isinstance(self.prepare_threshold, bool) or not isinstance(self.prepare_threshold, int)
            or self.prepare_threshold < 0
        ):
            raise ConfigError(
                f"prepare_threshold = {self.prepare_threshold!r}: give a whole number >= 0 "
                "(executions before psycopg prepares a query on the server) or \"off\" "
                "(never; what a connection through a pooler always gets)"
            )
        if self.transaction_timeout is not None:
            _positive("[transaction] timeout", self.transaction_timeout)
        _positive("[deadlock] interval", self.deadlock_interval)
        if self.pool_min_size < 0 or self.pool_max_size < max(1, self.pool_min_size):
            raise ConfigError(
                f"pool sizes min_size={self.pool_min_size}, max_size={self.pool_max_size}: "
                "need 0 <= min_size <= max_size and max_size >= 1"
            )

    def __repr__(self) -> str:
        # The generated repr would show every DSN with its password (in a
        # traceback's locals, a debug log line, an error report).
        shown: dict[str, object] = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["participants"] = {name: mask(dsn) for name, dsn in self.participants.items()}
        shown["log"] = self.log if isinstance(self.log, PaxosLog) else mask(self.log)
        return f"Config({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    @property
    def paxos_log(self) -> PaxosLog | None:
        """The Paxos decision log, or None in the default mode (one log database)."""
        return self.log if isinstance(self.log, PaxosLog) else None

    @property
    def log_participant(self) -> str | None:
        """The participant holding the log tables, or None for a dedicated log database
        (and in Paxos mode)."""
        if isinstance(self.log, PaxosLog):
            return None
        return self.log if self.log in self.participants else None

    @property
    def log_dsn(self) -> str:
        """DSN of the database holding the decision log (not in Paxos mode: ConfigError)."""
        if isinstance(self.log, PaxosLog):
            raise ConfigError(
                "this configuration uses a Paxos log (several log databases): there is no "
                "single decision log DSN; use config.paxos_log"
            )
        return self.participants.get(self.log, self.log)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Config:
        """Read a TOML configuration file (see the module docstring for its tables)."""
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"configuration file {str(p)!r} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"configuration file {str(p)!r} is not valid TOML: {e}") from None
        return cls.from_mapping(data, source=str(p))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str | None = None) -> Config:
        """Build a Config from parsed TOML data."""
        where = f" in {source}" if source else ""
        _only(data, {"log", "participants", "pool", "recovery", "metrics", "transaction",
                     "deadlock"}, "top level", where)
        log = _table(data, "log", where)
        _only(log, {"dsn", "participant", "idle_timeout", "mode", "dsns"}, "[log]", where)
        mode = log.get("mode", "single")
        if mode not in ("single", "paxos"):
            raise ConfigError(
                f"[log] mode = {mode!r}{where}: choose \"single\" (the default: one log "
                "database) or \"paxos\" (dsns = [...]: a majority of several decides)"
            )
        if mode == "paxos":
            if "dsn" in log or "participant" in log or "dsns" not in log:
                raise ConfigError(
                    f"[log] mode = \"paxos\"{where} needs dsns = [\"postgresql://…\", …] (an "
                    "odd number of log databases, 3 to 9) and neither dsn nor participant"
                )
            if not isinstance(log["dsns"], list):
                raise ConfigError(f"[log] dsns{where} must be a list of DSN strings")
        elif "dsns" in log:
            raise ConfigError(
                f"[log] dsns{where} is for Paxos mode: add mode = \"paxos\", or give one "
                "dsn = \"postgresql://…\""
            )
        elif ("dsn" in log) == ("participant" in log):
            raise ConfigError(
                f"[log]{where} needs exactly one of dsn = \"postgresql://…\" (a dedicated log "
                "database) or participant = \"name\" (keep the log inside that participant)"
            )
        participants = _table(data, "participants", where)
        if "participant" in log and log["participant"] not in participants:
            raise ConfigError(
                f"[log] participant = {log['participant']!r}{where} is not in [participants]; "
                f"choose one of {sorted(participants)}"
            )
        pool = _table(data, "pool", where, required=False)
        _only(pool, {"min_size", "max_size", "connect_timeout", "step_timeout",
                     "prepare_threshold"}, "[pool]", where)
        recovery = _table(data, "recovery", where, required=False)
        _only(recovery, {"interval"}, "[recovery]", where)
        metrics = _table(data, "metrics", where, required=False)
        _only(metrics, {"port", "address"}, "[metrics]", where)
        transaction = _table(data, "transaction", where, required=False)
        _only(transaction, {"timeout"}, "[transaction]", where)
        deadlock = _table(data, "deadlock", where, required=False)
        _only(deadlock, {"interval"}, "[deadlock]", where)
        try:
            connect_timeout = float(pool.get("connect_timeout", 10.0))
            threshold = _prepare_threshold(pool, where)
            log_value: str | PaxosLog = (
                PaxosLog(log["dsns"], connect_timeout=connect_timeout,
                         prepare_threshold=threshold)
                if mode == "paxos" else log.get("dsn") or log["participant"]
            )
            return cls(
                participants=dict(participants),
                log=log_value,
                log_idle_timeout=float(log.get("idle_timeout", 60.0)),
                pool_min_size=int(pool.get("min_size", 1)),
                pool_max_size=int(pool.get("max_size", 10)),
                connect_timeout=connect_timeout,
                step_timeout=(float(pool["step_timeout"]) if "step_timeout" in pool
                              else None),
                prepare_threshold=threshold,
                recovery_interval=float(recovery.get("interval", 10.0)),
                transaction_timeout=(float(transaction["timeout"]) if "timeout" in transaction
                                     else None),
                deadlock_interval=float(deadlock.get("interval", 1.0)),
                metrics_port=int(metrics["port"]) if "port" in metrics else None,
                metrics_address=str(metrics.get("address", "127.0.0.1")),
                source=source,
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"invalid value{where}: {e}") from None


def resolve_config_path(path: str | None) -> str:
    """The config file to use: ``path``, else $TXMGR_CONFIG, else a clear error."""
    if path:
        return path
    env = os.environ.get(CONFIG_ENV)
    if env:
        return env
    raise ConfigError(f"no configuration file: pass --config FILE or set {CONFIG_ENV}")


def _check_dsn(name: str, dsn: str) -> None:
    """Reject an unparsable DSN now, without quoting libpq (it may quote the password)."""
    try:
        psycopg.conninfo.conninfo_to_dict(dsn)
    except (psycopg.ProgrammingError, psycopg.OperationalError):
        raise ConfigError(
            f"invalid connection string for {name!r}: {mask(dsn)}; check its syntax (in a "
            "URL, percent-encode special characters of the password, e.g. % as %25)"
        ) from None


def _prepare_threshold(pool: Mapping[str, Any], where: str) -> int | None:
    value = pool.get("prepare_threshold", DEFAULT_PREPARE_THRESHOLD)
    if value == "off":
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"[pool] prepare_threshold = {value!r}{where}: give a whole number >= 0 or \"off\""
        )
    return value


def _looks_like_dsn(text: str) -> bool:
    return "://" in text or "=" in text


def _positive(what: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{what} must be a positive number of seconds, got {value!r}")


def _table(
    data: Mapping[str, Any], name: str, where: str, *, required: bool = True
) -> Mapping[str, Any]:
    value = data.get(name)
    if value is None:
        if required:
            raise ConfigError(f"missing [{name}] table{where}")
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"[{name}]{where} must be a table")
    return value


def _only(table: Mapping[str, Any], allowed: set[str], what: str, where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in {what}{where}; allowed: {sorted(allowed)}"
        )
