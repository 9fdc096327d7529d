"""The reliability suite: faults and load, each test stating its figure.

Set TRIOBAN_HEAVY=1 for the heavier variants (bigger counts, a longer notifier storm, the
soak); CI runs the default sizes.
"""

from __future__ import annotations

import os

HEAVY = os.environ.get("TRIOBAN_HEAVY") == "1"


def size(default: int, heavy: int) -> int:
    """``heavy`` under TRIOBAN_HEAVY=1, else ``default``."""
    return heavy if HEAVY else default
