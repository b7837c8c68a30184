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
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import aiohttp
import yarl

from .errors import GlanceError, ImageNotFound, ImageUnavailable, IntegrityError, InvalidInput
from .models import ImageInfo

log = logging.getLogger(__name__)
T = TypeVar("T")

# 2 MiB: 4 MiB chunks cost 25 MiB more RSS in a storm and bought no speed (benchmarks/README.md)
DEFAULT_CHUNK_SIZE = 2 << 20
DEFAULT_READ_TIMEOUT = 120.0
DEFAULT_CONNECT_TIMEOUT = 30.0
MAX_IMAGE_SIZE = 1 << 50  # 1 PiB: anything larger is a corrupt record, not an image
# Switches of the download loop, kept so the benchmark can measure each choice (results in
# benchmarks/README.md). Full chunks: wait for chunk_size bytes rather than take what the
# buffer holds (on loopback mostly 4 MiB anyway; less over slower links), so every thread
# hand-off moves a whole chunk.
FULL_CHUNKS = True
HASH_IN_THREAD = True  # hashlib releases the GIL on large buffers: hash beside the write
_HEX = re.compile(r"[0-9a-f]+")
_DIGEST_HEX_LEN = {"md5": 32, "sha1": 40, "sha256": 64, "sha384": 96, "sha512": 128}
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How transient failures are retried.

    ``retries`` bounds the failed attempts in a row; an attempt that received data starts the
    count afresh, so a long download survives many separate drops. The n-th wait is drawn
    from [d/2, d] with d = ``backoff`` * 2**(n-1), capped at ``max_backoff`` (a server's
    ``Retry-After`` lengthens it up to that cap).
    """

    retries: int = 5
    backoff: float = 0.5
    max_backoff: float = 20.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff < 0 or self.max_backoff < self.backoff:
            raise InvalidInput(
                "retries and backoff must not be negative, max_backoff not below backoff"
            )

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        ceiling = min(self.max_backoff, self.backoff * 2 ** min(failures - 1, 30))
        wait = random.uniform(ceiling / 2, ceiling)  # jitter: a storm's retries spread out
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_backoff))
        return wait


class _StartOver(Exception):
    """The server will not resume: ask again from byte 0 (the sink was rewound)."""


class _Cut(Exception):
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


class Sink(Protocol):
    """Where ``download`` puts the bytes (a ``storage.PartialDisk`` is one)."""

    async def write(self, chunk: bytes) -> None: ...

    async def rewind(self) -> None: ...


def parse_image(image_id: str, record: object) -> ImageInfo:
    """Validate a Glance v2 image record for caching; raise a clear error if it cannot be."""
    if not isinstance(record, dict):
        raise GlanceError(
            "Glance sent an image record that is not a JSON object", image_id=image_id
        )
    if record.get("id", image_id) != image_id:
        raise GlanceError(
            f"Glance sent the record of another image ({record.get('id')!r})", image_id=image_id
        )
    status = record.get("status")
    if status != "active":
        raise ImageUnavailable(f"is {status!r} in Glance, not 'active'", image_id=image_id)
    disk_format = record.get("disk_format")
    if disk_format != "raw":
        raise ImageUnavailable(
            f"has disk_format {disk_format!r}; only 'raw' images can be cached", image_id=image_id
        )
    size = record.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size > MAX_IMAGE_SIZE:
        raise GlanceError(f"Glance gave an invalid size {size!r}", image_id=image_id)
    if size == 0:
        raise ImageUnavailable("has no data (size 0)", image_id=image_id)
    algo, digest = _digest_of(image_id, record)
    name = record.get("name")
    return ImageInfo(
        id=image_id,
        name=name if isinstance(name, str) else None,
        size=size,
        digest_algo=algo,
        digest=digest,
    )


def _digest_of(image_id: str, record: dict[str, Any]) -> tuple[str, str]:
    candidates = [
        (record.get("os_hash_algo"), record.get("os_hash_value")),
        ("md5", record.get("checksum")),
    ]
    for algo, value in candidates:
        if isinstance(algo, str) and isinstance(value, str) and algo in _DIGEST_HEX_LEN:
            value = value.lower()
            if len(value) == _DIGEST_HEX_LEN[algo] and _HEX.fullmatch(value):
                return algo, value
    raise ImageUnavailable(
        "has no usable checksum (os_hash_value or checksum) to verify against", image_id=image_id
    )


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
    ) -> None:
        base = yarl.URL(url.rstrip("/"))
        if base.scheme not in ("http", "https") or not base.host:
            raise InvalidInput(f"Glance URL {url!r} is not an http:// or https:// URL")
        if read_timeout <= 0 or connect_timeout <= 0 or chunk_size <= 0:
            raise InvalidInput("timeouts and the chunk size must be positive")
        self.url = base
        self._token = token
        self._service_token = service_token
        self._ssl: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=ca_file) if verify_tls else False
        )
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self.chunk_size = chunk_size
        self.retry = retry or RetryPolicy()
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # never the token
        return f"GlanceClient({str(self.url)!r})"

    def _headers(self) -> dict[str, str]:
        # a callable gives the token per request: nova's come with each request context
        sent = {"X-Auth-Token": self._token, "X-Service-Token": self._service_token}
        values = {name: v() if callable(v) else v for name, v in sent.items()}
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

    async def _get_record(self, image_id: str) -> object:
        async with self._http().get(self._image_url(image_id), headers=self._headers()) as resp:
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
        async with self._http().get(
            self._image_url(image.id, "file"), headers=self._headers() | progress.range_header()
        ) as resp:
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
            except _Cut as cut:
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
        if HASH_IN_THREAD:
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
        """The next chunk of the body; empty at its end. Raises _Cut when the body breaks."""
        # a whole chunk per hand-off; asking 1 byte past the end detects an overlong body
        want = (min(self.chunk_size, left) or 1) if FULL_CHUNKS else self.chunk_size
        parts: list[bytes] = []
        got = 0
        while got < want:
            try:
                block = await content.read(want - got)
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
                raise _Cut(b"".join(parts), exc) from exc
            if not block:
                break  # the body ended: the length check decides
            parts.append(block)
            got += len(block)
            if not FULL_CHUNKS:
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
        5xx and 429 are retried up to ``retry.retries`` times in a row; any other error is
        final. ``_StartOver`` (the server will not resume) retries at once.
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
            if failures > self.retry.retries:
                raise GlanceError(
                    f"giving up on the {what} after {failures} failed attempts in a row; "
                    f"last: {cause}",
                    image_id=image_id,
                    status=status,
                )
            delay = self.retry.delay(failures, wait)
            log.info(  # not a warning: the CLI's stderr is one line, and only on failure
                "image %s: %s failed (%s); retry %d/%d in %.2f s",
                image_id, what, cause, failures, self.retry.retries, delay,
            )  # fmt: skip
            await asyncio.sleep(delay)

    def _transport_error(self, image_id: str, exc: BaseException) -> GlanceError:
        cause = str(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError):
            cause = f"timed out ({cause})" if str(exc) else "timed out"
        return GlanceError(f"talking to Glance at {self.url} failed: {cause}", image_id=image_id)

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


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
