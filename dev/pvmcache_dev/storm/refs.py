"""Same-run physical references: what the hardware and standard tools do on this machine.

* ``fetch``: ``curl URL -o /dev/null``: Glance and the loopback alone.
* ``fetch_write_verify``: ``curl URL | tee FILE | sha512sum``: the work a cold miss must do.
* ``copy``: ``cp --sparse=always`` of a cached file: the work a warm clone must do; and
  ``copy_sync``: the same followed by ``sync FILE``, since a clone also makes its data durable.

Without curl on the machine a Python equivalent (``http.client``) stands in, and the report
says which tool measured.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_BLOCK = 4 << 20


@dataclass(frozen=True, slots=True)
class Reference:
    name: str
    command: str
    seconds: float  # the median of the repeats
    bytes: int

    @property
    def mib_s(self) -> float:
        return self.bytes / (1 << 20) / self.seconds if self.seconds > 0 else 0.0


def sync_disks() -> None:
    """Let earlier writes reach the disk first, so none of them is still in flight during
    (and billed to) the next measurement."""
    os.sync()


def _timed(fn: Callable[[], object], repeats: int, setup: Callable[[], object] = list) -> float:
    times = []
    for _ in range(repeats):
        setup()  # not timed
        sync_disks()
        start = time.monotonic()
        fn()
        times.append(time.monotonic() - start)
    return statistics.median(times)


def _run(cmd: str) -> None:
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True, stdout=subprocess.DEVNULL)


def _py_fetch(url: str, dest: Path | None) -> None:
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, _, port = host_port.partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.request("GET", "/" + path)
        resp = conn.getresponse()
        hasher = hashlib.sha512()
        with open(dest or os.devnull, "wb") as f:
            while chunk := resp.read(_BLOCK):
                if dest is not None:
                    hasher.update(chunk)
                f.write(chunk)
    finally:
        conn.close()


def fetch_tool() -> str:
    return "curl" if shutil.which("curl") else "python http.client"


def measure(
    file_url: str, size: int, cached: Path | None, scratch: Path, repeats: int = 1
) -> list[Reference]:
    out = scratch / "reference.out"
    refs = []
    if shutil.which("curl"):
        fetch = f"curl -sSf {file_url} -o /dev/null"
        tee = f"curl -sSf {file_url} | tee {out} | sha512sum"
        refs.append(Reference("fetch", fetch, _timed(lambda: _run(fetch), repeats), size))
        refs.append(Reference("fetch_write_verify", tee, _timed(lambda: _run(tee), repeats), size))
    else:
        secs = _timed(lambda: _py_fetch(file_url, None), repeats)
        refs.append(Reference("fetch", "python: GET to /dev/null", secs, size))
        secs = _timed(lambda: _py_fetch(file_url, out), repeats)
        refs.append(Reference("fetch_write_verify", "python: GET, write, sha512", secs, size))
    out.unlink(missing_ok=True)
    if cached is not None:
        cp = f"cp --sparse=always {cached} {out}"
        sync = f"{cp} && sync {out}"

        def clear() -> None:
            out.unlink(missing_ok=True)

        refs.append(Reference("copy", cp, _timed(lambda: _run(cp), repeats, clear), size))
        refs.append(Reference("copy_sync", sync, _timed(lambda: _run(sync), repeats, clear), size))
        out.unlink(missing_ok=True)
    return refs
