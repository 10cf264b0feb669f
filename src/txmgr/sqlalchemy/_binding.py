"""Pure checks between the application's SQLAlchemy configuration and txmgr's participants.

No I/O here, and nothing sync- or async-specific, so that every front end
(sessions, transaction blocks, an asyncio variant) validates the same way:

- :func:`participant_binds`: ``binds={Order: "orders"}`` / ``bind="orders"``
  name configured participants;
- :func:`engine_settings`: an application's own Engine points at the same
  database as the participant's DSN, and which of its options carry over to
  the Engine txmgr makes for that participant.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Collection, Mapping
from typing import Any

import psycopg
from sqlalchemy.engine import URL, Engine

from txmgr._dsn import mask
from txmgr.errors import ConfigError, UnknownParticipant

__all__ = [
    "IDENTITY_KEYS",
    "branch_url",
    "display_url",
    "engine_settings",
    "participant_binds",
    "url_params",
]

#: What must agree between an application's Engine URL and the participant DSN:
#: the server, the database and the role the branch runs as.
IDENTITY_KEYS = ("host", "port", "dbname", "user")

# libpq's defaults when neither side sets a key (see libpq "Environment Variables").
_ENV = {"host": "PGHOST", "port": "PGPORT", "dbname": "PGDATABASE", "user": "PGUSER"}

# Execution options that would change a running branch's transaction.
_REFUSED_EXECUTION_OPTIONS = {
    "isolation_level": "set default_transaction_isolation on the participant's role or "
                       "database (or in its DSN: options=-c default_transaction_isolation=…)",
    "postgresql_readonly": "a branch's transaction is already running",
    "postgresql_deferrable": "a branch's transaction is already running",
}


def _unknown(name: str, participants: Collection[str]) -> UnknownParticipant:
    return UnknownParticipant(
        f"unknown participant {name!r}: configured participants are {sorted(participants)}; "
        "add it to the TransactionManager's participants"
    )


def participant_binds(
    binds: Mapping[Any, object] | None, bind: object, participants: Collection[str]
) -> tuple[dict[Any, str], str | None]:
    """``binds`` and the default ``bind`` checked to name participants.

    Keys are whatever SQLAlchemy accepts in ``Session(binds=…)`` (mapped
    classes, mappers, tables, base classes); SQLAlchemy checks those.
    """
    checked: dict[Any, str] = {}
    for key, name in (binds or {}).items():
        checked[key] = _participant_name(name, f"binds[{key!r}]", participants)
    default = None if bind is None else _participant_name(bind, "bind", participants)
    return checked, default


def _participant_name(value: object, where: str, participants: Collection[str]) -> str:
    if not isinstance(value, str):
        raise ConfigError(
            f"{where} must be a participant name (one of {sorted(participants)}), not "
            f"{type(value).__name__}: txmgr makes the engines of its participants (pass your "
            "own engines as engines={name: engine})"
        )
    if value not in participants:
        raise _unknown(value, participants)
    return value


def _resolved(params: Mapping[str, str], key: str) -> str:
    """``key`` of libpq connection ``params``, with libpq's default when unset."""
    value = params.get(key) or os.environ.get(_ENV[key], "")
    if value:
        return value.lower() if key == "host" else value
    if key == "port":
        return "5432"
    if key == "user":
        return getpass.getuser()
    if key == "dbname":
        return _resolved(params, "user")
    return ""  # host: the default Unix-domain socket


def url_params(url: URL) -> dict[str, str]:
    """libpq connection parameters of a SQLAlchemy URL (as psycopg's dialect passes them)."""
    params = {k: ",".join(v) if isinstance(v, tuple) else str(v) for k, v in url.query.items()}
    for key, value in (("host", url.host), ("port", url.port), ("dbname", url.database),
                       ("user", url.username)):
        if value is not None:
            params[key] = str(value)
    return params


