"""A real OpenStack Glance API on loopback, for the tests, the demo and the benchmark.

Glance runs from its own virtualenv (``ensure_venv``) under gunicorn, with a sqlite database
and the filesystem store in a work directory, and without Keystone: the stock ``noauth``
pipeline treats every request as admin, so no token is needed. With ``trusted_headers=True``
the ``context`` middleware reads the identity from ``X-Roles``/``X-Project-Id`` headers
instead, which is the only way to see non-admin behaviour (e.g. 403 on a deactivated image).

Requests are counted from gunicorn's access log (one line per finished response, with the
bytes actually sent), so a test can assert how often the cache really downloaded an image.

Only the standard library is imported here; Glance itself never enters this process.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Self

from . import DevError, repo_root

if TYPE_CHECKING:
    from .keystone import Credentials

__all__ = [
    "ADMIN_HEADERS",
    "MEMBER_HEADERS",
    "DevGlanceError",
    "GlanceServer",
    "default_venv",
    "ensure_venv",
]

# Identities for a server started with trusted_headers=True (ignored by the noauth pipeline).
ADMIN_HEADERS = {
    "X-Identity-Status": "Confirmed",
    "X-Roles": "admin",
    "X-Project-Id": "devglance-admin",
    "X-User-Id": "devglance-admin",
}
MEMBER_HEADERS = {
    "X-Identity-Status": "Confirmed",
    "X-Roles": "member,reader",
    "X-Project-Id": "devglance-member",
    "X-User-Id": "devglance-member",
}

# Request line (method, raw URI: PATH_INFO is rewritten by Glance's routing), status and
# body bytes sent come first, so a line splits on spaces without a regex.
_ACCESS_FORMAT = "%(r)s %(s)s %(b)s %(L)s %(p)s %(t)s"
_UPLOAD_BLOCK = 1 << 20
_LOG_SETTLE = 0.1  # the log must stay unchanged this long before it is trusted
_LOG_SETTLE_MAX = 2.0


class DevGlanceError(DevError):
    """The dev Glance could not be installed, started or asked something."""


def default_venv() -> Path:
    """Glance's virtualenv: ``$PVMCACHE_GLANCE_VENV``, else the checkout's ``.venv-glance``."""
    return Path(os.environ.get("PVMCACHE_GLANCE_VENV") or repo_root() / ".venv-glance")


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())


def ensure_venv(
    venv: Path | None = None,
    *,
    quiet: bool = True,
    packages: tuple[str, ...] = ("glance", "gunicorn"),
    programs: tuple[str, ...] = ("gunicorn", "glance-manage"),
) -> Path:
    """Make sure ``venv`` (default: :func:`default_venv`) has ``programs``; install
    ``packages`` from PyPI if not (by default glance and gunicorn; ``keystone`` asks for
    keystone). Returns ``venv``."""
    venv = default_venv() if venv is None else Path(venv)
    bin_dir = venv / "bin"
    if all((bin_dir / program).exists() for program in programs):
        return venv  # fast path: no subprocess, no import of the server
    steps = [] if (bin_dir / "python").exists() else [[sys.executable, "-m", "venv", str(venv)]]
    steps.append([str(bin_dir / "python"), "-m", "pip", "install", *packages])
    log = venv.parent / f"{venv.name}-install.log"  # pip's chatter, kept for the error tail
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        for cmd in steps:
            if quiet:
                rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT)
            else:
                rc = subprocess.call(cmd)
            if rc != 0:
                raise DevGlanceError(f"{' '.join(cmd[-3:])} failed (rc={rc}): {log_tail(log, 5)}")
    return venv


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _conf(workdir: Path, trusted_headers: bool, keystone: Credentials | None) -> str:
    # The minimal set that starts and serves: sqlite, one fs backend plus the two reserved
    # stores (their default dirs under /var/lib/glance do not exist), legacy policy defaults
    # because there are no Keystone scopes, logs in the work dir. Format matching is off so
    # tests can label arbitrary bytes qcow2 etc. (malformed qcow2/vmdk/gpt headers are still
    # refused: Glance's safety checks are fatal whatever this says).
    flavor = "[paste_deploy]\nflavor = trusted\n" if trusted_headers else ""
    if keystone is not None:  # keystonemiddleware validates every token with this service user
        flavor = f"""[paste_deploy]
