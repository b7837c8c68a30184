"""A Glance v2 client for the cache: the image record, and a streamed, verified download.

Only what the cache needs: ``get_image`` reads ``GET /v2/images/{id}`` and checks that the
image can be cached (active, raw, with data and a digest); ``download`` streams
``GET /v2/images/{id}/file`` into a sink in bounded memory and verifies the length and the
digest (``os_hash_value``, else the legacy md5 ``checksum``) as the bytes pass.

The token is sent as ``X-Auth-Token`` and appears in no message, log or repr. TLS is verified
by default. There is no total timeout (a multi-GB image may take long); a read that stalls
longer than ``read_timeout`` fails.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import ssl
from typing import Any, Protocol

import aiohttp
import yarl

from .errors import GlanceError, ImageNotFound, ImageUnavailable, IntegrityError, InvalidInput
from .models import ImageInfo

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 4 << 20
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
        token: str | None = None,
        ca_file: str | None = None,
        verify_tls: bool = True,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        base = yarl.URL(url.rstrip("/"))
        if base.scheme not in ("http", "https") or not base.host:
            raise InvalidInput(f"Glance URL {url!r} is not an http:// or https:// URL")
        if read_timeout <= 0 or connect_timeout <= 0 or chunk_size <= 0:
            raise InvalidInput("timeouts and the chunk size must be positive")
        self.url = base
        self._token = token
        self._ssl: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=ca_file) if verify_tls else False
        )
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self.chunk_size = chunk_size
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # never the token
        return f"GlanceClient({str(self.url)!r})"

    def _headers(self) -> dict[str, str]:
        return {"X-Auth-Token": self._token} if self._token else {}

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=64),
                timeout=self._timeout,
                read_bufsize=self.chunk_size,
                raise_for_status=False,
            )
        return self._session

    def _image_url(self, image_id: str, *parts: str) -> yarl.URL:
        # image_id is a validated uuid; joined as a path segment, never parsed as a URL
        return self.url.joinpath("v2", "images", image_id, *parts)

    async def get_image(self, image_id: str) -> ImageInfo:
        """The image's record, validated for caching (see ``parse_image``)."""
        try:
            async with self._http().get(self._image_url(image_id), headers=self._headers()) as resp:
                _check_status(image_id, resp.status, "image record")
                try:
                    record = await resp.json(content_type=None)
                except ValueError:
                    raise GlanceError(
                        "Glance sent an image record that is not JSON", image_id=image_id
                    ) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._transport_error(image_id, exc) from exc
        return parse_image(image_id, record)

    async def download(self, image: ImageInfo, sink: Sink) -> int:
        """Stream the image's data into ``sink``; return the bytes read.

        Raises IntegrityError when the length or the digest does not match the record; the
        sink then holds unverified data, which the caller must discard.
        """
        hasher = hashlib.new(image.digest_algo)
        received = 0
        try:
            async with self._http().get(
                self._image_url(image.id, "file"), headers=self._headers()
            ) as resp:
                _check_status(image.id, resp.status, "image data")
                content = resp.content
                while True:
                    if FULL_CHUNKS:
                        want = min(self.chunk_size, image.size - received) or 1  # 1: overflow?
                        try:
                            chunk = await content.readexactly(want)
                        except asyncio.IncompleteReadError as short:
                            chunk = short.partial  # the body ended: the length check decides
                    else:
                        chunk = await content.read(self.chunk_size)
                    if not chunk:
                        break
                    received += len(chunk)
                    if received > image.size:
                        raise IntegrityError(
                            f"Glance sent more than the image's size of {image.size} bytes",
                            image_id=image.id,
                        )
                    if HASH_IN_THREAD:
                        write = sink.write(chunk)
                        await asyncio.gather(asyncio.to_thread(hasher.update, chunk), write)
                    else:
                        hasher.update(chunk)
                        await sink.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._transport_error(image.id, exc) from exc
        if received != image.size:
            raise IntegrityError(
                f"Glance sent {received} bytes but the image's size is {image.size}",
                image_id=image.id,
            )
        actual = hasher.hexdigest()
        if actual != image.digest:
            raise IntegrityError(
                f"{image.digest_algo} checksum did not match: Glance's record says {image.digest}, "
                f"the data received hashes to {actual}",
                image_id=image.id,
            )
        return received

    def _transport_error(self, image_id: str, exc: BaseException) -> GlanceError:
        cause = str(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError):
            cause = f"timed out ({cause})" if str(exc) else "timed out"
        return GlanceError(f"talking to Glance at {self.url} failed: {cause}", image_id=image_id)

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


def _check_status(image_id: str, status: int, what: str) -> None:
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
    raise GlanceError(
        f"Glance answered HTTP {status} to the {what} request", image_id=image_id, status=status
    )
