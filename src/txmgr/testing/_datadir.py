"""Where the harness puts a throwaway server's files: the one rule every server uses.

A test server's data is disposable, and its cost is file-system work: every
``CREATE DATABASE`` copies its template's files and every ``DROP DATABASE``
removes them, hundreds of times a suite. On a journaled disk file system that work
is mostly kernel time (measured on the development VM, ext4: 0.31 s per create and
drop of a migrated log database; on tmpfs: 0.037 s). So the data goes to a RAM file
system when one with room is there, as ``/dev/shm`` is on most Linux machines.
A crash test kills servers, never the machine, so RAM keeps everything it needs:
what a killed server left in its WAL is still there when it restarts.
"""

from __future__ import annotations

import os
from pathlib import Path

from ._errors import PgServerError
from ._runas import RunAs, temp_parent, world_traversable

__all__ = ["DATA_DIR_ENV", "RAM_DIR", "RAM_MIN_FREE", "data_parent"]

DATA_DIR_ENV = "TXMGR_TEST_DATA_DIR"
RAM_DIR = Path("/dev/shm")
# A server takes about 40 MB and each test database 8 MB; a session of the suite
# runs a few dozen servers. Below this, the default temporary directory is safer
# than a RAM file system that fills up (a small container's /dev/shm is 64 MB).
RAM_MIN_FREE = 2 << 30


def data_parent(user: RunAs | None, *, ram: bool = True) -> str | None:
    """The directory for a server's ``mkdtemp`` (None: the temporary directory).

    ``TXMGR_TEST_DATA_DIR`` when set; else, unless ``ram`` is false (a benchmark
    whose commits must reach a disk), :data:`RAM_DIR` when it is a writable
    directory with :data:`RAM_MIN_FREE` bytes free (that ``user``, the server's,
    can reach when there is one); else :func:`temp_parent`.
    """
    shared = user is not None
    chosen = os.environ.get(DATA_DIR_ENV, "").strip()
    if chosen:
        path = Path(chosen)
        if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
            raise PgServerError(
                f"{DATA_DIR_ENV}={chosen!r} is not a writable directory; "
                "set it to one, or unset it to let the harness choose"
            )
        if shared and not world_traversable(path):
            raise PgServerError(
                f"{DATA_DIR_ENV}={chosen!r} is not reachable by the server's user; "
                "choose a directory every user can traverse (such as /tmp)"
            )
        return str(path)
    return str(RAM_DIR) if ram and _ram_usable(shared=shared) else temp_parent(user)


def _ram_usable(*, shared: bool) -> bool:
    try:
        if not RAM_DIR.is_dir() or not os.access(RAM_DIR, os.W_OK | os.X_OK):
            return False
        if shared and not world_traversable(RAM_DIR):
            return False
        free = os.statvfs(RAM_DIR)
        return free.f_bavail * free.f_frsize >= RAM_MIN_FREE
    except OSError:
        return False