def engine_settings(name: str, engine: object, dsn: str) -> tuple[dict[str, Any], URL]:
    """The create_engine() options of the application's ``engine`` that carry over to
    the Engine txmgr makes for participant ``name``, and the URL naming it.

    Raises ConfigError when ``engine`` is not a PostgreSQL Engine, points at
    another server, database or role than the participant's DSN, or has
    settings that cannot apply to a connection txmgr made and whose
    transaction is already running.
    """
    if not isinstance(engine, Engine):
        raise ConfigError(
            f"engines[{name!r}] must be a sqlalchemy Engine (create_engine(…)), not "
            f"{type(engine).__name__}"
        )
    dialect = engine.dialect
    if dialect.name != "postgresql":
        raise ConfigError(
            f"engines[{name!r}] is a {dialect.name} Engine: txmgr participants are PostgreSQL "
            "databases"
        )
    _check_same_database(name, engine.url, dsn)
    _check_transferable(name, engine)
    options: dict[str, Any] = {
        "echo": engine.echo,
        "hide_parameters": engine.hide_parameters,
        "execution_options": dict(engine.get_execution_options()),
        "label_length": getattr(dialect, "label_length", None),
        "insertmanyvalues_page_size": dialect.insertmanyvalues_page_size,
        "use_insertmanyvalues": dialect.use_insertmanyvalues,
        "enable_from_linting": bool(getattr(dialect, "compiler_linting", 0)),
    }
    if dialect.driver == "psycopg":  # another driver's style would not suit psycopg
        options["paramstyle"] = dialect.paramstyle
    if engine.logging_name is not None:
        options["logging_name"] = engine.logging_name
    return options, display_url(url_params(engine.url))


def _check_same_database(name: str, url: URL, dsn: str) -> None:
    try:
        own = {k: str(v) for k, v in psycopg.conninfo.conninfo_to_dict(dsn).items()}
    except psycopg.Error as e:
        raise ConfigError(f"participant {name!r} has an invalid DSN {mask(dsn)}: {e}") from None
    theirs = url_params(url)
    differ = [
        f"{key} {_resolved(theirs, key)!r} (participant: {_resolved(own, key)!r})"
        for key in IDENTITY_KEYS
        if _resolved(theirs, key) != _resolved(own, key)
    ]
    if differ:
        raise ConfigError(
            f"engines[{name!r}] points elsewhere than participant {name!r}: "
            f"{', '.join(differ)}. txmgr writes through the participant's DSN "
            f"({mask(dsn)}); make the engine's URL name the same server, port, database and "
            "user"
        )
    # Other libpq settings in the URL (search_path through options, sslmode, …)
    # would not apply to txmgr's connections: they must be in the DSN as well.
    # Only names are shown: values may be secrets (sslpassword).
    other = sorted(
        key for key, value in theirs.items()
        if key not in IDENTITY_KEYS and key != "password" and own.get(key) != value
    )
    if other:
        raise ConfigError(
            f"engines[{name!r}] sets connection parameter(s) {other} that participant "
            f"{name!r}'s DSN does not set the same way; txmgr connects with the DSN: put them "
            "in the DSN, or remove them from the engine's URL"
        )


def _check_transferable(name: str, engine: Engine) -> None:
    dialect = engine.dialect
    # create_engine(isolation_level=…) is kept for each new connection.
    on_connect = getattr(dialect, "_on_connect_isolation_level", None)
    refused = (
        {"isolation_level": _REFUSED_EXECUTION_OPTIONS["isolation_level"]}
        if on_connect is not None else {}
    )
    refused.update(
        (key, why) for key, why in _REFUSED_EXECUTION_OPTIONS.items()
        if key in engine.get_execution_options()
    )
    for key, attribute in (("json_serializer", "_json_serializer"),
                           ("json_deserializer", "_json_deserializer"),
                           ("client_encoding", "client_encoding")):
        if getattr(dialect, attribute, None) is not None:
            refused[key] = (
                "psycopg applies it when SQLAlchemy makes a connection, and txmgr makes them"
                + ("; set client_encoding in the participant's DSN"
                   if key == "client_encoding" else "")
            )
    if refused:
        reasons = "; ".join(f"{key}: {why}" for key, why in sorted(refused.items()))
        raise ConfigError(
            f"engines[{name!r}] has setting(s) txmgr cannot apply to its branches: {reasons}"
        )


def branch_url(dsn: str) -> URL | None:
    """A URL naming the participant's database, for logs and repr() (see :func:`display_url`)."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return None
    return display_url({k: str(v) for k, v in params.items()})


def display_url(params: Mapping[str, str]) -> URL:
    """``postgresql://user@host:port/dbname`` of libpq ``params``: only what names the
    database, never a password or other settings (they could hold secrets)."""
    port = params.get("port", "")
    return URL.create(
        "postgresql",
        username=params.get("user") or None,
        host=params.get("host") or None,
        port=int(port) if port.isdigit() else None,
        database=params.get("dbname") or None,
    )
