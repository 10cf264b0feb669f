"""Locate the PostgreSQL server binaries (``initdb``, ``pg_ctl``, ``postgres``)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

__all__ = ["ENV_VAR", "PgBinariesNotFound", "find_pg_bin"]

ENV_VAR = "TXMGR_PG_BIN"
_REQUIRED = ("initdb", "pg_ctl", "postgres")
# Debian/Ubuntu install each major version side by side under this root.
_DEBIAN_ROOT = Path("/usr/lib/postgresql")

_HOW_TO_FIX = (
    "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found. Fix it by one of:\n"
    "  * installing the PostgreSQL server package (e.g. `apt-get install postgresql`,\n"
    "    `dnf install postgresql-server` or `brew install postgresql`);\n"
    f"  * setting {ENV_VAR} to the directory that holds initdb, pg_ctl and postgres;\n"
    "  * `pip install 'txmgr[embedded]'`, which bundles the binaries via pgserver."
)


class PgBinariesNotFound(RuntimeError):
    """No usable PostgreSQL server binaries; the message says how to get some."""


def _has_binaries(directory: Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in _REQUIRED)


def _from_env() -> Path | None:
    value = os.environ.get(ENV_VAR)
    if not value:
        return None
    path = Path(value).expanduser()
    if not _has_binaries(path):
        # An explicit setting that is wrong must not silently fall back to another
        # installation: the user would test against a version they did not ask for.
        raise PgBinariesNotFound(
            f"{ENV_VAR}={value!r} does not contain executable {', '.join(_REQUIRED)}.\n"
            + _HOW_TO_FIX
        )
    return path


def _from_pg_config() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        out = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    # pg_config may come from a client-only package (libpq-dev) without the server.
    path = Path(out)
    return path if out and _has_binaries(path) else None


def _version_key(directory: Path) -> tuple[int, ...] | None:
    if not re.fullmatch(r"\d+(\.\d+)*", directory.name):
        return None
    return tuple(int(part) for part in directory.name.split("."))


def _from_debian_layout() -> Path | None:
    if not _DEBIAN_ROOT.is_dir():
        return None
    candidates: list[tuple[tuple[int, ...], Path]] = []
    for version_dir in _DEBIAN_ROOT.iterdir():
        key = _version_key(version_dir)
        if key is not None and _has_binaries(version_dir / "bin"):
            candidates.append((key, version_dir / "bin"))
    # Numeric, not lexical, order: "9.6" must sort below "15".
    return max(candidates)[1] if candidates else None


def _from_pgserver() -> Path | None:
    # find_spec on a top-level name locates the package without executing it;
    # importing pgserver itself has side effects (it sets up a data directory).
    try:
        spec = importlib.util.find_spec("pgserver")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "pginstall" / "bin"
        if _has_binaries(path):
            return path
    return None


def _finders() -> tuple[Callable[[], Path | None], ...]:
    # Looked up at call time so tests can monkeypatch the individual finders.
    return (_from_env, _from_pg_config, _from_debian_layout, _from_pgserver)


def find_pg_bin() -> Path:
    """Return the directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Search order: ``$TXMGR_PG_BIN``; ``pg_config --bindir``; the newest
    ``/usr/lib/postgresql/<version>/bin``; the binaries bundled with the ``pgserver``
    package. Raises :class:`PgBinariesNotFound` when none is usable.
    """
    for finder in _finders():
        found = finder()
        if found is not None:
            return found
    raise PgBinariesNotFound(_HOW_TO_FIX)
