"""A real OpenStack Keystone on loopback, for the tests and a demo of the keystone flavor.

Keystone runs from its own virtualenv (installed like Glance's, through
``glance.ensure_venv``) under gunicorn, with a sqlite database, fernet keys in a work
directory and ``keystone-manage bootstrap`` for the admin user, the roles and its own catalog
entry. ``token_expiration`` sets ``[token] expiration``: a few seconds lets a test see tokens
expire during a download. Password hashing uses bcrypt's fewest rounds, so that each
authentication costs milliseconds, not a quarter of a second.

Only the standard library is imported here; Keystone itself never enters this process.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import repo_root
from .glance import DevGlanceError, GunicornServer, ensure_venv, free_port, log_tail

__all__ = [
    "Credentials",
    "KeystoneServer",
    "default_keystone_venv",
    "ensure_keystone_venv",
    "issue_token",
]

REGION = "RegionOne"


def default_keystone_venv() -> Path:
    """Keystone's virtualenv: ``$PVMCACHE_KEYSTONE_VENV``, else the checkout's
    ``.venv-keystone``."""
    return Path(os.environ.get("PVMCACHE_KEYSTONE_VENV") or repo_root() / ".venv-keystone")


def ensure_keystone_venv(venv: Path | None = None, *, quiet: bool = True) -> Path:
    """Make sure ``venv`` (default: :func:`default_keystone_venv`) has keystone and gunicorn;
    install them from PyPI if not."""
    return ensure_venv(
        default_keystone_venv() if venv is None else venv,
        quiet=quiet,
        packages=("keystone", "gunicorn"),
        programs=("gunicorn", "keystone-manage"),
    )


@dataclass(frozen=True)
class Credentials:
    """A keystone user scoped to a project, all in the Default domain."""

    auth_url: str  # ends in /v3
    username: str
    password: str = field(repr=False)
    project: str

    def clouds_yaml(self, cloud: str, *, region: str = REGION) -> str:
        """A clouds.yaml that names this user, as an operator would write it."""
        return json.dumps(  # JSON is YAML; no yaml library needed here
            {
                "clouds": {
                    cloud: {
                        "auth": {
                            "auth_url": self.auth_url,
                            "username": self.username,
                            "password": self.password,
                            "project_name": self.project,
                            "user_domain_name": "Default",
                            "project_domain_name": "Default",
                        },
                        "region_name": region,
                        "interface": "public",
                        "identity_api_version": 3,
                    }
                }
            },
            indent=2,
        )

    def os_environ(self, *, region: str = REGION) -> dict[str, str]:
        """The same as the standard ``OS_*`` variables (an openrc file)."""
        return {
            "OS_AUTH_URL": self.auth_url,
            "OS_USERNAME": self.username,
            "OS_PASSWORD": self.password,
            "OS_PROJECT_NAME": self.project,
            "OS_USER_DOMAIN_NAME": "Default",
            "OS_PROJECT_DOMAIN_NAME": "Default",
            "OS_REGION_NAME": region,
            "OS_IDENTITY_API_VERSION": "3",
        }


def _request(
    url: str, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = None
) -> tuple[int, dict[str, str], dict[str, Any]]:
    host, _, port = url.removeprefix("http://").partition("/")[0].partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["X-Auth-Token"] = token
        conn.request(method, path, json.dumps(body).encode() if body is not None else None, headers)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, dict(resp.getheaders()), json.loads(raw) if raw.strip() else {}
    finally:
        conn.close()


def issue_token(creds: Credentials) -> tuple[str, float]:
    """A project-scoped token for ``creds`` and when it expires (unix time)."""
    body = {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {
                    "user": {
                        "name": creds.username,
                        "domain": {"id": "default"},
                        "password": creds.password,
                    }
                },
            },
            "scope": {"project": {"name": creds.project, "domain": {"id": "default"}}},
        }
    }
    base = creds.auth_url.removeprefix("http://").partition("/")
    status, headers, answer = _request(creds.auth_url, "POST", f"/{base[2]}/auth/tokens", body)
    if status != 201:
        raise DevGlanceError(f"keystone refused a token for {creds.username}: HTTP {status}")
    expires = answer["token"]["expires_at"]  # 2026-12-02T09:30:00.000000Z
    when = time.mktime(time.strptime(expires.split(".")[0].rstrip("Z"), "%Y-%m-%dT%H:%M:%S"))
    return headers["X-Subject-Token"], when - time.timezone


def _conf(workdir: Path, token_expiration: int) -> str:
    return f"""[DEFAULT]
