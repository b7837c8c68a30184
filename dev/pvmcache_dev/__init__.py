"""The repository's dev tools, a distribution of their own (``pvmcache-dev``), not the product.

A real Glance (``glance``), Keystone (``keystone``) and nova cloud (``nova_cloud``) on loopback
for the tests, the demo and the benchmark, and the deploy storm (``storm``) behind
``pvmcache-async storm``. It is only ever installed editable from a checkout (``pip install -e
./dev``, which ``scripts/bootstrap`` runs after installing the product): the servers run from
that checkout's ``.venv-glance`` and ``.venv-keystone``, found by :func:`repo_root`.

Only the standard library is imported here.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ROOT_ENV", "DevError", "NotACheckout", "repo_root"]

ROOT_ENV = "PVMCACHE_DEV_ROOT"
# What a checkout has at its top: this distribution and the script that sets the venvs up.
_MARKERS = ("dev/pyproject.toml", "scripts/bootstrap")


class DevError(Exception):
    """A dev server could not be found, installed, started or asked something."""


class NotACheckout(DevError):
    """The dev package is not inside a checkout of the repository, and none is named."""


def repo_root() -> Path:
    """The checkout the dev tools belong to: ``$PVMCACHE_DEV_ROOT`` if set, else the folder
    that holds ``dev/`` with this package in it (the editable install's source).

    Raises NotACheckout, naming the folder and the fix, if that folder is not a checkout (the
    package was installed from a wheel, or the variable names another folder).
    """
    named = os.environ.get(ROOT_ENV)
    root = Path(named) if named else Path(__file__).resolve().parent.parent.parent
    missing = [marker for marker in _MARKERS if not (root / marker).is_file()]
    if missing:
        where = f"{ROOT_ENV}={named}" if named else f"pvmcache_dev in {Path(__file__).parent}"
        raise NotACheckout(
            f"{where}: {root} is not a checkout of the repository (no {' or '.join(missing)}); "
            f"install the dev package editable from a checkout (pip install -e ./dev) "
            f"or set {ROOT_ENV} to one"
        )
    return root
