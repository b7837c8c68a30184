"""A Glance v2 client for the cache: the image record, and a streamed, verified download.

Only what the cache needs: ``get_image`` reads ``GET /v2/images/{id}`` and checks that the
image can be cached (active, raw, with data and a digest); ``download`` streams
``GET /v2/images/{id}/file`` into a sink in bounded memory and verifies the length and the
digest (``os_hash_value``, else the legacy md5 ``checksum``) as the bytes pass.

Faults: a transfer that drops or stalls resumes from the last byte written with
``Range: bytes=N-`` (206 with a matching ``Content-Range``); a server that ignores the range
(200) or refuses it (400, 416) makes it start over from byte 0 with a fresh digest. Connect
errors, resets, truncated bodies, read timeouts, 5xx and 429 are retried with exponential
backoff and jitter, a bounded number of times in a row (``RetryPolicy``); other 4xx are final.

The token is sent as ``X-Auth-Token`` (and a service token, where given, as
``X-Service-Token``); neither appears in any message, log or repr. TLS is verified
by default. There is no total timeout (a multi-GB image may take long); a read that stalls
longer than ``read_timeout`` fails.

Secrets and origins: an endpoint URL with a user name or password in it is refused (Glance
takes a token, and the URL is echoed in messages), so no URL the client holds or prints
carries userinfo; nor a query or fragment, refused likewise. Every URL a message echoes
passes through ``redact_url`` (the endpoint as given, a redirect's Location). Redirects are
followed only within the endpoint's origin (scheme, host, port), with the tokens; a redirect
to any other origin is refused, so no token ever reaches a server other than the configured
one.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import yarl

from pvmcache_async.errors import (
    GlanceError,
    ImageNotFound,
    ImageUnavailable,
    IntegrityError,
    InvalidInput,
    shown,
)
from pvmcache_async.glance.records import parse_image
from pvmcache_async.glance.retry import RetryPolicy
from pvmcache_async.glance.urls import endpoint_url, origin_of, redact_url
from pvmcache_async.models import ImageInfo
from pvmcache_async.storage.base import Sink

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_CHUNK_SIZE = 2 << 20  # why not larger: benchmarks/README.md (peak RSS)
DEFAULT_READ_TIMEOUT = 120.0
DEFAULT_CONNECT_TIMEOUT = 30.0
MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_TOKEN = re.compile(r"[!-~]+")  # visible ASCII: what an HTTP header value can carry as is
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True, slots=True)
class DownloadTuning:
    """How the download loop hands each chunk on; the defaults are the product's.

    The benchmark passes the alternatives to measure each choice (``storm --speed``).
    """

    # wait for a whole chunk_size before handing it on, rather than take what the socket's
    # buffer holds: every hand-off to a thread moves a whole chunk
    full_chunks: bool = True
    # hash in a worker thread beside the write (hashlib releases the GIL on large buffers),
    # rather than on the event loop's thread before it
    hash_in_thread: bool = True


class _StartOver(Exception):
    """The server will not resume: ask again from byte 0 (the sink was rewound)."""


class CutShort(Exception):
    """The body broke off mid-chunk: ``partial`` arrived before ``cause``."""

    def __init__(self, partial: bytes, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.partial = partial
        self.cause = cause


class _TransientStatus(GlanceError):
    """A 5xx or 429 answer: worth another try."""

    def __init__(self, message: str, *, image_id: str, status: int, retry_after: float | None):
        self.retry_after = retry_after
        super().__init__(message, image_id=image_id, status=status)


class GlanceClient:
    """An aiohttp client for one Glance v2 endpoint. Use one per event loop; close it."""

    def __init__(
        self,
        url: str,
        *,
        token: str | Callable[[], str | None] | None = None,
        service_token: str | Callable[[], str | None] | None = None,
        ca_file: str | None = None,
        verify_tls: bool = True,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        retry: RetryPolicy | None = None,
        tuning: DownloadTuning | None = None,
    ) -> None:
        self.url = endpoint_url(url)
        for name, seconds in (("read", read_timeout), ("connect", connect_timeout)):
            if not (math.isfinite(seconds) and seconds > 0):
                raise InvalidInput(
                    f"the {name} timeout must be a positive number of seconds, not {seconds!r}"
                )
        if chunk_size <= 0:
            raise InvalidInput(f"the chunk size must be positive, not {chunk_size!r}")
        self._token = token
        self._service_token = service_token
        self._ssl: ssl.SSLContext | bool = _tls_context(ca_file) if verify_tls else False
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self.chunk_size = chunk_size
        self.retry = retry or RetryPolicy()
        self.tuning = tuning or DownloadTuning()
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # never the token
        return f"GlanceClient({str(self.url)!r})"

    def _headers(self, image_id: str) -> dict[str, str]:
        # a callable gives the token per request: nova's come with each request context
        sent = {"X-Auth-Token": self._token, "X-Service-Token": self._service_token}
        values = {name: v() if callable(v) else v for name, v in sent.items()}
        for name, value in values.items():
            if value and not _TOKEN.fullmatch(value):  # named, never shown
                raise InvalidInput(
                    f"the token for {name} has characters an HTTP header cannot carry "
                    "(spaces, line breaks or non-ASCII)",
                    image_id=image_id,
                )
        return {name: v for name, v in values.items() if v}

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=64),
                timeout=self._timeout,
                # aiohttp reads ahead up to twice this (plus one socket read) and drops what
                # it holds when the connection breaks: keep it well under a chunk
                read_bufsize=_read_bufsize(self.chunk_size),
                raise_for_status=False,
            )
        return self._session

    def _image_url(self, image_id: str, *parts: str) -> yarl.URL:
        # image_id is a validated uuid; joined as a path segment, never parsed as a URL
        return self.url.joinpath("v2", "images", image_id, *parts)

    async def get_image(self, image_id: str) -> ImageInfo:
        """The image's record, validated for caching (see ``parse_image``)."""
        record = await self._retrying(image_id, "image record", lambda: self._get_record(image_id))
        return parse_image(image_id, record)

    @asynccontextmanager
    async def _get(
        self, image_id: str, what: str, url: yarl.URL, headers: dict[str, str]
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """GET ``url``, following redirects within the endpoint's origin only.

        aiohttp would forward X-Auth-Token to any host a redirect names (it drops only
        ``Authorization``), so redirects are followed here: to the same origin with the
        headers, to another origin never (a final GlanceError naming the target's origin).
        """
        for _ in range(MAX_REDIRECTS + 1):
            async with self._http().get(url, headers=headers, allow_redirects=False) as resp:
                if resp.status not in _REDIRECTS:
                    yield resp
                    return
                url = self._redirect_target(image_id, what, resp)
        raise GlanceError(
            f"Glance redirected the {what} request more than {MAX_REDIRECTS} times",
            image_id=image_id,
        )

    def _redirect_target(self, image_id: str, what: str, resp: aiohttp.ClientResponse) -> yarl.URL:
        location = resp.headers.get("Location", "")
        try:
            target = resp.url.join(yarl.URL(location)).with_user(None)
            origin = origin_of(target)
        except (ValueError, UnicodeError):
            target, origin = None, None
        if not location or target is None or not target.host:
            raise GlanceError(
                f"Glance answered HTTP {resp.status} to the {what} request with no usable "
                f"Location ({shown(redact_url(location))})",
                image_id=image_id,
                status=resp.status,
            )
        if origin != origin_of(self.url):
            raise GlanceError(
                f"Glance redirected the {what} request to {target.origin()}, another origin "
                f"than {self.url.origin()}; not followed, so the token is not sent there",
                image_id=image_id,
                status=resp.status,
            )
        log.debug("image %s: %s redirected within Glance (HTTP %d)", image_id, what, resp.status)
        return target

    async def _get_record(self, image_id: str) -> object:
        url = self._image_url(image_id)
        async with self._get(image_id, "image record", url, self._headers(image_id)) as resp:
            _check_status(image_id, resp.status, "image record", resp.headers)
            try:
                return await resp.json(content_type=None)
            except ValueError:
                raise GlanceError(
                    "Glance sent an image record that is not JSON", image_id=image_id
                ) from None

    async def download(self, image: ImageInfo, sink: Sink) -> int:
        """Stream the image's data into ``sink``; return the bytes it received from Glance.

        That is the image's size, plus whatever a restart from byte 0 fetched again (a resume
        re-reads only what aiohttp had read ahead, at most twice its read buffer plus one socket
        read: less than one chunk at the default size; that is not counted).

        A dropped or stalled transfer resumes where the sink ends (``Range``), or starts over
        when the server ignores or refuses ranges; transient failures are retried (see
        ``RetryPolicy``). The digest covers the whole image across resumes. Raises
        IntegrityError when the length or the digest does not match the record; the sink then
        holds unverified data, which the caller must discard.
        """
        progress = _Progress(image, hashlib.new(image.digest_algo))
        await self._retrying(
            image.id, "image data", lambda: self._fetch(progress, sink), lambda: progress.fetched
        )
        if progress.written != image.size:
            raise IntegrityError(
                f"Glance sent {progress.written} bytes but the image's size is {image.size}",
                image_id=image.id,
            )
        actual = progress.hasher.hexdigest()
        if actual != image.digest:
            raise IntegrityError(
                f"{image.digest_algo} checksum did not match: Glance's record says {image.digest}, "
                f"the data received hashes to {actual}",
                image_id=image.id,
            )
        return progress.fetched

    async def _fetch(self, progress: _Progress, sink: Sink) -> None:
        """One GET of the image's data, from where the sink ends, streamed into the sink."""
        image = progress.image
        if progress.written == image.size:
            return  # all there before the connection dropped: the digest decides
        url = self._image_url(image.id, "file")
        headers = self._headers(image.id) | progress.range_header()
        async with self._get(image.id, "image data", url, headers) as resp:
            if not await progress.accept(resp.status, resp.headers, sink):
                raise _StartOver()
            _check_status(image.id, resp.status, "image data", resp.headers)
            await self._stream(resp, progress, sink)

    async def _stream(self, resp: aiohttp.ClientResponse, progress: _Progress, sink: Sink) -> None:
        """The chunk loop: hash and write each chunk as it arrives."""
        image = progress.image
        while True:
            try:
                chunk = await self._next_chunk(resp.content, image.size - progress.written)
            except CutShort as cut:
                # keep what arrived before the drop, so that the resume re-reads only what
                # aiohttp had buffered beyond it (bounded by read_bufsize, see _http)
                if cut.partial:
                    await self._take(progress, sink, cut.partial)
                raise cut.cause from None
            if not chunk:
                return
            await self._take(progress, sink, chunk)

    async def _take(self, progress: _Progress, sink: Sink, chunk: bytes) -> None:
        """Hash and write one chunk, then count it."""
        if progress.written + len(chunk) > progress.image.size:
            raise IntegrityError(
                f"Glance sent more than the image's size of {progress.image.size} bytes",
                image_id=progress.image.id,
            )
        if self.tuning.hash_in_thread:
            await asyncio.gather(
                asyncio.to_thread(progress.hasher.update, chunk), sink.write(chunk)
            )
        else:
            progress.hasher.update(chunk)
            await sink.write(chunk)
        # counted only once both are done: a drop mid-write resumes before this chunk
        progress.written += len(chunk)
        progress.fetched += len(chunk)

    async def _next_chunk(self, content: aiohttp.StreamReader, left: int) -> bytes:
        """The next chunk of the body; empty at its end. Raises CutShort when the body breaks."""
        # a whole chunk per hand-off; asking 1 byte past the end detects an overlong body
        full = self.tuning.full_chunks
        want = (min(self.chunk_size, left) or 1) if full else self.chunk_size
        parts: list[bytes] = []
        got = 0
        while got < want:
            try:
                block = await content.read(want - got)
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
                raise CutShort(b"".join(parts), exc) from exc
            if not block:
                break  # the body ended: the length check decides
            parts.append(block)
            got += len(block)
            if not full:
                break
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _retrying(
        self,
        image_id: str,
        what: str,
        attempt: Callable[[], Awaitable[T]],
        received: Callable[[], int] = lambda: 0,
    ) -> T:
        """Run ``attempt`` until it succeeds, retrying transient failures with backoff.

        Transport errors (refused or reset connections, truncated bodies, read timeouts),
        5xx and 429 are retried until ``retry.retries`` attempts in a row have failed; any
        other error is final. ``_StartOver`` (the server will not resume) retries at once.
        """
        failures = 0
        while True:
            mark = received()
            try:
                return await attempt()
            except _StartOver:
                continue
            except _TransientStatus as exc:
                cause, status, wait = exc.message, exc.status, exc.retry_after
            except aiohttp.ClientSSLError as exc:  # a certificate does not heal by waiting
                raise self._transport_error(image_id, exc) from exc
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
                cause, status, wait = self._transport_error(image_id, exc).message, None, None
            except aiohttp.ClientError as exc:
                raise self._transport_error(image_id, exc) from exc
            failures = 1 if received() != mark else failures + 1  # progress restarts the count
            if failures >= self.retry.retries:
                attempts = f"{failures} failed attempt" + ("s" if failures > 1 else "")
                raise GlanceError(
                    f"giving up on the {what} after {attempts} in a row; last: {cause}",
                    image_id=image_id,
                    status=status,
                )
            delay = self.retry.delay(failures, wait)
            log.info(  # not a warning: the CLI's stderr is one line, and only on failure
                "image %s: %s failed (%s): failed attempt %d of %d in a row; next in %.2f s",
                image_id, what, cause, failures, self.retry.retries, delay,
            )  # fmt: skip
            await asyncio.sleep(delay)

    def _transport_error(self, image_id: str, exc: BaseException) -> GlanceError:
        cause = redact_url(str(exc)) or type(exc).__name__  # aiohttp's may hold a URL
        if isinstance(exc, TimeoutError):
            cause = f"timed out ({cause})" if str(exc) else "timed out"
        return GlanceError(f"talking to Glance at {self.url} failed: {cause}", image_id=image_id)

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


def _tls_context(ca_file: str | None) -> ssl.SSLContext:
    """The context that verifies Glance's certificate; a CA file that cannot be used is a
    clear error now rather than a failed handshake later."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except ssl.SSLError as exc:  # an OSError too: first
        raise InvalidInput(
            f"CA file {shown(ca_file)} holds no usable certificate ({exc.reason})"
        ) from None
    except OSError as exc:
        cause = exc.strerror or str(exc)
        raise InvalidInput(f"CA file {shown(ca_file)} cannot be read ({cause})") from None


def _read_bufsize(chunk_size: int) -> int:
    return max(16 << 10, min(chunk_size // 8, 256 << 10))


class _Progress:
    """What one download has put into its sink, across resumes and restarts."""

    def __init__(self, image: ImageInfo, hasher: Any) -> None:
        self.image = image
        self.hasher = hasher  # covers exactly the bytes the sink holds
        self.written = 0  # bytes in the sink
        self.fetched = 0  # bytes read from Glance in all, re-downloads included
        self.ranges = True  # False once the server mishandled a range: always from 0
        self._ranged = False

    def range_header(self) -> dict[str, str]:
        self._ranged = self.written > 0 and self.ranges
        return {"Range": f"bytes={self.written}-"} if self._ranged else {}

    async def accept(self, status: int, headers: Mapping[str, str], sink: Sink) -> bool:
        """Check the answer to a GET against the range asked for; False: ask again from 0.

        Rewinds the sink and the digest whenever the body will not continue where the
        sink ends.
        """
        if not self._ranged:
            if status == 206:  # a part we did not ask for would corrupt the image silently
                raise GlanceError(
                    "Glance answered 206 to a request without Range", image_id=self.image.id
                )
            return True
        if status == 206 and _content_range(headers) == (self.written, self.image.size):
            return True
        if status not in (200, 206, 400, 416):
            return True  # a failure to resume: retried as it stands, from the same byte
        log.info(
            "image %s: Glance answered %d to Range bytes=%d-; starting over from byte 0",
            self.image.id, status, self.written,
        )  # fmt: skip
        await sink.rewind()
        self.hasher = hashlib.new(self.image.digest_algo)
        self.written = 0
        if status == 200:
            return True  # the body is the whole image
        self.ranges = False  # refused, or a range other than the one asked for
        return False


def _content_range(headers: Mapping[str, str]) -> tuple[int, int] | None:
    """(first byte, total size) from ``Content-Range: bytes first-last/total``."""
    match = _CONTENT_RANGE.fullmatch(headers.get("Content-Range", "").strip())
    if not match or match[3] == "*" or int(match[2]) != int(match[3]) - 1:
        return None
    return int(match[1]), int(match[3])


def _retry_after(headers: Mapping[str, str]) -> float | None:
    try:
        value = float(headers.get("Retry-After", ""))
    except ValueError:
        return None  # absent, or an HTTP date: our own backoff applies
    return value if value >= 0 else None


def _check_status(
    image_id: str, status: int, what: str, headers: Mapping[str, str] | None = None
) -> None:
    if status in (200, 206):
        return
    if status == 204:
        raise ImageUnavailable("has no data in Glance (HTTP 204)", image_id=image_id, status=status)
    if status == 404:
        raise ImageNotFound(
            "not found in Glance (unknown or deleted)", image_id=image_id, status=status
        )
    if status == 403:
        raise ImageUnavailable(
            f"Glance refused the {what} (HTTP 403: deactivated, or not allowed for this token)",
            image_id=image_id,
            status=status,
        )
    if status == 401:
        raise GlanceError(
            f"Glance refused the {what} (HTTP 401: missing or invalid token)",
            image_id=image_id,
            status=status,
        )
    if status >= 500 or status == 429:
        raise _TransientStatus(
            f"Glance answered HTTP {status} to the {what} request",
            image_id=image_id,
            status=status,
            retry_after=_retry_after(headers or {}),
        )
    raise GlanceError(
        f"Glance answered HTTP {status} to the {what} request", image_id=image_id, status=status
    )
