"""The one streaming pass over an upload: md5 + sha512 + inspection + size cap + write.

Bytes arrive in pieces from the event loop; they are gathered (without copying) into
blocks of :attr:`~cowfleet.images.server.settings.ServerSettings.upload_block` bytes and
each block is handed to three worker threads (lanes) of this upload: one computes md5
and feeds the inspector, one computes sha512, one writes the block to the staging file
(one ``writev``). hashlib releases the GIL on large buffers and so does ``writev``, so
the lanes run on every core; writing gets its own lane because copying into the page
cache is as costly as a hash here (first-touch of page-cache memory in this VM: about
2.5 CPU-s per fresh GiB), and behind md5 it made that lane the bottleneck.
Each lane takes blocks in order; the lanes are not in lock step, so a lane that the
scheduler delays a moment catches up later. At most ``max_in_flight`` blocks wait in
the lanes, which bounds memory (about ``(max_in_flight + 1) * block_size``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from cowfleet.errors import IntegrityError
from cowfleet.formats.inspection import Inspection
from cowfleet.formats.inspector import Inspector
from cowfleet.images.server.store import StagedWrite

log = logging.getLogger(__name__)

HASH_ALGO = "sha512"
# Pieces handed over as they arrived (no copy into one block) up to this many per block.
MAX_PARTS = 256
# Blocks queued in the lanes before the receiver waits.
MAX_IN_FLIGHT = 4


@dataclass(frozen=True)
class UploadResult:
    size: int
    checksum: str  # md5 hex
    os_hash_algo: str
    os_hash_value: str
    inspection: Inspection


def too_large(size: int, cap: int, image_id: str) -> IntegrityError:
    return IntegrityError(
        f"image {image_id}: upload of more than {cap} bytes refused (size cap)",
        http_status=413,
        image_id=image_id,
        size=size,
        cap=cap,
    )


class UploadPipeline:
    """Feed chunks with :meth:`feed`, then :meth:`finish`; :meth:`abort` on any failure."""

    def __init__(
        self,
        staged: StagedWrite,
        *,
        block_size: int,
        max_size: int,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self.staged = staged
        self._block_size = block_size
        self._max_size = max_size
        self._max_in_flight = max_in_flight
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._sha = hashlib.new(HASH_ALGO)
        self._inspector = Inspector()
        self._parts: list[bytes] = []
        self._buffered = 0
        self.total = 0
        # One thread per lane keeps each hash (and the file) fed in order.
        self._lanes = (
            (ThreadPoolExecutor(1, thread_name_prefix="cowfleet-md5"), self._md5_inspect),
            (ThreadPoolExecutor(1, thread_name_prefix="cowfleet-sha"), self._sha_update),
            (ThreadPoolExecutor(1, thread_name_prefix="cowfleet-write"), self.staged.write_parts),
        )
        self._in_flight: deque[tuple[Future[None], ...]] = deque()

    # Work done in the lanes --------------------------------------------------------
    def _md5_inspect(self, parts: list[bytes]) -> None:
        # The inspector sees every byte in order: once done it keeps only the tail.
        for part in parts:
            self._md5.update(part)
            self._inspector.feed(part)

    def _sha_update(self, parts: list[bytes]) -> None:
        for part in parts:
            self._sha.update(part)

    # Event-loop side -----------------------------------------------------------------
    async def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.total += len(chunk)
        if self.total > self._max_size:
            raise too_large(self.total, self._max_size, self.staged.image_id)
        self._parts.append(chunk)
        self._buffered += len(chunk)
        if self._buffered >= self._block_size:
            await self._flush()

    async def _flush(self) -> None:
        while len(self._in_flight) >= self._max_in_flight:
            await self._wait_oldest()
        if not self._parts:
            return
        parts = self._parts
        if len(parts) > MAX_PARTS:  # many tiny pieces: one buffer is cheaper to hash
            parts = [b"".join(parts)]
        self._parts = []
        self._buffered = 0
        self._in_flight.append(tuple(lane.submit(work, parts) for lane, work in self._lanes))

    async def _wait_oldest(self) -> None:
        # Removed only once done: on error or cancellation abort() still waits for it.
        await asyncio.gather(*(asyncio.wrap_future(f) for f in self._in_flight[0]))
        self._in_flight.popleft()

    async def finish(self) -> UploadResult:
        """Process what is buffered and return the hashes and the inspection."""
        await self._flush()
        while self._in_flight:
            await self._wait_oldest()
        self._close_lanes()
        inspection = self._inspector.finish(self.total)
        return UploadResult(
            size=self.total,
            checksum=self._md5.hexdigest(),
            os_hash_algo=HASH_ALGO,
            os_hash_value=self._sha.hexdigest(),
            inspection=inspection,
        )

    def abort(self) -> None:
        """Stop the lanes and wait (briefly) until no thread uses the descriptor.

        Synchronous on purpose: it must also hold when the request task is cancelled,
        so the caller can close and unlink the staging file safely afterwards.
        """
        futures = [f for block in self._in_flight for f in block]
        self._in_flight.clear()
        for f in futures:
            f.cancel()  # not started yet: never runs
        concurrent.futures.wait(futures)
        self._close_lanes()
        self._parts = []

    def _close_lanes(self) -> None:
        for lane, _work in self._lanes:
            lane.shutdown(wait=True)
