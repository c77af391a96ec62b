"""The one streaming pass over an upload: md5 + sha512 + inspection + size cap + write.

Bytes arrive in small pieces from the event loop; they are coalesced into blocks of
:attr:`~cowfleet.images.server.settings.ServerSettings.upload_block` bytes and each block
is handed to two worker threads at once: one computes md5, feeds the inspector and
writes the block to the staging file, the other computes sha512 (hashlib releases the
GIL on large buffers, so both cores work). While a block is being processed the next
one is received, so at most about two blocks are held in memory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
from concurrent.futures import Executor, Future
from dataclasses import dataclass

from cowfleet.errors import IntegrityError
from cowfleet.formats.inspection import Inspection
from cowfleet.formats.inspector import Inspector
from cowfleet.images.server.store import StagedWrite

log = logging.getLogger(__name__)

HASH_ALGO = "sha512"


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
        executor: Executor,
        *,
        block_size: int,
        max_size: int,
    ) -> None:
        self.staged = staged
        self._executor = executor
        self._block_size = block_size
        self._max_size = max_size
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._sha = hashlib.new(HASH_ALGO)
        self._inspector = Inspector()
        self._parts: list[bytes] = []
        self._buffered = 0
        self.total = 0
        self._pending: tuple[Future[None], ...] = ()

    # Work done in the threads ------------------------------------------------------
    def _md5_inspect_write(self, block: bytes) -> None:
        self._md5.update(block)
        self._inspector.feed(block)
        self.staged.write(block)

    def _sha_update(self, block: bytes) -> None:
        self._sha.update(block)

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
        await self._wait()
        if not self._parts:
            return
        block = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._parts = []
        self._buffered = 0
        self._pending = (
            self._executor.submit(self._md5_inspect_write, block),
            self._executor.submit(self._sha_update, block),
        )

    async def _wait(self) -> None:
        # Cleared only once done: on error or cancellation abort() still waits for them.
        if self._pending:
            await asyncio.gather(*(asyncio.wrap_future(f) for f in self._pending))
            self._pending = ()

    async def finish(self) -> UploadResult:
        """Process what is buffered and return the hashes and the inspection."""
        await self._flush()
        await self._wait()
        inspection = self._inspector.finish(self.total)
        return UploadResult(
            size=self.total,
            checksum=self._md5.hexdigest(),
            os_hash_algo=HASH_ALGO,
            os_hash_value=self._sha.hexdigest(),
            inspection=inspection,
        )

    def abort(self) -> None:
        """Wait (briefly: one block) for the threads to be done with the descriptor.

        Synchronous on purpose: it must also hold when the request task is cancelled,
        so the caller can close and unlink the staging file safely afterwards.
        """
        pending, self._pending = self._pending, ()
        if pending:
            concurrent.futures.wait(pending)
        self._parts = []
