"""The torture bench: servers, the bank's databases, the decision log, the
fault proxies, and the configuration files of the clients and the daemons.

Every server gets a login role whose password is the run's secret marker;
the clients and daemons connect as that role through the proxies (the
participants with URL DSNs, a dedicated log with a key/value DSN, so both
forms are masked), the checker connects as it directly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from psycopg import sql
from psycopg.conninfo import make_conninfo

from txmgr._migrate import migrate
from txmgr.config import Config
from txmgr.testing import PgServer
from txmgr.testing.proxy import FaultProxy
from txmgr.torture._client import ClientSpec
from txmgr.torture._report import TortureOptions
from txmgr.torture._workload import create_role, create_schema

__all__ = ["Bench", "build_bench"]

ROLE = "torture"
BANK_DB = "bank"
LOG_DB = "txlog"


@dataclass
class Bench:
    names: list[str]  # participant names, bank1 …
    servers: list[PgServer]  # the participants' servers, then a dedicated log's
    log_server: PgServer
    proxies: list[FaultProxy]  # one per server, same order
    log_proxy: FaultProxy
    direct: dict[str, str]  # participant -> DSN, no proxy
    log_direct: str  # the log database's DSN, no proxy
    direct_config: Config  # for the final recovery
    client_spec: Path
    daemon_config: Path
    dedicated: bool

    @property
    def bank_servers(self) -> list[PgServer]:
        return self.servers[: len(self.names)]

    @property
    def prepare_proxies(self) -> list[FaultProxy]:
        # The log participant's own branch commits in one phase: it never sees
        # a PREPARE TRANSACTION or a COMMIT PREPARED.
        start = 0 if self.dedicated else 1
        return self.proxies[start: len(self.names)]

    def server_dsns(self, secret: str) -> dict[str, str]:
        """A DSN per server (any database will do for pg_prepared_xacts)."""
        return {f"server{i}": s.dsn(user=ROLE, password=secret)
                for i, s in enumerate(self.servers)}


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


def _url(port: int, password: str, dbname: str, options: str) -> str:
    return (f"postgresql://{ROLE}:{quote(password, safe='')}@127.0.0.1:{port}/{dbname}"
            f"?options={quote(options, safe='')}&application_name=torture")


def _toml(config: Mapping[str, Mapping[str, object]]) -> str:
    out = []  # JSON strings and numbers are valid TOML values
    for table, values in config.items():
        out.append(f"[{table}]")
        out += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(out) + "\n"


def build_bench(options: TortureOptions, secret: str, workdir: Path, stack: ExitStack) -> Bench:
    """Start and fill everything; ``stack`` destroys it again."""
    names = [f"bank{i + 1}" for i in range(options.participants)]
    dedicated = options.log == "dedicated"
    servers = _start_servers(len(names) + (1 if dedicated else 0), stack)
    log_server = servers[-1] if dedicated else servers[0]
    for server in servers:
        create_role(server.admin_dsn, ROLE, secret)
    direct: dict[str, str] = {}
    for name, server in zip(names, servers, strict=False):
        _create_database(server, BANK_DB)
        direct[name] = server.dsn(BANK_DB, user=ROLE, password=secret)
        create_schema(direct[name], options.accounts)
    if dedicated:
        _create_database(log_server, LOG_DB)
        log_direct = log_server.dsn(LOG_DB, user=ROLE, password=secret)
    else:
        log_direct = direct[names[0]]
    migrate(log_direct)

    proxies = [stack.enter_context(FaultProxy("127.0.0.1", s.port)) for s in servers]
    log_proxy = proxies[-1] if dedicated else proxies[0]
    pg_options = f"-c lock_timeout={options.lock_timeout_ms}"
    via_proxy = {name: _url(proxies[i].port, secret, BANK_DB, pg_options)
                 for i, name in enumerate(names)}
    log_setting = make_conninfo(
        "", host="127.0.0.1", port=log_proxy.port, user=ROLE, password=secret, dbname=LOG_DB,
    ) if dedicated else names[0]  # fmt: skip
    spec: ClientSpec = {
        "participants": via_proxy, "log": log_setting, "accounts": options.accounts,
        "log_idle_timeout": options.log_idle_timeout, "connect_timeout": 3.0,
    }  # fmt: skip
    client_spec = workdir / "client.json"
    client_spec.write_text(json.dumps(spec))
    daemon_config = workdir / "daemon.toml"
    daemon_config.write_text(_toml({
        "log": {"dsn": log_setting, "idle_timeout": options.log_idle_timeout}
        if dedicated else {"participant": log_setting},
        "participants": via_proxy,
        "pool": {"connect_timeout": 3},
        "recovery": {"interval": options.daemon_interval},
    }))  # fmt: skip
    return Bench(
        names=names,
        servers=servers,
        log_server=log_server,
        proxies=proxies,
        log_proxy=log_proxy,
        direct=direct,
        log_direct=log_direct,
        direct_config=Config(participants=direct, log=log_direct if dedicated else names[0],
                             connect_timeout=5),
        client_spec=client_spec,
        daemon_config=daemon_config,
        dedicated=dedicated,
    )
