"""Keystone for the command line, the way every OpenStack tool does it.

The cloud comes from openstacksdk's config loader (``clouds.yaml`` by ``--os-cloud``/
``OS_CLOUD``, or the standard ``OS_AUTH_URL``/``OS_USERNAME``/... variables); the keystoneauth1
session it makes authenticates, finds Glance in the catalog (``--os-region-name``,
``--os-interface``) and renews the token: ``GlanceClient`` asks it for the token before each
request, so a download or a resume that outlives one token still succeeds. ``--glance-url``
and ``--token`` override the catalog and the session's token.

Nothing secret reaches a message: errors name the auth URL (cut by ``glance.urls.redact_url``: no
userinfo, query or fragment) and the user, never a password or a token. A renewal is one
blocking request to keystone, made by the session once per token lifetime (keystoneauth
renews two minutes before the expiry).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pvmcache_async.errors import AuthError, InvalidInput, NoGlanceEndpoint
from pvmcache_async.glance.urls import redact_url

__all__ = ["GlanceAccess", "add_arguments", "glance_access", "uses_keystone"]


@dataclass(frozen=True)
class GlanceAccess:
    """Where Glance is and what to authenticate with."""

    url: str
    token: str | Callable[[], str | None] | None = field(default=None, repr=False)
    ca_file: str | None = None  # the cloud's CA bundle (cacert), if it names one
    verify_tls: bool = True


def uses_keystone(cloud: str | None, environ: Mapping[str, str]) -> bool:
    """Whether the options name a keystone cloud: ``--os-cloud``/``OS_CLOUD``, or
    ``OS_AUTH_URL``."""
    return bool(cloud or environ.get("OS_AUTH_URL"))


def _where(region: Any) -> str:
    """The auth URL and user of a cloud, for messages (never its password)."""
    auth = region.config.get("auth", {}) or {}
    user = auth.get("username") or auth.get("user_id")
    url = redact_url(str(auth.get("auth_url", "?")))
    return f"keystone at {url}" + (f" (user {user!r})" if user else "")


def _auth_error(region: Any, exc: Exception) -> AuthError:
    from keystoneauth1 import exceptions as ks

    where = _where(region)
    if isinstance(exc, ks.Unauthorized):
        return AuthError(
            f"{where} refused the credentials (HTTP 401): check the user, password and project"
        )
    if isinstance(exc, ks.ConnectFailure | ks.ConnectTimeout):
        return AuthError(f"cannot reach {where}: {type(exc).__name__}")
    if isinstance(exc, ks.MissingRequiredOptions | ks.MissingAuthPlugin):
        return AuthError(f"{where}: incomplete credentials: {redact_url(str(exc))}")
    status = getattr(exc, "http_status", None)
    return AuthError(
        f"{where} failed: {type(exc).__name__}" + (f" (HTTP {status})" if status else "")
    )


def glance_access(
    *,
    cloud: str | None,
    region_name: str | None,
    interface: str | None,
    glance_url: str | None,
    token: str | None,
    ca_file: str | None,
    insecure: bool,
    environ: Mapping[str, str] = os.environ,
) -> GlanceAccess | None:
    """Glance's URL and token for the command line's options; None when nothing names Glance.

    Without a keystone cloud (``uses_keystone``), ``glance_url`` and ``token`` are used as
    given (an unauthenticated Glance needs no token). With one, the session authenticates now
    (a wrong password fails here, in one line), Glance comes from the catalog unless
    ``glance_url`` overrides it, and the token is the session's, renewed as it expires,
    unless ``token`` overrides it.
    """
    if not uses_keystone(cloud, environ):
        if glance_url is None:
            return None
        return GlanceAccess(glance_url, token, ca_file, verify_tls=not insecure)
    from keystoneauth1 import exceptions as ks
    from openstack import config as os_config
    from openstack import exceptions as os_exc

    options: dict[str, Any] = {}
    if region_name:
        options["region_name"] = region_name
    if interface:
        options["interface"] = interface
    if ca_file:
        options["cacert"] = ca_file
    if insecure:
        options["verify"] = False
    try:
        region = os_config.OpenStackConfig().get_one(cloud=cloud, **options)
    except os_exc.ConfigException as exc:
        raise InvalidInput(f"cloud config: {redact_url(str(exc))}") from None
    except ks.ClientException as exc:  # e.g. a password missing from the config
        raise AuthError(f"cloud config: {type(exc).__name__}: {redact_url(str(exc))}") from None
    session = region.get_session()

    def renewed_token() -> str | None:
        try:
            value = session.get_token()
        except ks.ClientException as exc:
            raise _auth_error(region, exc) from None
        return str(value) if value else None

    try:
        renewed_token()  # authenticate now: bad credentials are a start-up error
        url = glance_url or session.get_endpoint(
            service_type="image",
            interface=region.get_interface(),
            region_name=region.get_region_name("image"),
        )
    except ks.EndpointNotFound:
        url = None
    except ks.ClientException as exc:
        raise _auth_error(region, exc) from None
    if not url:
        raise NoGlanceEndpoint(
            f"{_where(region)}: no image (Glance) endpoint in the catalog for region "
            f"{region.get_region_name('image')!r}, interface {region.get_interface()!r} "
            "(--os-region-name, --os-interface, or --glance-url)"
        )
    verify, _ = region.get_requests_verify_args()
    return GlanceAccess(
        url=str(url).rstrip("/"),
        token=token or renewed_token,
        ca_file=ca_file or (verify if isinstance(verify, str) else None),
        verify_tls=verify is not False,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The standard keystone options, each with its standard variable."""
    parser.add_argument(
        "--os-cloud",
        default=os.environ.get("OS_CLOUD"),
        metavar="NAME",
        help="cloud in clouds.yaml to authenticate with; else the OS_AUTH_URL, OS_USERNAME... "
        "variables, if set [OS_CLOUD]",
    )
    parser.add_argument(
        "--os-region-name",
        default=os.environ.get("OS_REGION_NAME"),
        metavar="REGION",
        help="region of Glance in the catalog [OS_REGION_NAME]",
    )
    parser.add_argument(
        "--os-interface",
        default=os.environ.get("OS_INTERFACE"),
        choices=("public", "internal", "admin"),
        help="endpoint interface of Glance in the catalog [OS_INTERFACE] (default public)",
    )
