"""The torture bench: servers, the bank's databases, the decision log, the
fault proxies, and the configuration files of the clients and the daemons.

Every server gets a login role whose password is the run's secret marker;
the clients and daemons connect as that role through the proxies (the
participants with URL DSNs, a dedicated log with a key/value DSN, so both
forms are masked), the checker connects as it directly.

In Paxos mode the decision log is three databases, each on a server of its
own behind a proxy of its own (:class:`~txmgr.torture._logdbs.LogDatabase`),
migrated by ``txmgr migrate --config`` with the daemons' configuration; the
first is named by a key/value DSN, the others by URLs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from psycopg import sql
from psycopg.conninfo import make_conninfo

from txmgr._migrate import migrate
from txmgr.config import Config
from txmgr.paxos import PaxosLog
from txmgr.testing import PgBouncer, PgServer
from txmgr.testing.proxy import FaultProxy
from txmgr.torture._client import ClientSpec
from txmgr.torture._failover import Replicated
from txmgr.torture._logdbs import LogDatabase
from txmgr.torture._procs import run_cli
from txmgr.torture._report import TortureOptions
from txmgr.torture._workload import create_role, create_schema

__all__ = ["Bench", "build_bench"]

ROLE = "torture"
BANK_DB = "bank"
LOG_DB = "txlog"
PAXOS_LOG_DATABASES = 3


@dataclass
class Bench:
    names: list[str]  # participant names, bank1 …
    servers: list[PgServer]  # the participants' servers, then the log's (1, or 3: Paxos)
    log_servers: list[PgServer]  # the log's servers (a participant's with the log inside)
    proxies: list[FaultProxy]  # one per server, same order
    log_proxies: list[FaultProxy]  # the proxies in front of the log databases
    direct: dict[str, str]  # participant -> DSN, no proxy
    log_directs: list[str]  # the log databases' DSNs, no proxy
    client_spec: Path
    daemon_config: Path
    mode: str  # TortureOptions.log
    log_idle_timeout: float
    paxos: list[LogDatabase]  # Paxos mode: the log databases; else empty
    # --standby: per server (same order), its standby and proxies; else empty
    replicas: list[Replicated] = field(default_factory=list)
    secret: str = ""
    replica_configs: list[Path] = field(default_factory=list)  # same order as replicas

    def follow_failovers(self) -> None:
        """After failovers: ``servers`` and the direct DSNs name the current primaries."""
        if not self.replicas:
            return
        self.servers[:] = [r.primary for r in self.replicas]
        self.log_servers[:] = self.servers[len(self.names):] or self.servers[:1]
        direct, log_directs = _direct_dsns(self.names, self.servers, self.log_servers,
                                           self.mode, self.secret)
        self.direct.update(direct)
        self.log_directs[:] = log_directs

    @property
    def bank_servers(self) -> list[PgServer]:
        return self.servers[: len(self.names)]

    @property
    def prepare_proxies(self) -> list[FaultProxy]:
        # The log participant's own branch commits in one phase: it never sees
        # a PREPARE TRANSACTION or a COMMIT PREPARED.
        start = 1 if self.mode == "participant" else 0
        return self.proxies[start: len(self.names)]

    def direct_config(self) -> Config:
        """The configuration of the final recovery: no proxy. In Paxos mode, close
        its ``paxos_log`` when done."""
        log: str | PaxosLog
        if self.mode == "paxos":
            log = PaxosLog(self.log_directs, connect_timeout=5)
        else:
            log = self.log_directs[0] if self.mode == "dedicated" else self.names[0]
        return Config(participants=self.direct, log=log, connect_timeout=5,
                      log_idle_timeout=self.log_idle_timeout)

    def server_dsns(self, secret: str) -> dict[str, str]:
        """A DSN per server (any database will do for pg_prepared_xacts)."""
        return {f"server{i}": s.dsn(user=ROLE, password=secret)
                for i, s in enumerate(self.servers)}


@dataclass
class _ViaProxy:
    """What a PgBouncer needs of its upstream: here a server's fault proxy."""

    port: int
    password: str
    host: str = "127.0.0.1"


