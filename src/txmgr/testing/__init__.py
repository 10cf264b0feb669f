"""Throwaway PostgreSQL servers for txmgr's tests and for yours.

With pytest, the ``txmgr`` plugin (registered automatically when txmgr is installed, or
enabled with ``-p txmgr.testing.pytest_plugin``) provides these fixtures:

* ``pg_servers`` (session): two servers; ``pg_server`` (session): the first of them.
* ``make_database`` (function): ``make_database(server=None) -> dsn`` creates a fresh
  database, dropped (after rolling back its prepared transactions) when the test ends.
* ``crash_server`` (function): a private :class:`PgServer` the test may ``crash()`` and
  ``restart()``.

Servers are started from the PostgreSQL binaries found by :func:`find_pg_bin` (set
``TXMGR_PG_BIN`` to choose them). To use existing servers instead, set
``TXMGR_TEST_DSNS`` to comma-separated superuser DSNs; tests needing ``crash_server``
are then skipped.

Without pytest::

    from txmgr.testing import PgServer

    with PgServer(max_prepared_transactions=10) as server:
        dsn = server.create_database()
        ...  # connect to dsn with psycopg, txmgr, ...
        server.crash()
        server.restart()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._admin import Server
    from ._binaries import PgBinariesNotFound, find_pg_bin
    from ._env import servers_from_env
    from ._errors import PgServerError
    from ._pgbouncer import PgBouncer
    from ._server import ExternalServer, PgServer
    from .proxy import FaultProxy, Rule

__all__ = [
    "ExternalServer",
    "FaultProxy",
    "PgBinariesNotFound",
    "PgBouncer",
    "PgServer",
    "PgServerError",
    "Rule",
    "Server",
    "find_pg_bin",
    "servers_from_env",
]

# Imported on first use: the pytest plugin lives in this package and is loaded by every
# pytest run in an environment with txmgr installed, so importing this package must not
# pull in psycopg.
_LOCATIONS = {
    "ExternalServer": "._server",
    "FaultProxy": ".proxy",
    "PgBinariesNotFound": "._binaries",
    "PgBouncer": "._pgbouncer",
    "PgServer": "._server",
    "PgServerError": "._errors",
    "Rule": ".proxy",
    "Server": "._admin",
    "find_pg_bin": "._binaries",
    "servers_from_env": "._env",
}


def __getattr__(name: str) -> Any:
    module = _LOCATIONS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
