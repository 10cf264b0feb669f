"""PostgreSQL servers in Docker containers (testcontainers), for machines with Docker.

The local-process harness (:class:`txmgr.testing.PgServer`) is the default; set
``TXMGR_TEST_BACKEND=docker`` (or the older ``TXMGR_TEST_DOCKER=1``) to make the
pytest fixtures start containers instead, or use :class:`ContainerServer`
directly. Both need the ``testcontainers`` package (``pip install 'txmgr[test]'``)
and a Docker engine that answers: where none does, the fixtures skip the tests
that need servers and say why (:func:`docker_unavailable_reason`).

Containers cannot be crashed the way the crash tests crash a local server, so the
``crash_server`` fixture skips under this backend.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Self

from ._env import DOCKER_ENV_VAR
from ._server import ExternalServer

__all__ = [
    "DEFAULT_IMAGE",
    "DOCKER_ENV_VAR",
    "ContainerServer",
    "docker_available",
    "docker_unavailable_reason",
]

#: The image :class:`ContainerServer` runs unless told otherwise.
DEFAULT_IMAGE = "postgres:16-alpine"


def docker_unavailable_reason() -> str | None:
    """Why containers cannot be started here, or None when a Docker engine answers."""
    try:
        _postgres_container_class()
    except ImportError as e:
        return str(e)
    try:
        import docker  # type: ignore[import-untyped]
    except ImportError:
        return "the docker package is not installed: pip install 'txmgr[test]'"
    where = os.environ.get("DOCKER_HOST") or "the default socket"
    try:
        client = docker.from_env(timeout=3)
        try:
            if client.ping():
                return None
            return f"the Docker engine at {where} does not answer ping"
        finally:
            client.close()
    except Exception as e:  # no socket, no permission, engine down: all mean "no"
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"no Docker engine answers at {where} ({first_line[:200]})"


def docker_available() -> bool:
    """True when the Docker engine answers (a client alone is not enough)."""
    return docker_unavailable_reason() is None


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
        """Start the container and wait until PostgreSQL accepts connections."""
        self._container.start()
        self._started = True
        host = self._container.get_container_host_ip()
        port = self._container.get_exposed_port(5432)
        super().__init__(f"postgresql://postgres:txmgr@{host}:{port}/postgres")
        return self

    def destroy(self) -> None:
        """Stop and remove the container (and so every database in it)."""
        if self._started:
            self._started = False
            self._container.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.destroy()
