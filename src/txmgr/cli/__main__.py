"""``python -m txmgr.cli``: the same as the ``txmgr`` command."""

from txmgr.cli import main

main()
