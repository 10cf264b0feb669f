"""How the harness gets its servers, as chosen through the environment.

- ``TXMGR_TEST_DSNS``: comma-separated admin DSNs of servers that already run
  (:func:`servers_from_env`); it wins over the backend below.
- ``TXMGR_TEST_BACKEND``: ``local`` (the default: :class:`~txmgr.testing.PgServer`
  processes) or ``docker`` (containers through testcontainers, see
  :mod:`txmgr.testing.containers`). ``TXMGR_TEST_DOCKER=1`` is an older spelling of
  ``TXMGR_TEST_BACKEND=docker``.
"""

from __future__ import annotations

import os
from itertools import cycle, islice
from typing import Literal

from ._admin import Server
from ._errors import PgServerError
from ._server import ExternalServer

__all__ = [
    "BACKENDS",
    "BACKEND_ENV_VAR",
    "DOCKER_ENV_VAR",
    "DSNS_ENV_VAR",
    "Backend",
    "server_backend",
    "servers_from_env",
]

DSNS_ENV_VAR = "TXMGR_TEST_DSNS"
BACKEND_ENV_VAR = "TXMGR_TEST_BACKEND"
DOCKER_ENV_VAR = "TXMGR_TEST_DOCKER"  # the alias: TXMGR_TEST_DOCKER=1 means docker

Backend = Literal["local", "docker"]
BACKENDS: tuple[Backend, ...] = ("local", "docker")

_TRUE = ("1", "true", "yes", "on")


def servers_from_env(count: int) -> list[Server] | None:
    """``count`` servers from ``$TXMGR_TEST_DSNS`` (comma-separated admin DSNs), or None.

    With fewer DSNs than ``count`` the DSNs are reused in turn, so tests that want two
    servers also run against one (they then get two databases on the same server).
    """
    value = os.environ.get(DSNS_ENV_VAR, "")
    dsns = [dsn.strip() for dsn in value.split(",") if dsn.strip()]
    if not dsns:
        return None
    return [ExternalServer(dsn) for dsn in islice(cycle(dsns), count)]


def server_backend() -> Backend:
    """Where the harness starts servers: ``$TXMGR_TEST_BACKEND``, else ``local``.

    Raises :class:`PgServerError` for a value it does not know.
    """
    value = os.environ.get(BACKEND_ENV_VAR, "").strip().lower()
    if not value:
        docker = os.environ.get(DOCKER_ENV_VAR, "").strip().lower() in _TRUE
        return "docker" if docker else "local"
    for backend in BACKENDS:
        if value == backend:
            return backend
    raise PgServerError(
        f"{BACKEND_ENV_VAR}={value!r} is not a test backend: use one of "
        f"{', '.join(BACKENDS)} (or unset it for local servers)"
    )
