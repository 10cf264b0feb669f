"""Run a module as a child that dies with the torture harness.

``python -m txmgr.torture._launch PARENT_PID MODULE ARG…`` asks Linux to
SIGKILL this process when the thread that started it ends (``PR_SET_PDEATHSIG``),
checks the parent is still ``PARENT_PID`` (it may have died before the
request), then runs ``MODULE`` as ``__main__``. Without it, a harness killed
by a CI timeout would leave clients hammering servers that no longer exist.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys

_PR_SET_PDEATHSIG = 1


def main() -> None:
    parent, module, *args = sys.argv[1:]
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != int(parent):
        sys.exit(0)  # the harness is gone already
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
