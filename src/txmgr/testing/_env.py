"""Servers configured through the environment instead of started by the harness."""

from __future__ import annotations

import os
from itertools import cycle, islice

from ._admin import Server
from ._server import ExternalServer

__all__ = ["DSNS_ENV_VAR", "servers_from_env"]

DSNS_ENV_VAR = "TXMGR_TEST_DSNS"


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