flavor = keystone

[keystone_authtoken]
www_authenticate_uri = {keystone.auth_url}
auth_url = {keystone.auth_url}
auth_type = password
username = {keystone.username}
password = {keystone.password}
project_name = {keystone.project}
user_domain_id = default
project_domain_id = default
"""
    return f"""[DEFAULT]
enabled_backends = fs:file
log_file = {workdir / "glance.log"}

[database]
connection = sqlite:///{workdir / "glance.sqlite"}

[glance_store]
default_backend = fs

[fs]
filesystem_store_datadir = {workdir / "images"}

[os_glance_staging_store]
filesystem_store_datadir = {workdir / "staging"}

[os_glance_tasks_store]
filesystem_store_datadir = {workdir / "tasks"}

[oslo_policy]
enforce_new_defaults = false
enforce_scope = false

[image_format]
require_image_format_match = false

{flavor}"""


_KEYSTONE_PIPELINE = (
    "keystone = cors http_proxy_to_wsgi versionnegotiation osprofiler authtoken context rootapp"
)
_TRUSTED_PIPELINE = (
    "trusted = cors http_proxy_to_wsgi versionnegotiation osprofiler context rootapp"
)


def _paste(stock: str) -> str:
    # The stock file has no pipeline that trusts identity headers without authtoken; add one.
    return (
        stock
        + "\n[composite:glance-api-trusted]\n"
        + "paste.composite_factory = glance.api:root_app_factory\n/: api\n"
    ).replace(_KEYSTONE_PIPELINE, f"{_KEYSTONE_PIPELINE}\n{_TRUSTED_PIPELINE}")


class GunicornServer:
    """A server run as a gunicorn process group in ``workdir``: launched, awaited, stopped.

    Its own session and process group, so that ``stop`` signals master and workers together.
    """

    workdir: Path
    _proc: subprocess.Popen[bytes] | None

    def _spawn(
        self,
        name: str,
        cmd: list[str],
        env: dict[str, str],
        timeout: float,
        answers: Callable[[], bool],
        tail: Callable[[], str],
    ) -> None:
        """Start ``cmd``; return once ``answers()`` (OSError: not listening yet)."""
        with (self.workdir / "gunicorn.out").open("ab") as out:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env, cwd=self.workdir, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                rc = self._proc.returncode
                self._proc = None
                raise DevGlanceError(f"{name} exited (rc={rc}) at start: {tail()}")
            try:
                if answers():
                    return
            except OSError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                self.stop()
                raise DevGlanceError(f"{name} not up after {timeout:.0f}s: {tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop master and workers (TERM, then KILL); safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):  # also any worker the master left behind
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@dataclass
class GlanceServer(GunicornServer):
    """A running Glance API (gunicorn process group) serving ``url`` from ``workdir``."""

    url: str
    workdir: Path
    trusted_headers: bool = False
    keystone: Credentials | None = None  # the keystone flavor: Glance's own service user
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _token: tuple[str, float] = field(default=("", 0.0), repr=False)

    @property
    def access_log(self) -> Path:
        return self.workdir / "access.log"

    @property
    def glance_log(self) -> Path:
        return self.workdir / "glance.log"

    @classmethod
    def start(
        cls,
        workdir: Path,
        *,
        venv: Path | None = None,
        port: int | None = None,
        workers: int = 2,
        threads: int = 4,
        timeout: float = 60.0,
        trusted_headers: bool = False,
        keystone: Credentials | None = None,
    ) -> GlanceServer:
        """Configure, migrate and launch Glance in ``workdir``; return once it answers.

        With ``keystone`` (a user with the admin role, e.g. from ``KeystoneServer.add_user``)
        Glance runs its stock keystone pipeline: keystonemiddleware validates every token, and
        this object's own calls authenticate as that user.
        """
        workdir = Path(workdir).resolve()
        venv = default_venv() if venv is None else Path(venv)
        for sub in ("images", "staging", "tasks"):
            (workdir / sub).mkdir(parents=True, exist_ok=True)
        stock = venv / "etc" / "glance" / "glance-api-paste.ini"
        if not stock.exists():
            raise DevGlanceError(f"no {stock}: run ensure_venv({str(venv)!r}) first")
        (workdir / "glance-api-paste.ini").write_text(_paste(stock.read_text()))
        (workdir / "glance-api.conf").write_text(_conf(workdir, trusted_headers, keystone))
        env = {**os.environ, "OS_GLANCE_CONFIG_DIR": str(workdir), "PYTHONUNBUFFERED": "1"}
        env.pop("PYTHONPATH", None)  # the glance venv must not see this project's paths

        with (workdir / "manage.log").open("wb") as out:
            rc = subprocess.call(
                [str(venv / "bin" / "glance-manage"), "--config-dir", str(workdir), "db_sync"],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir,
            )  # fmt: skip
        if rc != 0:
            tail = log_tail(workdir / "manage.log")
            raise DevGlanceError(f"glance-manage db_sync failed (rc={rc}): {tail}")

        # A port picked here could be taken before gunicorn binds it; retry with another.
        for attempt in range(3):
            chosen = port if port is not None else free_port()
            server = cls(f"http://127.0.0.1:{chosen}", workdir, trusted_headers, keystone)
            try:
                server._launch(venv, chosen, workers, threads, timeout, env)
                atexit.register(server.stop)  # no orphaned gunicorn if the caller forgets
                return server
            except DevGlanceError:
                in_use = "in use" in log_tail(workdir / "gunicorn.log", 40)
                if port is not None or not in_use or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _launch(
        self, venv: Path, port: int, workers: int, threads: int, timeout: float, env: dict[str, str]
    ) -> None:
        cmd = [
            str(venv / "bin" / "gunicorn"), "glance.wsgi.api:application",
            "--bind", f"127.0.0.1:{port}",
            "--workers", str(workers),
            # gthread: concurrent downloads per worker, and the worker heartbeat keeps
            # running while a multi-GB response streams (a sync worker is killed at --timeout).
            "--worker-class", "gthread", "--threads", str(threads),
            "--graceful-timeout", "5",
            # gunicorn 27 otherwise shares one control socket in ~/.gunicorn between servers.
            "--no-control-socket",
            "--access-logfile", str(self.access_log),
            "--access-logformat", _ACCESS_FORMAT,
            "--error-logfile", str(self.workdir / "gunicorn.log"),
            "--chdir", str(self.workdir),
        ]  # fmt: skip
        self.access_log.write_bytes(b"")  # counts start at zero for each server
        self._spawn(
            "glance",
            cmd,
            env,
            timeout,
            lambda: self._call("GET", "/versions", timeout=2.0)[0] == 200,
            self._start_tail,
        )

    def _start_tail(self) -> str:
        parts = [log_tail(self.workdir / "gunicorn.log", 8), log_tail(self.glance_log, 8)]
        return " || ".join(p for p in parts if p)

    # --- HTTP helpers (http.client: no proxy settings apply, and a file body streams) ---

    def _call(
        self,
        method: str,
        path: str,
        body: bytes | IO[bytes] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 600.0,
    ) -> tuple[int, bytes]:
        host, _, port = self.url.removeprefix("http://").partition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout, blocksize=_UPLOAD_BLOCK)
        try:
            hdrs = {**(ADMIN_HEADERS if self.trusted_headers else {}), **(headers or {})}
            if self.keystone is not None and path != "/versions":
                hdrs["X-Auth-Token"] = self._keystone_token()
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def _keystone_token(self) -> str:
        from .keystone import issue_token  # keystone imports this module

        assert self.keystone is not None
        token, expires = self._token
        if expires - time.time() < 2.0:  # tests may run Keystone with tokens of seconds
            self._token = token, _ = issue_token(self.keystone)
        return token

    def _expect(self, what: str, got: tuple[int, bytes], *ok: int) -> bytes:
        status, body = got
        if status not in ok:
            detail = " ".join(body.decode(errors="replace").split())[:200]
            raise DevGlanceError(f"{what}: HTTP {status}: {detail}")
        return body

    def create_image(
        self,
        data: bytes | Path | None,
        *,
        disk_format: str = "raw",
        container_format: str = "bare",
        name: str | None = None,
        image_id: str | None = None,
    ) -> str:
        """Create an image (with ``image_id`` if given, a UUID) and upload ``data``.

        A Path streams from disk in bounded memory; None leaves the image ``queued``.
        """
        meta: dict[str, Any] = {
            "name": name or f"devglance-{uuid.uuid4().hex[:8]}",
            "disk_format": disk_format,
            "container_format": container_format,
        }
        if image_id is not None:
            meta["id"] = image_id
        if self.trusted_headers or self.keystone is not None:
            meta["visibility"] = "public"  # readable by MEMBER_HEADERS' other project
        got = self._call(
            "POST", "/v2/images", json.dumps(meta).encode(), {"Content-Type": "application/json"}
        )
        image_id = str(json.loads(self._expect("create image", got, 201))["id"])
        if data is None:
            return image_id
        headers = {"Content-Type": "application/octet-stream"}
        path = f"/v2/images/{image_id}/file"
        if isinstance(data, Path):
            with data.open("rb") as f:
                headers["Content-Length"] = str(os.fstat(f.fileno()).st_size)
                got = self._call("PUT", path, f, headers)
        else:
            got = self._call("PUT", path, data, headers)
        self._expect(f"upload {image_id}", got, 204)
        return image_id

    def image(self, image_id: str) -> dict[str, object]:
        """The image record (``GET /v2/images/{id}``)."""
        record: dict[str, object] = json.loads(
            self._expect(f"image {image_id}", self._call("GET", f"/v2/images/{image_id}"), 200)
        )
        return record

    def deactivate(self, image_id: str) -> None:
        got = self._call("POST", f"/v2/images/{image_id}/actions/deactivate")
        self._expect(f"deactivate {image_id}", got, 204)

    def reactivate(self, image_id: str) -> None:
        got = self._call("POST", f"/v2/images/{image_id}/actions/reactivate")
        self._expect(f"reactivate {image_id}", got, 204)

    def delete(self, image_id: str) -> None:
        self._expect(f"delete {image_id}", self._call("DELETE", f"/v2/images/{image_id}"), 204)

    # --- access log ---

    def _file_gets(self, image_id: str | None) -> list[int]:
        """Bytes sent by each ``GET .../file`` (any status) once the log has settled."""
        # gunicorn writes (and flushes) the line just after the last byte is sent, so a
        # client can finish reading a moment before its line lands: wait until the log has
        # stopped growing briefly, bounded for a server that is never idle.
        deadline = time.monotonic() + _LOG_SETTLE_MAX
        size, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            now_size = self.access_log.stat().st_size if self.access_log.exists() else 0
            if now_size != size:
                size, since = now_size, time.monotonic()
            elif time.monotonic() - since >= _LOG_SETTLE:
                break
            time.sleep(0.02)
        want = f"/v2/images/{image_id}/file" if image_id else None
        sent: list[int] = []
        if not self.access_log.exists():
            return sent
        for line in self.access_log.read_text(errors="replace").splitlines():
            fields = line.split(" ", 5)  # GET /v2/images/ID/file HTTP/1.1 200 300000 ...
            if len(fields) < 5 or fields[0] != "GET":
                continue
            path = fields[1].partition("?")[0]
            if want is not None and path != want:
                continue
            if want is None and not (path.startswith("/v2/images/") and path.endswith("/file")):
                continue
            sent.append(int(fields[4]) if fields[4].isdigit() else 0)
        return sent

    def file_requests(self, image_id: str | None = None) -> int:
        """How many ``GET /v2/images/{id}/file`` requests (of that image, or any) were served."""
        return len(self._file_gets(image_id))

    def bytes_served(self, image_id: str | None = None) -> int:
        """Body bytes sent by those GETs (what actually went out, for aborted ones too)."""
        return sum(self._file_gets(image_id))


def _main() -> None:
    """``python -m pvmcache_dev.glance [WORKDIR]``: run a dev Glance until Ctrl-C."""
    workdir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path.cwd() / "devglance"
    ensure_venv(quiet=False)
    with GlanceServer.start(workdir) as server:
        print(f"glance at {server.url} (logs in {workdir}); Ctrl-C stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    _main()
