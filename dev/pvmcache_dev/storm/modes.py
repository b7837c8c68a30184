"""The storm's modes, in a module of their own so the command line can list them cheaply.

Importing this imports nothing else: ``cli.py`` checks ``--modes`` against these tuples
without loading the storm's conductor (``run``) or nova's (``nova``).
"""

from __future__ import annotations

# this product, each deploy streaming its own image, the nova-powervm design (storm.worker)
MODES = ("cache", "no-cache", "per-image-lock")
# through nova: this product, each server streaming its own image, nova alone (storm.nova)
NOVA_MODES = ("cache", "no-cache", "nova")
