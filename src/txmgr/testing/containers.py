"""PostgreSQL servers in Docker containers (testcontainers), for machines with Docker.

The local-process harness (:class:`txmgr.testing.PgServer`) is the default;
set ``TXMGR_TEST_DOCKER=1`` to make the pytest fixtures start containers
instead, or use :class:`ContainerServer` directly. Both need the
``testcontainers`` package (``pip install 'txmgr[test]'``) and a reachable
Docker engine; :func:`docker_available` tells whether there is one.
"""

from __future__ import annotations

import importlib
from typing import Any, Self

from ._server import ExternalServer

__all__ = ["DOCKER_ENV_VAR", "ContainerServer", "docker_available"]

DOCKER_ENV_VAR = "TXMGR_TEST_DOCKER"
DEFAULT_IMAGE = "postgres:16-alpine"


def docker_available() -> bool:
    """True when the Docker engine answers (a client alone is not enough)."""
    try:
        import docker  # type: ignore[import-untyped]
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # no socket, no permission, engine down: all mean "no"
        return False


def _postgres_container_class() -> Any:
    for module in ("testcontainers.community.postgres", "testcontainers.postgres"):
        try:
            return importlib.import_module(module).PostgresContainer
        except ImportError:
            continue
    raise ImportError("testcontainers is not installed: pip install 'txmgr[test]'")


class ContainerServer(ExternalServer):
    """A throwaway PostgreSQL server in a container, with prepared transactions enabled."""

    def __init__(self, image: str = DEFAULT_IMAGE, *, max_prepared_transactions: int = 64) -> None:
        container_class = _postgres_container_class()
        self._container = container_class(image, username="postgres", password="txmgr",
                                          dbname="postgres", driver=None)
        self._container.with_command(
            f"postgres -c max_prepared_transactions={max_prepared_transactions} -c fsync=off"
        )
        self._started = False

    def start(self) -> Self:
        self._container.start()
        self._started = True
        host = self._container.get_container_host_ip()
        port = self._container.get_exposed_port(5432)
        super().__init__(f"postgresql://postgres:txmgr@{host}:{port}/postgres")
        return self

    def destroy(self) -> None:
        if self._started:
            self._started = False
            self._container.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.destroy()
