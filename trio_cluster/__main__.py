"""``python -m trio_cluster``: the same as the ``trio-cluster`` command."""

from __future__ import annotations

import sys

from ._cli._main import main

sys.exit(main())
