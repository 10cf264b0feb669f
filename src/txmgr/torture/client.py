"""Entry point of a torture client process: ``python -m txmgr.torture.client``.

See :mod:`txmgr.torture._client`.
"""

from __future__ import annotations

import sys

from txmgr.torture._client import main

if __name__ == "__main__":
    sys.exit(main())