log_file = {workdir / "keystone.log"}

[database]
connection = sqlite:///{workdir / "keystone.sqlite"}

[token]
provider = fernet
expiration = {token_expiration}

[fernet_tokens]
key_repository = {workdir / "fernet-keys"}

[fernet_receipts]
key_repository = {workdir / "fernet-receipts"}

[credential]
key_repository = {workdir / "credential-keys"}

[identity]
password_hash_rounds = 4
"""


@dataclass
class KeystoneServer(GunicornServer):
    """A running Keystone (gunicorn process group) at ``url`` (``auth_url`` ends in /v3)."""

    url: str
    workdir: Path
    admin: Credentials
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _admin_token: tuple[str, float] = field(default=("", 0.0), repr=False)

    @property
    def auth_url(self) -> str:
        return f"{self.url}/v3"

    @classmethod
    def start(
        cls,
        workdir: Path,
        *,
        venv: Path | None = None,
        token_expiration: int = 3600,
        timeout: float = 60.0,
    ) -> KeystoneServer:
        """Configure, migrate, bootstrap and launch Keystone in ``workdir``; return once it
        answers."""
        workdir = Path(workdir).resolve()
        venv = default_keystone_venv() if venv is None else Path(venv)
        workdir.mkdir(parents=True, exist_ok=True)
        conf = workdir / "keystone.conf"
        conf.write_text(_conf(workdir, token_expiration))
        env = {**os.environ, "OS_KEYSTONE_CONFIG_FILES": str(conf), "PYTHONUNBUFFERED": "1"}
        env.pop("PYTHONPATH", None)  # the keystone venv must not see this project's paths
        manage = [str(venv / "bin" / "keystone-manage"), "--config-file", str(conf)]
        user = ["--keystone-user", str(os.getuid()), "--keystone-group", str(os.getgid())]
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        password = secrets.token_urlsafe(16)
        steps = [
            [*manage, "db_sync"],
            [*manage, "fernet_setup", *user],
            [*manage, "credential_setup", *user],
            [
                *manage, "bootstrap", "--bootstrap-password", password,
                "--bootstrap-admin-url", f"{url}/v3", "--bootstrap-public-url", f"{url}/v3",
                "--bootstrap-internal-url", f"{url}/v3", "--bootstrap-region-id", REGION,
            ],
        ]  # fmt: skip
        with (workdir / "manage.log").open("wb") as out:
            for cmd in steps:
                rc = subprocess.call(
                    cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir
                )
                if rc != 0:
                    tail = log_tail(workdir / "manage.log")
                    raise DevGlanceError(f"keystone-manage {cmd[3]} failed (rc={rc}): {tail}")
        admin = Credentials(f"{url}/v3", "admin", password, "admin")
        server = cls(url, workdir, admin)
        server._launch(venv, port, timeout, env)
        atexit.register(server.stop)
        return server

    def _launch(self, venv: Path, port: int, timeout: float, env: dict[str, str]) -> None:
        # keystone's application parses sys.argv with oslo.config, and gunicorn's arguments
        # are not its own: a two-line module clears them before keystone is imported
        (self.workdir / "keystone_app.py").write_text(
            "import sys\nsys.argv[1:] = []\nfrom keystone.wsgi.api import application\n"
        )
        cmd = [
            str(venv / "bin" / "gunicorn"), "keystone_app:application",
            "--pythonpath", str(self.workdir),
            "--bind", f"127.0.0.1:{port}",
            "--workers", "1", "--worker-class", "gthread", "--threads", "4",
            "--graceful-timeout", "5", "--no-control-socket",
            "--error-logfile", str(self.workdir / "gunicorn.log"),
            "--chdir", str(self.workdir),
        ]  # fmt: skip
        self._spawn(
            "keystone",
            cmd,
            env,
            timeout,
            lambda: _request(self.url, "GET", "/v3")[0] == 200,
            lambda: log_tail(self.workdir / "gunicorn.log", 8),
        )

    # --- administration through the identity API, as the admin user ---

    def _admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        if self._admin_token[1] - time.time() < 1.0:
            self._admin_token = issue_token(self.admin)
        status, _, answer = _request(self.url, method, f"/v3{path}", body, self._admin_token[0])
        if status not in (200, 201, 204):
            raise DevGlanceError(f"keystone {method} {path}: HTTP {status}: {answer}")
        return answer

    def _id_of(self, kind: str, name: str, create: dict[str, Any] | None = None) -> str:
        """The id of the project, role... called ``name``; created with ``create`` if absent."""
        found = self._admin("GET", f"/{kind}?name={name}")[kind]
        if found:
            return str(found[0]["id"])
        if create is None:
            raise DevGlanceError(f"keystone has no {kind} {name!r}")
        return str(self._admin("POST", f"/{kind}", create)[kind.removesuffix("s")]["id"])

    def add_user(self, username: str, project: str, *, role: str = "member") -> Credentials:
        """A new user with ``role`` on ``project`` (created if need be), a random password."""
        password = secrets.token_urlsafe(16)
        project_id = self._id_of(
            "projects", project, {"project": {"name": project, "domain_id": "default"}}
        )
        user = {"name": username, "password": password, "domain_id": "default"}
        user_id = self._admin("POST", "/users", {"user": user})["user"]["id"]
        role_id = self._id_of("roles", role)
        self._admin("PUT", f"/projects/{project_id}/users/{user_id}/roles/{role_id}")
        return Credentials(self.auth_url, username, password, project)

    def add_endpoint(self, service_type: str, name: str, url: str, *, region: str = REGION) -> None:
        """A service in the catalog, with ``url`` as its public, internal and admin endpoint."""
        service = {"type": service_type, "name": name}
        service_id = self._admin("POST", "/services", {"service": service})["service"]["id"]
        for interface in ("public", "internal", "admin"):
            endpoint = {
                "service_id": service_id,
                "interface": interface,
                "url": url,
                "region_id": region,
            }
            self._admin("POST", "/endpoints", {"endpoint": endpoint})


def _main() -> None:
    """``python -m pvmcache_dev.keystone [WORKDIR]``: a dev cloud until Ctrl-C.

    Keystone, Glance in its keystone flavor (in the catalog), an ``operator`` user, and a
    ``clouds.yaml`` for it (cloud ``devstack``) in WORKDIR.
    """
    import sys

    from .glance import GlanceServer

    workdir = Path(sys.argv[1] if len(sys.argv) > 1 else "devcloud").resolve()
    for signum in (signal.SIGINT, signal.SIGTERM):  # either stops both (a background job
        signal.signal(signum, signal.default_int_handler)  # starts with SIGINT ignored)
    ensure_keystone_venv(quiet=False)
    ensure_venv(quiet=False)
    with KeystoneServer.start(workdir / "keystone") as keystone:
        service_user = keystone.add_user("glance", "service", role="admin")
        with GlanceServer.start(workdir / "glance", keystone=service_user) as glance:
            keystone.add_endpoint("image", "glance", glance.url)
            operator = keystone.add_user("operator", "demo")
            clouds = workdir / "clouds.yaml"
            clouds.write_text(operator.clouds_yaml("devstack"))
            clouds.chmod(0o600)
            print(
                f"keystone at {keystone.auth_url}, glance at {glance.url}\n"
                f"export OS_CLIENT_CONFIG_FILE={clouds} OS_CLOUD=devstack\n"
                "Ctrl-C stops both",
                flush=True,
            )
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()


if __name__ == "__main__":
    _main()
