"""Glance endpoint URLs: checked before use, and cut of every secret wherever one is echoed."""

from __future__ import annotations

import re

import yarl

from pvmcache_async.errors import InvalidInput, shown

MAX_URL_LENGTH = 2048  # an endpoint, not a payload: longer is a mistake or an attack
_HOST = re.compile(r"[A-Za-z0-9._-]+|[0-9A-Fa-f:.]+")  # a DNS name or an IP literal
_AFTER_SLASHES = re.compile(r"//(\S*)")  # a URL's authority on, to the next white space
_QUERY_OR_FRAGMENT = re.compile(r"[?#]")


def redact_url(text: str) -> str:
    """``text`` with every URL in it cut to its scheme, host, port and path: no userinfo
    (``user:password@``), no query (``?token=...``) and no fragment, any of which may carry
    a secret. Every message and log line that echoes a URL passes it through here first."""

    def cut(match: re.Match[str]) -> str:
        # from the last "@": a password may hold "/", "?" or "#" that would end the authority
        rest = match[1].rpartition("@")[2]
        return "//" + _QUERY_OR_FRAGMENT.split(rest, maxsplit=1)[0]

    return _AFTER_SLASHES.sub(cut, text)


def endpoint_url(url: str) -> yarl.URL:
    """The Glance endpoint ``url`` parsed and checked, or InvalidInput saying what is wrong.

    An http(s) URL with a host, an optional port and path, no query or fragment, and no user
    name or password (refused, not stripped: Glance authenticates with a token, and the
    operator should know the credentials went nowhere). No message echoes userinfo, a query
    or a fragment (``redact_url``).
    """
    if len(url) > MAX_URL_LENGTH:
        raise InvalidInput(
            f"Glance URL is {len(url)} characters long; at most {MAX_URL_LENGTH} are accepted"
        )
    echo = shown(redact_url(url))
    try:
        base = yarl.URL(url.rstrip("/"))
        port = base.port
        host = base.raw_host
    except (ValueError, UnicodeError) as exc:
        raise InvalidInput(
            f"Glance URL {echo} is not a valid URL ({redact_url(str(exc))})"
        ) from None
    if base.scheme not in ("http", "https") or not host:
        raise InvalidInput(f"Glance URL {echo} is not an http:// or https:// URL")
    if base.user is not None or base.password is not None:
        raise InvalidInput(
            f"Glance URL {echo} has a user name or password in it; "
            "Glance takes a token (--token, OS_AUTH_TOKEN), never credentials in the URL"
        )
    if not _HOST.fullmatch(host) or len(host) > 253 or max(map(len, host.split("."))) > 63:
        raise InvalidInput(f"Glance URL {echo} does not have a valid host name")
    if not port:
        raise InvalidInput(f"Glance URL {echo} has port 0")
    if base.query_string or base.fragment:
        raise InvalidInput(f"Glance URL {echo} has a query or fragment; give the endpoint only")
    return base


def origin_of(url: yarl.URL) -> tuple[str, str | None, int | None]:
    return url.scheme, url.host, url.port
