"""A real nova cloud on loopback: the storm through nova, its test and ``scripts/nova-cloud``.

``NovaCloud(root).up(...)`` starts, as separate processes on 127.0.0.1 with ports chosen free
at start-up: RabbitMQ and MariaDB (Debian packages, installed by ``install_packages``),
placement and nova-api under gunicorn, nova-conductor, nova-scheduler and one nova-compute per
host (``compute1``...), each host with its own file VG, against a real Glance (the dev
package's ``glance``: one of its own, or the one given). nova runs in threading mode.
Everything the cloud has is under ``root``: configuration, databases, logs, volume groups and
``cloud.json`` (ports and process ids), so ``down`` can stop all of it, epmd included, from
any process. ``up`` is idempotent: what runs is left alone, what is missing is started.

nova 34 has no ``noauth2`` any more: nova-api runs the stock pipeline without ``authtoken``,
so the identity comes from trusted ``X-User-Id``/``X-Project-Id``/``X-Roles`` headers
(``NovaAPI`` sends an admin's). Placement runs with its own ``noauth2``. There is no Neutron:
servers are booted with ``networks: none``.

Only the standard library is imported here; nova runs in its own processes.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from . import DevError
from .glance import GlanceServer, ensure_venv, free_port, log_tail

__all__ = [
    "DEFAULT_DRIVER",
    "DevNovaError",
    "NovaAPI",
    "NovaCloud",
    "install_packages",
]

DEFAULT_DRIVER = "pvmcache_ext.fake.FakeImageCacheDriver"
FLAVOR = "pvmcache-storm"  # the flavor id `up` makes: 1 vCPU, 64 MiB, 10 GB of disk
FLAVOR_DISK_GB = 10  # its root disk: every server's disk is this large (the image, then zeros)
MICROVERSION = "2.74"  # networks 'none' (2.37) and a requested host (2.74)
_BIN = Path(sys.executable).parent  # nova, placement and gunicorn are in this venv
_PACKAGES = ("rabbitmq-server", "mariadb-server")
_RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
_DATABASES = ("nova_api", "nova_cell0", "nova", "placement")
_ADMIN = {  # what keystonemiddleware would have set for an admin of project "admin"
    "X-Auth-Token": "admin",
    "X-User-Id": "admin",
    "X-Project-Id": "admin",
    "X-Roles": "admin,member,reader",
    "X-Identity-Status": "Confirmed",
}


# nova-manage api_db sync; cell_v2 map_cell0; cell_v2 create_cell --name cell1; db sync
_NOVA_DB_SYNC = """
import sys
from nova.cmd import manage
from nova import config, context, objects
cell0 = sys.argv.pop()
config.parse_args(sys.argv)
objects.register_all()
cells = manage.CellV2Commands()
steps = [
    lambda: manage.ApiDbCommands().sync(),
    lambda: cells.map_cell0(database_connection=cell0),
    lambda: 0 if any(c.name == "cell1" for c in objects.CellMappingList.get_all(
        context.get_admin_context())) else cells.create_cell(name="cell1"),
    lambda: manage.DbCommands().sync(),
]
for step in steps:
    rc = step()
    if rc:
        sys.exit(rc)
"""


class DevNovaError(DevError):
    """The nova cloud could not be installed, started, stopped or asked something."""


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def running(pid: int) -> bool:
    """Whether process ``pid`` still runs: a zombie has exited (its parent has yet to reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie has exited: it only waits to be reaped
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _run(cmd: list[str], log: Path, what: str, **kw: Any) -> None:
    with log.open("ab") as out:
        rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, **kw)
    if rc != 0:
        raise DevNovaError(f"{what} failed (rc={rc}): {log_tail(log, 6)}")


def install_packages(log: Path) -> None:
    """Install RabbitMQ and MariaDB from Debian (as root), once: ``apt-get update`` first only
    when a package cannot be installed from the lists the machine has."""
    missing = [p for p in _PACKAGES if not _installed(p)]
    if not missing:
        return
    if os.geteuid() != 0:
        raise DevNovaError(f"{' '.join(missing)} not installed; run as root to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    with log.open("ab") as out:
        if subprocess.call(install, stdout=out, stderr=subprocess.STDOUT, env=env) == 0:
            return
    _run(["apt-get", "update", "-q"], log, "apt-get update", env=env)
    _run(install, log, f"apt-get install {' '.join(missing)}", env=env)


def _installed(package: str) -> bool:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False
    ).stdout
    return out.strip() == "install ok installed"


