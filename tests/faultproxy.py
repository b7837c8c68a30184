"""A fault-injecting HTTP proxy on 127.0.0.1, between the cache and the real Glance.

Each client connection carries one request: the proxy adds ``Connection: close`` before it
forwards the request on a fresh upstream connection, so Glance closes after the response and
the client never reuses the connection. A fault is therefore scripted per request, and a test
can say exactly which GET of which image it hits:

    proxy.plan(image_id, cut(after=100_000), answer(503), stall(after=0))

Each ``GET /v2/images/{image_id}/file`` takes the next planned fault of that image (a plan for
``None`` serves any image); requests without a planned fault pass through untouched. Offsets
count response *body* bytes. ``seen`` records every request, with its headers (and Range
apart), the fault applied, the status and the body bytes the client was sent. ``redirect``
answers a 3xx with a Location: a second proxy makes a second origin that records what
reaches it. A stall lasts until the test ends it: ``release_stalls`` lets the body go on,
``drop_stalls`` drops the connection (the client resumes), ``rearm_stalls`` stalls again.

``ThreadedFaultProxy`` runs one in a thread of its own, for tests that drive subprocesses.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Literal

import yarl

_RELAY_CHUNK = 64 << 10
_REASONS = {
    200: "OK",
    301: "Moved Permanently",
    302: "Found",
    307: "Temporary Redirect",
    400: "Bad Request",
    404: "Not Found",
    416: "Range Not Satisfiable",
    429: "Too Many Requests",
}


@dataclass(frozen=True)
class Fault:
    kind: Literal["cut", "stall", "flip", "answer", "ignore_range"]
    at: int = 0  # body offset: where the cut, the stall or the flipped byte is
    status: int = 503  # for "answer"
    retry_after: float | None = None  # for "answer"
    body: bytes = b"injected\n"  # for "answer"
    location: str | None = None  # for "answer": a redirect's target


def cut(after: int) -> Fault:
    """Forward ``after`` body bytes, then drop the connection."""
    return Fault("cut", at=after)


def stall(after: int) -> Fault:
    """Forward ``after`` body bytes, then send nothing until released or the client leaves."""
    return Fault("stall", at=after)


def flip(at: int) -> Fault:
    """Invert the body byte at offset ``at`` (the length stays right; the digest does not)."""
    return Fault("flip", at=at)


def answer(status: int = 503, retry_after: float | None = None, body: bytes = b"x\n") -> Fault:
    """Answer ``status`` (with ``body``) at once, without asking Glance."""
    return Fault("answer", status=status, retry_after=retry_after, body=body)


def redirect(location: str, status: int = 302) -> Fault:
    """Answer ``status`` with ``Location: location`` at once, without asking Glance."""
    return Fault("answer", status=status, location=location, body=b"")


def ignore_range() -> Fault:
    """Forward the request without its Range header: Glance answers 200 with everything."""
    return Fault("ignore_range")


@dataclass
class Seen:
    """One request that went through the proxy."""

    method: str
    path: str
    range: str | None
    fault: Fault | None
    headers: dict[str, str] = field(default_factory=dict)  # as the client sent them
    status: int | None = None
    body_sent: int = 0


@dataclass
class FaultProxy:
    upstream: str
    extra_headers: dict[str, str] = field(default_factory=dict)  # e.g. glance.MEMBER_HEADERS
    seen: list[Seen] = field(default_factory=list)
    stalled: threading.Event = field(default_factory=threading.Event)  # a stall has begun
    _plans: dict[tuple[str | None, str], deque[Fault]] = field(
        default_factory=lambda: defaultdict(deque)
    )
    _release: asyncio.Event | None = None
    _drop: bool = False  # a released stall drops its connection (drop_stalls)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    url: str = ""

    async def start(self) -> FaultProxy:
        self._release = asyncio.Event()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def plan(self, image_id: str | None, *faults: Fault, what: str = "file") -> None:
        """Queue faults for the GETs of an image's data (``what="file"``) or record
        (``what="record"``); ``image_id=None`` matches any image."""
        self._plans[(image_id, what)].extend(faults)

    def clear(self) -> None:
        """Forget every fault not yet applied."""
        self._plans.clear()

    def pending(self) -> int:
        return sum(len(q) for q in self._plans.values())

    def file_gets(self, image_id: str) -> list[Seen]:
        return [s for s in self.seen if s.path == f"/v2/images/{image_id}/file"]

    def release_stalls(self) -> None:
        """Let every stalled response go on, and every later stall pass at once, until
        ``rearm_stalls`` (call from the proxy's loop)."""
        assert self._release is not None
        self._release.set()

    def drop_stalls(self) -> None:
        """End every stalled response by dropping its connection (the client sees the body cut
        short), and every later stall too, until ``rearm_stalls`` (call from the proxy's loop)."""
        self._drop = True
        self.release_stalls()

    def rearm_stalls(self) -> None:
        """Stall again from now on, after ``release_stalls`` (call when no stall is under way)."""
        self._release = asyncio.Event()
        self._drop = False

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    def _next_fault(self, path: str) -> Fault | None:
        parts = path.split("/")  # ['', 'v2', 'images', ID] or [..., ID, 'file']
        if len(parts) not in (4, 5) or parts[1:3] != ["v2", "images"]:
            return None
        what = "file" if parts[4:] == ["file"] else "record" if len(parts) == 4 else None
        for key in ((parts[3], what), (None, what)):
            if self._plans.get(key):
                return self._plans[key].popleft()
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        # With no high-water mark, drain() returns only once the transport's own buffer is
        # empty, so the abort below never discards bytes that body_sent already counted.
        writer.transport.set_write_buffer_limits(high=0)
        try:
            await self._handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._tasks.discard(task)
            writer.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *lines = head.decode("latin-1").split("\r\n")
        method, target, _version = request_line.split(" ", 2)
        headers = [ln.split(":", 1) for ln in lines if ln]
        keep = [(k, v.strip()) for k, v in headers if k.lower() != "connection"]
        body = b""
        length = next((int(v) for k, v in keep if k.lower() == "content-length"), 0)
        if length:
            body = await reader.readexactly(length)
        path = yarl.URL(target).path
        fault = self._next_fault(path) if method == "GET" else None
        seen = Seen(
            method,
            path,
            next((v for k, v in keep if k.lower() == "range"), None),
            fault,
            headers={k.lower(): v for k, v in keep},
        )
        self.seen.append(seen)
        if fault is not None and fault.kind == "answer":
            seen.status = fault.status
            text = fault.body
            extra = "" if fault.retry_after is None else f"Retry-After: {fault.retry_after:g}\r\n"
            if fault.location is not None:
                extra += f"Location: {fault.location}\r\n"
            reason = _REASONS.get(fault.status, "Service Unavailable")
            writer.write(
                f"HTTP/1.1 {fault.status} {reason}\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(text)}\r\n{extra}Connection: close\r\n\r\n".encode()
                + text
            )
            await writer.drain()
            return

        up = yarl.URL(self.upstream)
        assert up.host is not None and up.port is not None
        up_reader, up_writer = await asyncio.open_connection(up.host, up.port)
        try:
            if fault is not None and fault.kind == "ignore_range":
                keep = [(k, v) for k, v in keep if k.lower() != "range"]
            forwarded = [*keep, *self.extra_headers.items(), ("Connection", "close")]
            up_writer.write(
                f"{method} {target} HTTP/1.1\r\n".encode("latin-1")
                + "".join(f"{k}: {v}\r\n" for k, v in forwarded).encode("latin-1")
                + b"\r\n"
                + body
            )
            await up_writer.drain()
            response_head = await up_reader.readuntil(b"\r\n\r\n")
            seen.status = int(response_head.split(b" ", 2)[1])
            writer.write(response_head)
            await self._relay_body(up_reader, reader, writer, fault, seen)
        finally:
            up_writer.transport.abort()

    async def _relay_body(
        self,
        up_reader: asyncio.StreamReader,
        client: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        fault: Fault | None,
        seen: Seen,
    ) -> None:
        while True:
            if fault is not None and fault.kind in ("cut", "stall") and seen.body_sent >= fault.at:
                await writer.drain()
                if fault.kind == "cut":
                    return  # the caller aborts the connection
                await self._stall(client)
                fault = None  # released: the rest passes through
            limit = _RELAY_CHUNK
            if fault is not None and fault.kind in ("cut", "stall"):
                limit = min(limit, fault.at - seen.body_sent)
            chunk = await up_reader.read(limit)
            if not chunk:
                await writer.drain()
                return
            if fault is not None and fault.kind == "flip":
                at = fault.at - seen.body_sent
                if 0 <= at < len(chunk):
                    chunk = chunk[:at] + bytes([chunk[at] ^ 0xFF]) + chunk[at + 1 :]
            writer.write(chunk)
            seen.body_sent += len(chunk)
            await writer.drain()

    async def _stall(self, client: asyncio.StreamReader) -> None:
        assert self._release is not None
        self.stalled.set()
        gone = asyncio.ensure_future(client.read(1))  # b"" when the client hangs up
        released = asyncio.ensure_future(self._release.wait())
        try:
            await asyncio.wait({gone, released}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            released.cancel()
        if not released.done() or released.cancelled():
            raise ConnectionResetError("the client left a stalled response")
        if self._drop:
            raise ConnectionResetError("the test dropped a stalled response")


class ThreadedFaultProxy:
    """A ``FaultProxy`` served from a thread of its own (for tests that drive subprocesses)."""

    def __init__(self, upstream: str) -> None:
        self.proxy = FaultProxy(upstream)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return self.proxy.url

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.proxy.start(), self._loop).result(10)
        return self.proxy

    def release_stalls(self) -> None:
        self._loop.call_soon_threadsafe(self.proxy.release_stalls)

    def drop_stalls(self) -> None:
        self._loop.call_soon_threadsafe(self.proxy.drop_stalls)

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
