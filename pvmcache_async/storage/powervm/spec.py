"""What a ``powervm:key=value,...`` spec says, and the logon to the PowerVM REST API it names.

The password is never part of a spec: it comes from an environment variable
(``PASSWORD_ENV``, or the one ``password_env=`` names), and no message ever carries it.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pvmcache_async.errors import InvalidInput, StorageError
from pvmcache_async.storage.checks import cause

with warnings.catch_warnings():  # pypowervm pulls in eventlet, which warns on stderr at import
    warnings.simplefilter("ignore")
    from pypowervm import adapter as pvm_adpt
    from pypowervm.helpers import log_helper, vios_busy

log = logging.getLogger(__name__)

DEFAULT_BUFFER = 16 << 20  # bytes between the download and the upload thread (buffer_mb=)
PASSWORD_ENV = "PVMCACHE_POWERVM_PASSWORD"
ADAPTER_HELPERS = [log_helper.log_helper, vios_busy.vios_busy_retry_helper]  # nova-powervm's
_SPEC_KEYS = {
    "host",
    "port",
    "protocol",
    "user",
    "password_env",
    "certpath",
    "vg",
    "vios",
    "system",
    "state_dir",
    "buffer_mb",
    "conn_tries",
}


@dataclass(frozen=True, slots=True)
class PowerVMSpec:
    """What ``powervm:key=value,...`` says. The password is never part of it."""

    vg: str
    host: str | None = None  # None: the local NovaLink REST server, file-based auth
    port: int | None = None
    protocol: str | None = None
    user: str | None = None
    password_env: str = PASSWORD_ENV
    certpath: str | None = None
    vios: str | None = None
    system: str | None = None  # the managed system, where the REST server (an HMC) has several
    state_dir: Path | None = None
    buffer_bytes: int = DEFAULT_BUFFER
    conn_tries: int = 1

    def text(self) -> str:
        """The spec as it would be written, for messages and ``VolumeGroup.spec``."""
        parts = [f"vg={self.vg}"]
        for key in ("host", "port", "protocol", "user", "system", "vios", "state_dir", "certpath"):
            value = getattr(self, key)
            if value is not None:
                parts.append(f"{key}={value}")
        return "powervm:" + ",".join(parts)

    def default_state_dir(self) -> Path:
        """Per user, keyed by host, managed system (if named) and VG name, not by ``vios``
        (naming the VIOS or not gives one directory): the index and locks of this VG. Which
        VG a directory serves is bound on first use (its uuid): two VGs never share one."""
        key = "_".join(p for p in (self.host or "local", self.system, self.vg) if p)
        return _base() / re.sub(r"[^A-Za-z0-9_.-]", "_", key)

    def claims_dir(self) -> Path:
        """Per user: which state directory each VG (by uuid) of this host is cached with."""
        return _base() / "claims"


def _base() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "pvmcache_async" / "powervm"


def parse_spec(rest: str) -> PowerVMSpec:
    """Parse the part of ``powervm:...`` after the colon: ``key=value`` pairs, comma-separated."""
    values: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if key == "password":
            raise InvalidInput(
                f"VG powervm: a password is never given in the spec; set {PASSWORD_ENV} "
                "(or the variable named by password_env=)"
            )
        if not sep or key not in _SPEC_KEYS or not value:
            raise InvalidInput(
                f"VG powervm: {item!r} is not one of {', '.join(sorted(_SPEC_KEYS))} as key=value"
            )
        if key in values:
            raise InvalidInput(f"VG powervm: {key} is given twice")
        values[key] = value
    if "vg" not in values:
        raise InvalidInput("VG powervm: vg=NAME (the volume group) is required")

    def number(key: str, default: int, low: int) -> int:
        raw = values.get(key)
        if raw is None:
            return default
        if not raw.isdigit() or int(raw) < low:
            raise InvalidInput(f"VG powervm: {key}={raw!r} is not a whole number >= {low}")
        return int(raw)

    protocol = values.get("protocol")
    if protocol not in (None, "http", "https"):
        raise InvalidInput(f"VG powervm: protocol={protocol!r} is not http or https")
    port = values.get("port")
    return PowerVMSpec(
        vg=values["vg"],
        host=values.get("host"),
        port=number("port", 0, 1) if port is not None else None,
        protocol=protocol,
        user=values.get("user"),
        password_env=values.get("password_env", PASSWORD_ENV),
        certpath=values.get("certpath"),
        vios=values.get("vios"),
        system=values.get("system"),
        state_dir=Path(values["state_dir"]).expanduser() if "state_dir" in values else None,
        buffer_bytes=number("buffer_mb", DEFAULT_BUFFER >> 20, 1) << 20,
        conn_tries=number("conn_tries", 1, 1),
    )


def connect(spec: PowerVMSpec) -> Any:
    """Log on to the PowerVM REST API (blocking) and return a ``pypowervm.adapter.Adapter``.

    Without a host: the local NovaLink REST server with file-based authentication, as
    nova-powervm connected. With a host (an HMC or a remote NovaLink): user and password,
    the password read from the environment variable ``spec.password_env``. The Adapter is
    nova-powervm's: pypowervm's ``log_helper`` and ``vios_busy_retry_helper`` (a request the
    VIOS answers "busy" is sent again, 3 times, 5 s apart and growing).
    """
    pvm_log = logging.getLogger("pypowervm")
    if pvm_log.level == logging.NOTSET and not log.isEnabledFor(logging.DEBUG):
        # pypowervm logs each failure as a warning before raising it; the error we raise
        # says it once (the command line's promise: one line). Debug logging keeps them.
        pvm_log.setLevel(logging.ERROR)
    kwargs: dict[str, Any] = {"conn_tries": spec.conn_tries}
    if spec.host is not None:
        password = os.environ.get(spec.password_env)
        if not spec.user or not password:
            raise InvalidInput(
                f"VG {spec.text()}: a remote host needs user= and the password in "
                f"${spec.password_env}"
            )
        kwargs.update(host=spec.host, username=spec.user, password=password)
    for key in ("port", "protocol", "certpath"):
        if getattr(spec, key) is not None:
            kwargs[key] = getattr(spec, key)
    try:
        session = pvm_adpt.Session(**kwargs)
    except Exception as exc:  # pypowervm raises its own errors and requests' alike
        raise StorageError(
            f"VG {spec.text()}: cannot log on to the PowerVM REST API: {cause(exc)}"
        ) from None  # the chain could hold the logon request
    return pvm_adpt.Adapter(session, helpers=list(ADAPTER_HELPERS))