# --- the nova API ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NovaAPI:
    """A small client of nova's compute API (v2.1, microversion ``MICROVERSION``) as an admin."""

    url: str  # http://127.0.0.1:PORT/v2.1

    def call(
        self, method: str, path: str, body: Any = None, *, timeout: float = 60.0
    ) -> tuple[int, Any]:
        host, _, rest = self.url.removeprefix("http://").partition("/")
        addr, _, port = host.partition(":")
        conn = http.client.HTTPConnection(addr, int(port), timeout=timeout)
        try:
            headers = {**_ADMIN, "OpenStack-API-Version": f"compute {MICROVERSION}"}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            conn.request(method, f"/{rest}{path}", body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            try:
                return resp.status, json.loads(raw) if raw.strip() else None
            except ValueError:  # an error page from a proxy or gunicorn, not nova's JSON
                return resp.status, raw.decode(errors="replace")
        finally:
            conn.close()

    def expect(self, method: str, path: str, body: Any = None, *ok: int) -> Any:
        status, got = self.call(method, path, body)
        if status not in (ok or (200,)):
            detail = " ".join(json.dumps(got).split())[:300] if got is not None else ""
            raise DevNovaError(f"nova API {method} {path}: HTTP {status}: {detail}")
        return got

    def boot(self, name: str, image_id: str, count: int = 1, *, host: str | None = None) -> None:
        """Ask for ``count`` servers of one image in one request (multi-create)."""
        server: dict[str, Any] = {
            "name": name,
            "imageRef": image_id,
            "flavorRef": FLAVOR,
            "networks": "none",
            "min_count": count,
            "max_count": count,
        }
        if host is not None:
            server["host"] = host
        self.expect("POST", "/servers", {"server": server}, 202)

    def server_ids(self, name_prefix: str, status: str | None = None) -> set[str]:
        """Ids of the servers whose name starts with ``name_prefix`` (in ``status``).

        Only the list without details: nova's details ask Neutron for security groups.
        """
        query = f"/servers?name={quote('^' + name_prefix)}&limit=1000"
        if status:
            query += f"&status={quote(status)}"
        return {s["id"] for s in self.expect("GET", query)["servers"]}

    def hosts_of_servers(self) -> dict[str, str]:
        """Server id -> the host it was built on, for every server on a hypervisor."""
        got = self.expect("GET", "/os-hypervisors?with_servers=true")["hypervisors"]
        return {
            server["uuid"]: hyp["hypervisor_hostname"]
            for hyp in got
            for server in hyp.get("servers") or []
        }

    def compute_services(self) -> list[dict[str, Any]]:
        got = self.expect("GET", "/os-services?binary=nova-compute")
        services: list[dict[str, Any]] = got["services"]
        return services


# --- the cloud ------------------------------------------------------------------------------


@dataclass
class CloudState:
    """What ``cloud.json`` holds: enough for another process to use or stop the cloud."""

    hosts: list[str]
    compute_driver: str
    cache_enabled: bool
    glance_url: str
    own_glance: bool
    ports: dict[str, int]
    password: str = field(repr=False)
    pids: dict[str, int] = field(default_factory=dict)


class NovaCloud:
    """A nova cloud whose every file is under ``root``; see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.state: CloudState | None = None
        self._glance: GlanceServer | None = None
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        if self._state_file.exists():
            self.state = CloudState(**json.loads(self._state_file.read_text()))

    # -- paths and views ----------------------------------------------------------------------

    @property
    def _state_file(self) -> Path:
        return self.root / "cloud.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def vg_path(self, host: str) -> Path:
        """The file VG of ``host``."""
        return self.root / "hosts" / host / "vg"

    @property
    def api(self) -> NovaAPI:
        return NovaAPI(f"http://127.0.0.1:{self._state().ports['api']}/v2.1")

    @property
    def glance(self) -> GlanceServer | None:
        """The Glance this cloud started (None when it was given one)."""
        return self._glance

    def _state(self) -> CloudState:
        if self.state is None:
            raise DevNovaError(f"no nova cloud in {self.root} (run up first)")
        return self.state

    def _save(self) -> None:
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self._state()), indent=1))
        tmp.chmod(0o600)  # it holds the database password
        tmp.replace(self._state_file)

    # -- up -----------------------------------------------------------------------------------

    def up(
        self,
        *,
        hosts: Iterable[str] = ("compute1", "compute2", "compute3"),
        compute_driver: str = DEFAULT_DRIVER,
        cache_enabled: bool = True,
        glance_url: str | None = None,
        timeout: float = 300.0,
    ) -> NovaCloud:
        """Start what is not running yet and return once nova schedules to every host.

        The settings apply when the cloud is made; an existing cloud keeps its own.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # rabbitmq and mysql must reach their directories
        for parent in self.root.parents:
            if not parent.stat().st_mode & 0o001:
                raise DevNovaError(
                    f"{parent} is closed to other users: the rabbitmq and mysql users must "
                    f"reach {self.root}; choose a --root under a directory open to them"
                )
        self.logs.mkdir(exist_ok=True)
        install_packages(self.logs / "apt.log")
        if self.state is None:
            self.state = CloudState(
                hosts=list(hosts),
                compute_driver=compute_driver,
                cache_enabled=cache_enabled,
                glance_url=glance_url or "",
                own_glance=glance_url is None,
                ports={
                    name: free_port()
                    for name in ("rabbit", "epmd", "dist", "mysql", "placement", "api")
                },
                password=secrets.token_hex(16),
            )
            self._save()
        deadline = time.monotonic() + timeout
        st = self._state()
        with self._phase("glance"):
            self._up_glance()
        self._write_config()
        self._up_rabbit()  # boots while the databases are made
        with self._phase("mysql"):
            self._up_mysql(deadline)
        with self._phase("databases"):
            self._sync_databases()
        with self._phase("nova and placement"):
            # all at once: each waits for what it needs (rabbitmq, placement) by itself
            for name in ("placement", "api"):
                self._up_wsgi(name)
            for service in ("conductor", "scheduler", *(f"compute-{h}" for h in st.hosts)):
                self._up_service(service)
            port = st.ports["rabbit"]
            self._wait("rabbit", lambda: _listening(port), deadline, "rabbitmq-server")
            for name, path in (("placement", "/"), ("api", "/v2.1/")):
                port = st.ports[name]
                self._wait(name, lambda p=port, u=path: self._http_ok(p, u), deadline, name)
            self._wait_for_computes(deadline)
        return self

    @contextlib.contextmanager
    def _phase(self, what: str) -> Iterator[None]:
        start = time.monotonic()
        yield
        with (self.logs / "up.log").open("a") as log:
            log.write(f"{time.strftime('%H:%M:%S')} {what}: {time.monotonic() - start:.1f} s\n")

    def _up_glance(self) -> None:
        st = self._state()
        if not st.own_glance:
            return
        pid = st.pids.get("glance")
        if pid and running(pid) and st.glance_url and _listening(int(st.glance_url.split(":")[-1])):
            return
        ensure_venv()
        self._glance = GlanceServer.start(self.root / "glance", workers=2, threads=8)
        atexit.unregister(self._glance.stop)  # it belongs to the cloud: `down` stops it
        proc = self._glance._proc
        assert proc is not None
        st.glance_url = self._glance.url
        st.pids["glance"] = proc.pid
        self._save()

    def _spawn(
        self, name: str, cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> int:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with (self.logs / f"{name}.out").open("ab") as out:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=full_env, cwd=cwd or self.root, start_new_session=True,
            )  # fmt: skip
        self._children[proc.pid] = proc
        self._state().pids[name] = proc.pid
        self._save()
        return proc.pid

    def _running(self, name: str) -> bool:
        pid = self._state().pids.get(name)
        return bool(pid) and running(pid)  # type: ignore[arg-type]

    def _wait(self, name: str, ready: Any, deadline: float, what: str) -> None:
        pid = self._state().pids[name]
        while not ready():
            if not running(pid):
                raise DevNovaError(f"{what} exited at start: {log_tail(self.logs / f'{name}.out')}")
            if time.monotonic() > deadline:
                raise DevNovaError(f"{what} not up in time: {log_tail(self.logs / f'{name}.out')}")
            time.sleep(0.2)

    def _up_rabbit(self) -> None:
        if self._running("rabbit"):
            return
        st = self._state()
        home = self.root / "rabbitmq"
        for sub in ("mnesia", "log"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        (home / "enabled_plugins").write_text("[].\n")
        (home / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{st.ports['rabbit']}\n"
        )
        (home / "rabbitmq-env.conf").write_text("")
        shutil.chown(home, "rabbitmq", "rabbitmq")
        for path in home.rglob("*"):
            shutil.chown(path, "rabbitmq", "rabbitmq")
        env = {
            "HOME": str(home),  # its own Erlang cookie
            "RABBITMQ_NODENAME": f"pvmcache{st.ports['rabbit']}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(st.ports["rabbit"]),
            "RABBITMQ_DIST_PORT": str(st.ports["dist"]),
            "RABBITMQ_MNESIA_BASE": str(home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(home / "log"),
            "RABBITMQ_PID_FILE": str(home / "rabbit.pid"),
            "RABBITMQ_CONFIG_FILE": str(home / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(home / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(home / "enabled_plugins"),
            # epmd of its own, on loopback, and the distribution port on loopback too
            "ERL_EPMD_PORT": str(st.ports["epmd"]),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        cmd = ["runuser", "-u", "rabbitmq", "--", str(_RABBIT_BIN / "rabbitmq-server")]
        self._spawn("rabbit", cmd, env, cwd=home)

    def _up_mysql(self, deadline: float) -> None:
        if self._running("mysql"):
            return
        st = self._state()
        base = self.root / "mysql"
        data = base / "data"
        base.mkdir(exist_ok=True)
        shutil.chown(base, "mysql", "mysql")
        if not (data / "mysql").exists():
            _run(
                ["mariadb-install-db", "--no-defaults", "--user=mysql", f"--datadir={data}",
                 "--auth-root-authentication-method=socket", "--skip-test-db"],
                self.logs / "mysql-install.log", "mariadb-install-db",
            )  # fmt: skip
        cmd = [
            "mariadbd", "--no-defaults", "--user=mysql", f"--datadir={data}",
            f"--socket={base / 'mysql.sock'}", f"--port={st.ports['mysql']}",
            "--bind-address=127.0.0.1", f"--pid-file={base / 'mysql.pid'}",
            "--skip-name-resolve", "--max-connections=2000",
            "--innodb-buffer-pool-size=256M",
            # a throwaway cloud's databases: nothing need reach the disk (migrations 2x faster)
            "--innodb-flush-log-at-trx-commit=0", "--innodb-flush-method=nosync",
            "--innodb-doublewrite=0", "--skip-log-bin",
        ]  # fmt: skip
        self._spawn("mysql", cmd)
        self._wait("mysql", lambda: self._sql("SELECT 1", check=False), deadline, "mariadbd")
        grants = "".join(
            f"CREATE DATABASE IF NOT EXISTS {db}; GRANT ALL ON {db}.* TO 'nova'@'127.0.0.1';"
            for db in _DATABASES
        )
        self._sql(
            f"CREATE USER IF NOT EXISTS 'nova'@'127.0.0.1' IDENTIFIED BY '{st.password}';{grants}"
        )

    def _sql(self, statements: str, *, check: bool = True) -> bool:
        sock = self.root / "mysql" / "mysql.sock"
        proc = subprocess.run(
            ["mariadb", "--no-defaults", f"--socket={sock}", "-uroot", "-e", statements],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise DevNovaError(f"mariadb: {proc.stderr.strip()[:300]}")
        return proc.returncode == 0

    def _query(self, statement: str) -> list[str]:
        sock = self.root / "mysql" / "mysql.sock"
        proc = subprocess.run(
            ["mariadb", "--no-defaults", f"--socket={sock}", "-uroot", "-N", "-B", "-e", statement],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise DevNovaError(f"mariadb: {proc.stderr.strip()[:300]}")
        return proc.stdout.splitlines()

    def _db(self, name: str) -> str:
        st = self._state()
        return f"mysql+pymysql://nova:{st.password}@127.0.0.1:{st.ports['mysql']}/{name}"

    def _sync_databases(self) -> None:
        """Placement's and nova's schemas, cell0 and cell1: nova-manage's own commands, in one
        process (each nova-manage start costs seconds), beside placement-manage."""
        done = self.root / "etc" / "databases-synced"
        if done.exists():
            return
        etc = self.root / "etc"
        env = {**os.environ, "OS_NOVA_DISABLE_EVENTLET_PATCHING": "1"}
        with (self.logs / "placement-db-sync.log").open("ab") as out:
            placement = subprocess.Popen(
                [str(_BIN / "placement-manage"), "--config-dir", str(etc / "placement"),
                 "db", "sync"], stdout=out, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        nova = [
            str(_BIN / "python"), "-c", _NOVA_DB_SYNC, "--config-file", str(etc / "nova.conf"),
            "--config-file", str(etc / "controller.conf"), self._db("nova_cell0"),
        ]  # fmt: skip
        try:
            _run(nova, self.logs / "db-sync.log", "nova-manage db sync", env=env)
        finally:
            rc = placement.wait()
        if rc != 0:
            log = self.logs / "placement-db-sync.log"
            raise DevNovaError(f"placement-manage db sync failed (rc={rc}): {log_tail(log, 6)}")
        done.write_text("")

    def _up_wsgi(self, name: str) -> None:
        if self._running(name):
            return
        st = self._state()
        etc = self.root / "etc"
        if name == "placement":
            app, env = (
                "placement.wsgi.api:application",
                {"OS_PLACEMENT_CONFIG_DIR": str(etc / "placement")},
            )
        else:
            app, env = (
                "nova.wsgi.osapi_compute:application",
                {
                    "OS_NOVA_CONFIG_DIR": str(etc),
                    "OS_NOVA_CONFIG_FILES": "api-paste.ini;nova.conf;controller.conf",
                    "OS_NOVA_DISABLE_EVENTLET_PATCHING": "1",
                },
            )
        port = st.ports[name]
        cmd = [
            str(_BIN / "gunicorn"), app, "--bind", f"127.0.0.1:{port}",
            "--workers", "1", "--worker-class", "gthread", "--threads", "16",
            "--timeout", "120", "--graceful-timeout", "5", "--no-control-socket",
            "--config", str(etc / "gunicorn.py"),
            "--error-logfile", str(self.logs / f"{name}-gunicorn.log"),
        ]  # fmt: skip
        self._spawn(name, cmd, env)

    @staticmethod
    def _http_ok(port: int, path: str) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", path, headers=_ADMIN)
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def _service_cmd(self, service: str) -> list[str]:
        etc = self.root / "etc"
        if service.startswith("compute-"):
            host = service.removeprefix("compute-")
            files = [etc / "nova.conf", etc / f"{host}.conf"]
            binary = "nova-compute"
        else:
            files = [etc / "nova.conf", etc / "controller.conf"]
            binary = f"nova-{service}"
        cmd = [str(_BIN / binary)]
        for f in files:
            cmd += ["--config-file", str(f)]
        return [*cmd, "--log-file", str(self.logs / f"{service}.log")]

    def _up_service(self, service: str) -> None:
        if self._running(service):
            return
        self._spawn(service, self._service_cmd(service), {"OS_NOVA_DISABLE_EVENTLET_PATCHING": "1"})

    def _wait_for_computes(self, deadline: float) -> None:
        """Until every host's nova-compute is up and mapped, and its node is in placement."""
        hosts = set(self._state().hosts)
        while True:
            for host in hosts:
                if not self._running(f"compute-{host}"):
                    log = self.logs / f"compute-{host}.log"
                    raise DevNovaError(f"nova-compute on {host} exited: {log_tail(log)}")
            up = {s["host"] for s in self.api.compute_services() if s["state"] == "up"} & hosts
            if up == hosts:
                got = self.api.expect("GET", "/os-hypervisors")["hypervisors"]
                mapped = set(self._query("SELECT host FROM nova_api.host_mappings"))
                if {h["hypervisor_hostname"] for h in got} >= hosts and mapped >= hosts:
                    break
            if time.monotonic() > deadline:
                raise DevNovaError(f"nova-compute not up on {sorted(hosts - up)} in time")
            time.sleep(0.5)
        status, _ = self.api.call("GET", f"/flavors/{FLAVOR}")
        if status == 404:
            flavor = {"name": FLAVOR, "id": FLAVOR, "vcpus": 1, "ram": 64, "disk": FLAVOR_DISK_GB}
            self.api.expect("POST", "/flavors", {"flavor": flavor}, 200)

    # -- configuration ------------------------------------------------------------------------

    def _write_config(self) -> None:
        st = self._state()
        etc = self.root / "etc"
        (etc / "placement").mkdir(parents=True, exist_ok=True)
        rabbit = f"rabbit://guest:guest@127.0.0.1:{st.ports['rabbit']}/"
        placement = f"http://127.0.0.1:{st.ports['placement']}"
        (etc / "placement" / "placement.conf").write_text(
            f"[DEFAULT]\nlog_file = {self.logs / 'placement.log'}\n\n"
            f"[placement_database]\nconnection = {self._db('placement')}\n\n"
            "[api]\nauth_strategy = noauth2\n\n"
            "[oslo_policy]\nenforce_new_defaults = false\nenforce_scope = false\n"
        )
        (etc / "nova.conf").write_text(f"""[DEFAULT]
transport_url = {rabbit}
my_ip = 127.0.0.1
concurrency_backend = threading
graceful_shutdown_timeout = 10
compute_driver = {st.compute_driver}
state_path = {self.root / "state"}
instances_path = {self.root / "state" / "instances"}

[api]
auth_strategy = keystone

[wsgi]
api_paste_config = {etc / "api-paste.ini"}

[glance]
api_servers = {st.glance_url}

[placement]
auth_type = admin_token
endpoint = {placement}
token = admin

[oslo_policy]
enforce_new_defaults = false
enforce_scope = false

[oslo_concurrency]
lock_path = {self.root / "state" / "lock"}

[quota]
instances = -1
cores = -1
ram = -1

[scheduler]
# new hosts are mapped to the cell by the scheduler itself (nova-manage costs seconds)
discover_hosts_in_cells_interval = 2

[notifications]
notification_format = unversioned

[oslo_messaging_notifications]
driver = noop
""")
        (etc / "controller.conf").write_text(
            f"[DEFAULT]\nhost = controller\n\n"
            f"[api_database]\nconnection = {self._db('nova_api')}\n\n"
            f"[database]\nconnection = {self._db('nova')}\n"
        )
        for host in st.hosts:
            state = self.root / "hosts" / host
            (state / "lock").mkdir(parents=True, exist_ok=True)
            self.vg_path(host).mkdir(parents=True, exist_ok=True)
            (etc / f"{host}.conf").write_text(f"""[DEFAULT]
host = {host}
state_path = {state}
instances_path = {state / "instances"}

[oslo_concurrency]
lock_path = {state / "lock"}

[pvmcache]
enabled = {st.cache_enabled}
volume_group = file:{self.vg_path(host)}
""")
        stock = (_BIN.parent / "etc" / "nova" / "api-paste.ini").read_text()
        (etc / "api-paste.ini").write_text(
            stock.replace(" authtoken keystonecontext", " keystonecontext")
        )
        # gunicorn's own argv must not reach nova's config parser (it parses sys.argv)
        (etc / "gunicorn.py").write_text(
            "import sys\n\n\ndef post_fork(server, worker):\n    del sys.argv[1:]\n"
        )

    # -- one compute --------------------------------------------------------------------------

    def compute_pid(self, host: str) -> int:
        return self._state().pids[f"compute-{host}"]

    def stop_compute(self, host: str, sig: int = signal.SIGTERM, timeout: float = 60.0) -> None:
        """Stop ``host``'s nova-compute with ``sig`` (SIGTERM as systemctl stop, or SIGKILL)."""
        self._stop(f"compute-{host}", sig, timeout)

    def start_compute(self, host: str, timeout: float = 120.0) -> None:
        """Start ``host``'s nova-compute again; return once nova sees it up."""
        self._up_service(f"compute-{host}")
        deadline = time.monotonic() + timeout
        started = time.time()
        while True:
            svc = [s for s in self.api.compute_services() if s["host"] == host]
            updated = svc[0].get("updated_at") if svc else None
            if svc and svc[0]["state"] == "up" and updated and _iso_ts(updated) >= started - 1:
                return
            if not self._running(f"compute-{host}"):
                log = self.logs / f"compute-{host}.log"
                raise DevNovaError(f"nova-compute on {host} exited: {log_tail(log)}")
            if time.monotonic() > deadline:
                raise DevNovaError(f"nova-compute on {host} not up again in time")
            time.sleep(0.5)

    def peak_rss_mib(self, name: str) -> float:
        """VmHWM of a service's process (``compute-HOST``, ``api``...) in MiB."""
        status = Path(f"/proc/{self._state().pids[name]}/status").read_text()
        line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024

    # -- down ---------------------------------------------------------------------------------

    def _stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        self._stop_all([name], sig, timeout)

    def _stop_all(self, names: list[str], sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        """Signal each process group at once, wait for all; SIGKILL what is left at timeout."""
        st = self._state()
        pids = {n: st.pids[n] for n in names if st.pids.get(n)}
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)  # its own session: a gunicorn's workers, rabbit's beam
        deadline = time.monotonic() + timeout
        while any(running(p) for p in pids.values()) and time.monotonic() < deadline:
            for pid in pids.values():
                self._reap(pid)
            time.sleep(0.1)
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            while running(pid):
                self._reap(pid)
                time.sleep(0.05)
            self._reap(pid)
        for name in pids:
            st.pids.pop(name, None)
        self._save()

    def _reap(self, pid: int) -> None:
        child = self._children.get(pid)
        if child is not None and child.poll() is not None:
            del self._children[pid]

    def down(self) -> None:
        """Stop every process of the cloud (epmd too) and remove ``root``."""
        if self.state is None:  # not a cloud's directory (or gone): never remove it
            return
        st = self.state
        with self._phase("down: nova and placement"):
            self._stop_all(
                [f"compute-{h}" for h in st.hosts] + ["scheduler", "conductor", "api", "placement"]
            )
        with self._phase("down: rabbitmq, mysql, glance"):
            self._stop_all(list(st.pids))  # the rest, and anything recorded under another name
        self._stop_epmd()
        if self._glance is not None:
            self._glance.stop()
        shutil.rmtree(self.root, ignore_errors=True)
        self.state = None

    def _stop_epmd(self) -> None:
        port = self._state().ports["epmd"]
        env = {**os.environ, "ERL_EPMD_PORT": str(port)}
        for _ in range(50):
            if not _listening(port):
                return
            subprocess.run(["epmd", "-kill"], env=env, capture_output=True, check=False)
            time.sleep(0.1)
        raise DevNovaError(f"epmd on 127.0.0.1:{port} would not stop")

    def processes(self) -> Iterator[tuple[str, int, bool]]:
        """(name, pid, alive) of each process the cloud recorded."""
        for name, pid in self._state().pids.items():
            yield name, pid, running(pid)


def _iso_ts(value: str) -> float:
    import datetime

    parsed = datetime.datetime.fromisoformat(value.rstrip("Z"))
    return parsed.replace(tzinfo=datetime.UTC).timestamp()


def _main(argv: list[str] | None = None) -> int:
    """``python -m pvmcache_dev.nova_cloud up|down|status``: what ``scripts/nova-cloud`` runs."""
    import argparse

    p = argparse.ArgumentParser(prog="nova-cloud", description=__doc__.split("\n")[0])
    p.add_argument("command", choices=("up", "down", "status"))
    p.add_argument(
        "--root",
        type=Path,
        default=Path(os.environ.get("PVMCACHE_NOVA_CLOUD", "/tmp/pvmcache-nova-cloud")),
        help="the cloud's directory [PVMCACHE_NOVA_CLOUD] (default %(default)s)",
    )
    p.add_argument("--hosts", type=int, default=3, help="nova-compute hosts (default 3)")
    p.add_argument("--driver", default=DEFAULT_DRIVER, help="compute_driver (default %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="[pvmcache] enabled = False")
    p.add_argument("--glance-url", help="use this Glance instead of starting one")
    args = p.parse_args(argv)
    cloud = NovaCloud(args.root)
    try:
        if args.command == "up":
            cloud.up(
                hosts=[f"compute{n}" for n in range(1, args.hosts + 1)],
                compute_driver=args.driver,
                cache_enabled=not args.no_cache,
                glance_url=args.glance_url,
            )
        elif args.command == "down":
            if cloud.state is None:
                print(f"no nova cloud in {args.root}")
                return 0
            cloud.down()
            print(f"nova cloud in {args.root}: stopped and removed")
            return 0
    except DevNovaError as exc:
        print(f"nova-cloud: {exc}", file=sys.stderr)
        return 1
    if cloud.state is None:
        print(f"no nova cloud in {args.root}")
        return 1
    st = cloud.state
    print(f"nova cloud in {args.root}:")
    print(f"  nova API   {cloud.api.url} (headers X-User-Id/X-Project-Id/X-Roles: admin)")
    print(f"  glance     {st.glance_url}")
    print(f"  placement  http://127.0.0.1:{st.ports['placement']} (X-Auth-Token: admin)")
    print(
        f"  hosts      {', '.join(st.hosts)}: driver {st.compute_driver}, "
        f"cache {'on' if st.cache_enabled else 'off'}"
    )
    for name, pid, alive in cloud.processes():
        print(f"  {name:18} pid {pid:<8} {'running' if alive else 'NOT RUNNING'}")
    print(f"  logs in {cloud.logs}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
