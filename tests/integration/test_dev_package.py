"""The dev tools are a distribution of their own: the product's wheel holds none of them, and
the dev package finds its servers' virtualenvs in the checkout it is installed from."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# What a build must not see: virtualenvs (symlinks here), git, caches, earlier builds.
_NOT_SOURCE = shutil.ignore_patterns(
    ".venv*", ".git", "build", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", "out"
)
# setuptools' own backend, called as pip calls it, without pip and without any index.
_BUILD = "import sys\nfrom setuptools import build_meta\nprint(build_meta.build_wheel(sys.argv[1]))"


def _wheel(source: Path, out: Path) -> dict[str, bytes]:
    """Build ``source``'s wheel offline into ``out``; the files it holds and their bytes."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", _BUILD, str(out)],
        cwd=source, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, (
        f"building the wheel offline failed (setuptools >= 70.1 is the test extra's): "
        f"{proc.stderr[-2000:]}"
    )
    with zipfile.ZipFile(out / proc.stdout.split()[-1]) as wheel:
        return {name: wheel.read(name) for name in wheel.namelist()}


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of this checkout's sources, so that a build writes nothing into the tree."""
    copy = tmp_path_factory.mktemp("checkout") / "repo"
    shutil.copytree(REPO, copy, ignore=_NOT_SOURCE, symlinks=True)
    return copy


def test_the_product_wheel_holds_no_dev_server_and_no_storm(checkout: Path, tmp_path: Path) -> None:
    files = _wheel(checkout, tmp_path)
    modules = sorted(n for n in files if n.endswith(".py"))
    assert {m.split("/")[0] for m in modules} == {"pvmcache_async", "nova"}
    dev = [m for m in modules if any(w in m for w in ("dev", "storm"))]
    assert dev == []
    assert "nova/virt/pvmcache_ext/__init__.py" in modules  # the shim nova loads drivers by
    assert "pvmcache_async/cli/main.py" in modules and "pvmcache_async/transfer.py" in modules
    # the product installs no system package: that is the dev package's nova cloud's job
    installs = [m for m in modules if any(w in files[m] for w in (b"apt-get", b"dpkg"))]
    assert installs == []


def test_the_dev_wheel_holds_the_dev_servers_and_the_whole_storm(
    checkout: Path, tmp_path: Path
) -> None:
    modules = {n for n in _wheel(checkout / "dev", tmp_path) if n.endswith(".py")}
    storm = {f"pvmcache_dev/storm/{m}.py" for m in ("modes", "run", "worker", "nova", "plot")}
    servers = {f"pvmcache_dev/{m}.py" for m in ("glance", "keystone", "nova_cloud")}
    assert storm | servers <= modules
    assert {m.split("/")[0] for m in modules} == {"pvmcache_dev"}


_VENVS = (
    "import json, sys\n"
    "from pvmcache_dev.glance import default_venv\n"
    "from pvmcache_dev.keystone import default_keystone_venv\n"
    "try:\n"
    "    print(json.dumps([str(default_venv()), str(default_keystone_venv())]))\n"
    "except Exception as exc:\n"
    "    print(json.dumps([type(exc).__name__, str(exc)]))\n"
)


def _venvs(dev_path: Path, **env: str) -> list[str]:
    """Where the dev package at ``dev_path`` finds its venvs, in a child with ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PVMCACHE_")}
    proc = subprocess.run(
        [sys.executable, "-c", _VENVS],
        env=base | {"PYTHONPATH": f"{dev_path}{os.pathsep}{REPO}"} | env,
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    found: list[str] = json.loads(proc.stdout)
    return found


def test_the_dev_package_finds_its_venvs_in_the_checkout_it_lives_in(checkout: Path) -> None:
    venvs = [str(checkout / ".venv-glance"), str(checkout / ".venv-keystone")]
    assert _venvs(checkout / "dev") == venvs  # not the product's checkout, nor site-packages
    assert _venvs(REPO / "dev", PVMCACHE_DEV_ROOT=str(checkout)) == venvs
    assert _venvs(checkout / "dev", PVMCACHE_GLANCE_VENV="/opt/glance")[0] == "/opt/glance"


def test_outside_a_checkout_the_dev_package_says_how_to_install_it(
    checkout: Path, tmp_path: Path
) -> None:
    site = tmp_path / "site-packages"  # where a wheel of the dev package would put it
    shutil.copytree(checkout / "dev" / "pvmcache_dev", site / "pvmcache_dev")
    kind, message = _venvs(site)
    assert kind == "NotACheckout"
    assert f"{tmp_path} is not a checkout" in message and "pip install -e ./dev" in message
    kind, message = _venvs(checkout / "dev", PVMCACHE_DEV_ROOT=str(tmp_path))
    assert kind == "NotACheckout"
    assert message.startswith(f"PVMCACHE_DEV_ROOT={tmp_path}: ") and "dev/pyproject.toml" in message
