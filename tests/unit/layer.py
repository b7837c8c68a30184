"""Which nova modules the unit layer imported: recorded while pytest collects it.

``tests/unit/conftest.py`` notes the nova modules present when it starts, and those each
unit test module imports while it is collected; ``test_layer.py`` judges them.
"""

from __future__ import annotations

import sys


def nova_modules() -> set[str]:
    """The nova modules imported in this process so far."""
    return {name for name in sys.modules if name == "nova" or name.startswith("nova.")}


at_start = frozenset(nova_modules())  # imported before the unit layer's conftest
preloaded: set[str] = set(at_start)  # present when a unit module began to be collected
imported: set[str] = set()  # imported by the unit layer itself (conftest or a test module)
