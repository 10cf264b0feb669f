"""Run PostgreSQL programs as an unprivileged OS user.

initdb, pg_ctl and postgres refuse to run as root, so when the harness runs as root it
delegates to the ``postgres`` user (or a ``txmgr-pg`` system user it creates).
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ._errors import PgServerError

__all__ = ["RunAs", "chown_tree", "clean_env", "run", "server_user", "temp_parent",
           "world_traversable"]

_FALLBACK_USER = "txmgr-pg"
_lock = threading.Lock()
_cached: RunAs | None = None


@dataclass(frozen=True)
class RunAs:
    name: str
    uid: int
    gid: int


def _lookup(name: str) -> RunAs | None:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return RunAs(name, entry.pw_uid, entry.pw_gid)


def server_user() -> RunAs | None:
    """The user to run the server as, or None to run as the current (non-root) user."""
    global _cached
    if os.geteuid() != 0:
        return None
    # Servers start from several threads at once: only one of them may run useradd.
    with _lock:
        if _cached is None:
            _cached = _lookup("postgres") or _lookup(_FALLBACK_USER) or _create_user()
        return _cached


def _create_user() -> RunAs:
    useradd = shutil.which("useradd")
    hint = (
        "PostgreSQL refuses to run as root. Create an unprivileged 'postgres' user "
        "or run the tests as a non-root user."
    )
    if useradd is None:
        raise PgServerError(f"useradd not found, cannot create user {_FALLBACK_USER!r}. {hint}")
    proc = subprocess.run(
        [useradd, "--system", "--no-create-home", "--user-group", _FALLBACK_USER],
        capture_output=True,
        text=True,
        check=False,
    )
    # Another process may have created the user concurrently; only its absence matters.
    found = _lookup(_FALLBACK_USER)
    if found is None:
        raise PgServerError(f"could not create user {_FALLBACK_USER!r}: {proc.stderr}. {hint}")
    return found


def world_traversable(path: Path) -> bool:
    return all(p.stat().st_mode & stat.S_IXOTH for p in (path, *path.parents))


def reachable_bin_dir(bin_dir: Path, user: RunAs | None) -> Path:
    """``bin_dir``, or a world-readable copy of its installation when ``user`` cannot reach it.

    The binaries bundled by the ``pgserver`` package live in site-packages,
    which is often inside root's private home: running them as an unprivileged
    user fails. The installation (bin/, lib/, share/ beside each other; the
    binaries locate the rest relative to themselves) is copied once into the
    temporary directory and reused.
    """
    if user is None or world_traversable(bin_dir):
        return bin_dir
    root = bin_dir.resolve().parent
    # Wheels keep shared libraries in "<package>.libs" beside the package and
    # find them through an RPATH relative to bin/: copy both, same layout.
    libs = root.parent.parent / f"{root.parent.name}.libs"
    stamp = hashlib.sha256(f"{root}:{root.stat().st_mtime_ns}".encode()).hexdigest()[:12]
    parent = Path(temp_parent(user) or tempfile.gettempdir())
    target = parent / f"txmgr-pginstall-{stamp}"
    new_bin = target / root.parent.name / root.name / "bin"
    if not (new_bin / "initdb").exists():
        staging = Path(tempfile.mkdtemp(prefix="txmgr-pginstall-", dir=parent))
        copy = staging / "i"
        shutil.copytree(root, copy / root.parent.name / root.name, symlinks=True)
        if libs.is_dir():
            shutil.copytree(libs, copy / libs.name, symlinks=True)
        _open_to_all(staging)
        try:
            copy.rename(target)  # atomic: concurrent sessions agree on one copy
        except OSError:
            if not (new_bin / "initdb").exists():
                raise
        shutil.rmtree(staging, ignore_errors=True)
    return new_bin


def _open_to_all(top: Path) -> None:
    top.chmod(0o755)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in (*dirnames, *filenames):
            p = Path(dirpath, name)
            if p.is_symlink():
                continue
            mode = p.stat().st_mode
            executable = p.is_dir() or mode & stat.S_IXUSR
            p.chmod(mode | stat.S_IRGRP | stat.S_IROTH
                    | (stat.S_IXGRP | stat.S_IXOTH if executable else 0))


def temp_parent(user: RunAs | None) -> str | None:
    """Directory for mkdtemp; None means the default temporary directory.

    The server user must reach its data directory, which fails when TMPDIR lies under a
    private directory such as root's home.
    """
    if user is None:
        return None
    default = Path(tempfile.gettempdir())
    if world_traversable(default):
        return None
    if Path("/tmp").is_dir() and world_traversable(Path("/tmp")):
        return "/tmp"
    raise PgServerError(
        f"temporary directory {default} is not reachable by user {user.name!r}; "
        "set TMPDIR to a directory every user can traverse"
    )


def chown_tree(path: Path, user: RunAs | None) -> None:
    if user is None:
        return
    os.chown(path, user.uid, user.gid)
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            os.chown(os.path.join(root, name), user.uid, user.gid)


def clean_env() -> dict[str, str]:
    # PGDATA, PGPORT & co. would silently change what initdb/pg_ctl/postgres do.
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def run(
    args: Sequence[str | Path],
    user: RunAs | None,
    *,
    cwd: Path,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL program (as ``user`` if given) and capture its output."""
    try:
        if user is None:
            return subprocess.run(
                [str(a) for a in args],
                capture_output=True,
                text=True,
                cwd=cwd,
                env=clean_env(),
                timeout=timeout,
                check=False,
            )
        # user=/group=/extra_groups= switch identity in the child without preexec_fn,
        # which is unsafe with threads; extra_groups=[] drops root's supplementary groups.
        return subprocess.run(
            [str(a) for a in args],
            capture_output=True,
            text=True,
            cwd=cwd,
            env=clean_env(),
            timeout=timeout,
            check=False,
            user=user.uid,
            group=user.gid,
            extra_groups=[],
        )
    except PermissionError as exc:
        message = f"cannot execute {args[0]}: {exc}."
        if user is not None:
            message += (
                f" It runs as user {user.name!r}, so every directory above it must be "
                "traversable by that user (root's home is not): set TXMGR_PG_BIN to a "
                "system-wide PostgreSQL installation."
            )
        raise PgServerError(message) from exc
