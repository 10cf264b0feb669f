"""``python -m txmgr.torture``: the same as ``txmgr torture``."""

from __future__ import annotations

import sys

from txmgr.torture._cli import torture_main

if __name__ == "__main__":
    sys.exit(torture_main())