def _start_bouncers(options: TortureOptions, servers: list[PgServer],
                    proxies: list[FaultProxy], secret: str, stack: ExitStack) -> list[int]:
    """A PgBouncer per server in front of its proxy (faults still hit the server
    side); their ports. In session mode each client connection holds a server
    connection, so a pool has room for every client's and daemon's."""
    if options.pooler == "none":
        return [p.port for p in proxies]
    bouncers = [stack.enter_context(PgBouncer(
        _ViaProxy(p.port, s.password), pool_mode=options.pooler, users={ROLE: secret},
        pool_size=100 if options.pooler == "session" else 20,
        # A fault that kills server connections must not leave a client waiting
        # for a server login forever (PgBouncer's default is 15 s).
        settings={"server_connect_timeout": "5", "server_login_retry": "1"},
    )) for s, p in zip(servers, proxies, strict=True)]
    return [b.port for b in bouncers]


def _direct_dsns(names: list[str], servers: list[PgServer], log_servers: list[PgServer],
                 mode: str, secret: str) -> tuple[dict[str, str], list[str]]:
    """The DSNs without a proxy: per participant its bank database; the log's
    databases (with the log inside a participant, that participant's)."""
    direct = {name: server.dsn(BANK_DB, user=ROLE, password=secret)
              for name, server in zip(names, servers, strict=False)}
    log_directs = ([direct[names[0]]] if mode == "participant" else
                   [s.dsn(LOG_DB, user=ROLE, password=secret) for s in log_servers])
    return direct, log_directs


def _start_servers(count: int, stack: ExitStack) -> list[PgServer]:
    servers = [PgServer(max_prepared_transactions=100) for _ in range(count)]
    for server in servers:
        stack.callback(server.destroy)
    with ThreadPoolExecutor(max_workers=count) as pool:  # initdb takes a while: overlap
        for future in [pool.submit(s.start) for s in servers]:
            future.result()
    return servers


def _create_database(server: PgServer, name: str) -> None:
    server.execute_admin(sql.SQL("CREATE DATABASE {} OWNER {}").format(
        sql.Identifier(name), sql.Identifier(ROLE)))


def _url(ports: list[int], password: str, dbname: str, options: str = "") -> str:
    """A URL DSN; with several ports a multi-host one that connects to the primary."""
    query = f"options={quote(options, safe='')}&" if options else ""
    if len(ports) > 1:
        query += "target_session_attrs=read-write&"
    hosts = ",".join(f"127.0.0.1:{p}" for p in ports)
    return (f"postgresql://{ROLE}:{quote(password, safe='')}@{hosts}/{dbname}"
            f"?{query}application_name=torture")


def _kv(ports: list[int], password: str, dbname: str) -> str:
    """A key/value DSN; with several ports a multi-host one, as :func:`_url`."""
    extra = {"target_session_attrs": "read-write"} if len(ports) > 1 else {}
    return make_conninfo("", host=",".join("127.0.0.1" for _ in ports),
                         port=",".join(str(p) for p in ports), user=ROLE, password=password,
                         dbname=dbname, **extra)


def _toml(config: Mapping[str, Mapping[str, object]]) -> str:
    out = []  # JSON strings and numbers are valid TOML values
    for table, values in config.items():
        out.append(f"[{table}]")
        out += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(out) + "\n"


def _cli_migrate(config: Path, out: Path) -> None:
    """``txmgr migrate --config``: every Paxos log database, through its proxy (the
    output joins the logs the secret scan reads)."""
    status = run_cli(["migrate"], config, out, timeout=300)
    if status != 0:
        raise RuntimeError(f"txmgr migrate failed (exit {status}): see {out}")


