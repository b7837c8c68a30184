"""Glance at the client's interface, scripted by the test: no HTTP, no server.

``ImageCache`` calls three methods of its ``GlanceClient``: ``get_image`` (the validated
record), ``download`` (the data into a sink, verified: length and digest) and ``close``.
``ScriptedGlance`` answers the same three calls from images the test adds, and keeps the
client's contract: ``download`` writes the bytes into the sink in chunks, verifies the length
and the digest against the record as they pass, raises ``IntegrityError`` when either does
not match (the sink then holds unverified data), and returns the bytes it fetched (a restart
from byte 0 fetches again and counts again).

A test scripts one download of an image with ``plan``: the next download of that image meets
the given steps, in order, each at a byte offset:

* ``hold(at)``: the download stops after ``at`` bytes until the test releases it
  (``Hold.reached`` is set once it stops there: the test waits on it, then acts);
* ``fail(at, error)``: the download raises ``error`` after ``at`` bytes (a Glance that gave up);
* ``restart(at)``: after ``at`` bytes the server would not resume: the sink is rewound and the
  data sent again from byte 0, as ``GlanceClient`` does on a 200 or 416 to its ``Range``.

What the client does at the HTTP level (resuming with ``Range``, retrying 5xx, redirects,
tokens) is not here: a resume is invisible at this interface, and those are tested against a
real Glance behind the fault proxy (tests/integration/test_faults.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field

from pvmcache_async.errors import ImageNotFound, IntegrityError
from pvmcache_async.models import ImageInfo
from pvmcache_async.storage.base import Sink

CHUNK = 16 << 10


@dataclass
class Hold:
    """Stop after ``at`` bytes until ``release``; ``reached`` is set once stopped there."""

    at: int
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self) -> None:
        self.released.set()


@dataclass
class Fail:
    """Raise ``error`` after ``at`` bytes."""

    at: int
    error: Exception


@dataclass
class Restart:
    """After ``at`` bytes, rewind the sink and send everything again from byte 0."""

    at: int


Step = Hold | Fail | Restart


def hold(at: int = 0) -> Hold:
    return Hold(at)


def fail(error: Exception, at: int = 0) -> Fail:
    return Fail(at, error)


def restart(at: int) -> Restart:
    return Restart(at)


class ScriptedGlance:
    """What ``ImageCache`` asks of a ``GlanceClient``, answered from the test's images."""

    def __init__(self, chunk: int = CHUNK) -> None:
        self.chunk = chunk
        self.records: dict[str, ImageInfo] = {}
        self.data: dict[str, bytes] = {}  # what a download sends (may differ from the record)
        self.record_errors: dict[str, Exception] = {}
        self.record_requests: Counter[str] = Counter()
        self.downloads: Counter[str] = Counter()  # downloads started, per image
        self._plans: dict[str, deque[list[Step]]] = defaultdict(deque)
        self.closed = False

    def add(
        self,
        data: bytes,
        *,
        image_id: str | None = None,
        sends: bytes | None = None,
        algo: str = "sha256",
    ) -> str:
        """Add an image whose record describes ``data``; return its id. ``sends``: what its
        downloads send instead (a corrupt or short body)."""
        image_id = image_id or str(uuid.uuid4())
        digest = hashlib.new(algo, data).hexdigest()
        self.records[image_id] = ImageInfo(image_id, "scripted", len(data), algo, digest)
        self.data[image_id] = data if sends is None else sends
        return image_id

    def plan(self, image_id: str, *steps: Step) -> None:
        """Script the next download of the image (each call scripts one more download)."""
        self._plans[image_id].append(sorted(steps, key=lambda s: s.at))

    def fail_record(self, image_id: str, error: Exception) -> None:
        """``get_image`` of this image raises ``error`` (once)."""
        self.record_errors[image_id] = error

    async def get_image(self, image_id: str) -> ImageInfo:
        self.record_requests[image_id] += 1
        await asyncio.sleep(0)
        if (error := self.record_errors.pop(image_id, None)) is not None:
            raise error
        if image_id not in self.records:
            raise ImageNotFound("not found in Glance (unknown or deleted)", image_id=image_id)
        return self.records[image_id]

    async def download(self, image: ImageInfo, sink: Sink) -> int:
        self.downloads[image.id] += 1
        steps = deque(self._plans[image.id].popleft() if self._plans[image.id] else [])
        body = self.data[image.id]
        fetched = 0
        hasher = hashlib.new(image.digest_algo)
        pos = 0
        while pos < len(body):
            step = steps[0] if steps else None
            if step is not None and step.at <= pos:
                steps.popleft()
                if isinstance(step, Hold):
                    step.reached.set()
                    await step.released.wait()
                elif isinstance(step, Fail):
                    raise step.error
                else:  # Restart: the server will not resume
                    await sink.rewind()
                    hasher = hashlib.new(image.digest_algo)
                    pos = 0
                continue
            end = min(len(body), pos + self.chunk, step.at if step is not None else len(body))
            chunk = body[pos:end]
            hasher.update(chunk)
            await sink.write(chunk)
            pos, fetched = end, fetched + len(chunk)
        for step in steps:  # steps at the very end of the body
            if isinstance(step, Hold):
                step.reached.set()
                await step.released.wait()
            elif isinstance(step, Fail):
                raise step.error
        if pos != image.size:
            raise IntegrityError(
                f"Glance sent {pos} bytes but the image's size is {image.size}", image_id=image.id
            )
        if hasher.hexdigest() != image.digest:
            raise IntegrityError(f"{image.digest_algo} checksum did not match", image_id=image.id)
        return fetched

    async def close(self) -> None:
        self.closed = True