def build_bench(options: TortureOptions, secret: str, workdir: Path, stack: ExitStack) -> Bench:
    """Start and fill everything; ``stack`` destroys it again."""
    names = [f"bank{i + 1}" for i in range(options.participants)]
    logs = {"dedicated": 1, "participant": 0, "paxos": PAXOS_LOG_DATABASES}[options.log]
    servers = _start_servers(len(names) + logs, stack)
    log_servers = servers[len(names):] or servers[:1]
    for server in servers:
        create_role(server.admin_dsn, ROLE, secret)
    direct, log_directs = _direct_dsns(names, servers, log_servers, options.log, secret)
    for name, server in zip(names, servers, strict=False):
        _create_database(server, BANK_DB)
        create_schema(direct[name], options.accounts)
    if logs:
        for server in log_servers:
            _create_database(server, LOG_DB)
    if options.log != "paxos":
        migrate(log_directs[0])

    replicas: list[Replicated] = []
    if options.standby:  # after the databases and the role: the standbys clone them
        labels = [*names, "log"][:len(servers)]
        replicas = [Replicated.start(s, label, stack, workdir / "logs")
                    for s, label in zip(servers, labels, strict=True)]
        proxies = [r.front for r in replicas]
    else:
        proxies = [stack.enter_context(FaultProxy("127.0.0.1", s.port)) for s in servers]
    log_proxies = proxies[len(names):] or proxies[:1]
    # What clients and daemons reach: per server, one port, or the primary's and
    # the standby's proxies (a multi-host DSN).
    ports = ([[r.front.port, r.back.port] for r in replicas] if replicas else
             [[port] for port in _start_bouncers(options, servers, proxies, secret, stack)])
    log_ports = ports[len(names):] or ports[:1]
    # The hot workload's deadline bounds every wait (in-doubt locks included): a
    # lock_timeout would end deadlocks before the detector or the deadline could.
    lock_timeout_ms = 0 if options.workload == "hot" else options.lock_timeout_ms
    pg_options = f"-c lock_timeout={lock_timeout_ms}"
    if options.pooler != "none":
        # Stock PgBouncer refuses a startup `options`: the role's default instead.
        for server in servers:
            server.execute_admin(sql.SQL("ALTER ROLE {} SET lock_timeout = {}").format(
                sql.Identifier(ROLE), sql.Literal(lock_timeout_ms)))
        pg_options = ""
    via_proxy = {name: _url(ports[i], secret, BANK_DB, pg_options)
                 for i, name in enumerate(names)}
    log_setting: str | list[str]
    log_table: dict[str, object]
    if options.log == "paxos":
        log_setting = [_kv(p, secret, LOG_DB) if i == 0 else _url(p, secret, LOG_DB)
                       for i, p in enumerate(log_ports)]
        log_table = {"mode": "paxos", "dsns": log_setting,
                     "idle_timeout": options.log_idle_timeout}
    elif options.log == "dedicated":
        log_setting = _kv(log_ports[0], secret, LOG_DB)
        log_table = {"dsn": log_setting, "idle_timeout": options.log_idle_timeout}
    else:
        log_setting = names[0]
        log_table = {"participant": log_setting}
    spec: ClientSpec = {
        "participants": via_proxy, "log": log_setting, "accounts": options.accounts,
        "log_idle_timeout": options.log_idle_timeout, "connect_timeout": 3.0,
        "threads": options.threads or 1,
        "workload": options.workload, "deadline": options.deadline,
    }  # fmt: skip
    client_spec = workdir / "client.json"
    client_spec.write_text(json.dumps(spec))
    def daemon_toml(participants: dict[str, str], log: dict[str, object]) -> str:
        return _toml({
            "log": log,
            "participants": participants,
            "pool": {"connect_timeout": 3},
            "recovery": {"interval": options.daemon_interval},
            "deadlock": {"interval": options.deadlock_interval},
        })  # fmt: skip

    daemon_config = workdir / "daemon.toml"
    daemon_config.write_text(daemon_toml(via_proxy, log_table))
    # --standby: per server, the daemons' configuration with that server's DSN on
    # its standby alone (the stale_replica fault runs the CLI with it).
    replica_configs: list[Path] = []
    for i in range(len(replicas)):
        standby_only = [ports[i][1]]
        parts = {**via_proxy}
        log = dict(log_table)
        if i < len(names):
            parts[names[i]] = _url(standby_only, secret, BANK_DB, pg_options)
        else:
            log["dsn"] = _kv(standby_only, secret, LOG_DB)
        replica_configs.append(workdir / f"replica-{i}.toml")
        replica_configs[-1].write_text(daemon_toml(parts, log))
    if options.log == "paxos":
        _cli_migrate(daemon_config, workdir / "logs" / "cli-migrate.log")
    paxos = [LogDatabase(i, server, proxy, LOG_DB, ROLE, dsn) for i, (server, proxy, dsn)
             in enumerate(zip(log_servers, log_proxies, log_directs, strict=True))
             ] if options.log == "paxos" else []
    return Bench(
        names=names,
        servers=servers,
        log_servers=log_servers,
        proxies=proxies,
        log_proxies=log_proxies,
        direct=direct,
        log_directs=log_directs,
        client_spec=client_spec,
        daemon_config=daemon_config,
        mode=options.log,
        log_idle_timeout=options.log_idle_timeout,
        paxos=paxos,
        replicas=replicas,
        secret=secret,
        replica_configs=replica_configs,
    )
