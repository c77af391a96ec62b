"""The one streaming pass over an upload: md5 + sha512 + hash tree + inspection + size
cap + write.

Bytes are copied as they arrive into blocks of
:attr:`~cowfleet.images.server.settings.ServerSettings.upload_block` bytes taken from a
:class:`BlockPool`; each full block is handed to three worker threads (lanes) of this
upload: one computes md5 and feeds the inspector, one computes sha512 and the sha256
hash tree (:mod:`cowfleet.hashtree`), one writes the block to the staging file.
hashlib and ``write`` release the GIL on large buffers, so the lanes run on every core.
Each lane takes blocks in order; the lanes are not in lock step, so a lane that the
scheduler delays a moment catches up later. At most ``max_in_flight`` blocks wait in
the lanes, which bounds memory (``max_in_flight + 1`` blocks per upload); a block goes
back to the pool once every lane is done with it.

Why a pool of reused blocks rather than the pieces as they arrived: on a VM that hands
free memory back to its host, every fresh page costs a fault on the host (measured here:
1 GiB of fresh allocations costs about 1.5 CPU-s more than reusing the same memory),
and the receive path of an ASGI server allocates a new buffer for every piece. One
memcpy into memory already in use costs about 0.1 CPU-s per GiB. A contiguous block also
means one hash update and one ``write`` per block, whatever size the pieces had.

Bytes come in one of two ways: :meth:`UploadPipeline.feed` (async, on the event loop,
for the pieces of an ASGI request body) or :meth:`UploadPipeline.fill` (blocking, in a
receiver thread reading the socket straight into the blocks; see
:mod:`cowfleet.images.server.body`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import mmap
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from cowfleet.errors import IntegrityError
from cowfleet.formats.inspection import Inspection
from cowfleet.formats.inspector import Inspector
from cowfleet.hashtree import DEFAULT_LEAF_SIZE, Tree, TreeBuilder
from cowfleet.images.server.store import StagedWrite

log = logging.getLogger(__name__)

HASH_ALGO = "sha512"
# Blocks queued in the lanes before the receiver waits.
MAX_IN_FLIGHT = 4
# Idle blocks a pool keeps for the next upload (the rest are unmapped).
POOL_KEEP = MAX_IN_FLIGHT + 2


@dataclass(frozen=True)
class UploadResult:
    size: int
    checksum: str  # md5 hex
    os_hash_algo: str
    os_hash_value: str
    inspection: Inspection
    tree: Tree  # sha256 hash tree (leaf list stored next to the image, root published)


def check_qcow2_tables(staged: StagedWrite) -> None:
    """Check the staged qcow2's table entries on disk (the stream judged only its header).

    Raises :class:`~cowfleet.errors.UnsafeImageError` (415) naming the table and offset.
    """
    from cowfleet.formats.qcow2_tables import check_file

    staged.finish()  # O_DIRECT: the buffered tail must be in the file first
    check_file(staged.path, image_id=staged.image_id)


def too_large(size: int, cap: int, image_id: str) -> IntegrityError:
    return IntegrityError(
        f"image {image_id}: upload of more than {cap} bytes refused (size cap)",
        http_status=413,
        image_id=image_id,
        size=size,
        cap=cap,
    )


class BlockPool:
    """Upload blocks (anonymous, page-aligned mappings) reused from one upload to the next.

    Thread-safe. At most ``keep`` idle blocks are kept; a block given back beyond that
    is dropped (unmapped once nothing refers to it).
    """

    def __init__(self, block_size: int, keep: int = POOL_KEEP) -> None:
        if block_size <= 0:
            raise ValueError(f"block size must be positive, not {block_size}")
        self.block_size = block_size
        self.keep = keep
        self._idle: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def get(self) -> mmap.mmap:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return mmap.mmap(-1, self.block_size)

    def put(self, block: mmap.mmap) -> None:
        with self._lock:
            if len(self._idle) < self.keep:
                self._idle.append(block)

    @property
    def idle(self) -> int:
        with self._lock:
            return len(self._idle)


# A block handed to the lanes: its buffer and one future per lane.
_InFlight = tuple[mmap.mmap, tuple["Future[None]", ...]]


class UploadPipeline:
    """Put bytes in with :meth:`feed` or :meth:`fill`, then :meth:`finish`;
    :meth:`abort` on any failure (it gives the blocks back to the pool too)."""

    def __init__(
        self,
        staged: StagedWrite,
        *,
        pool: BlockPool,
        max_size: int,
        max_in_flight: int = MAX_IN_FLIGHT,
        tree_leaf_size: int = DEFAULT_LEAF_SIZE,
    ) -> None:
        self.staged = staged
        self._pool = pool
        self._max_size = max_size
        self._max_in_flight = max_in_flight
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._sha = hashlib.new(HASH_ALGO)
        self._tree = TreeBuilder(tree_leaf_size)
        self._inspector = Inspector()
        self._block: mmap.mmap | None = None  # being filled
        self._used = 0  # bytes of _block filled
        self.total = 0
        # One thread per lane keeps each hash (and the file) fed in order.
        self._lanes = (
            (ThreadPoolExecutor(1, thread_name_prefix="cowfleet-md5"), self._md5_inspect),
            (ThreadPoolExecutor(1, thread_name_prefix="cowfleet-sha"), self._sha_tree_update),
            (ThreadPoolExecutor(1, thread_name_prefix="cowfleet-write"), self._write),
        )
        self._in_flight: deque[_InFlight] = deque()

    # Work done in the lanes --------------------------------------------------------
    def _md5_inspect(self, block: mmap.mmap, n: int) -> None:
        # The inspector sees every byte in order and copies what it keeps.
        with memoryview(block) as whole, whole[:n] as view:
            self._md5.update(view)
            self._inspector.feed(view)

    def _sha_tree_update(self, block: mmap.mmap, n: int) -> None:
        # sha256 with SHA-NI costs about half of sha512: this lane stays near md5's.
        with memoryview(block) as whole, whole[:n] as view:
            self._sha.update(view)
            self._tree.update(view)

    def _write(self, block: mmap.mmap, n: int) -> None:
        self.staged.write_block(block, n)

    # Filling blocks (one thread at a time: the event loop or a receiver thread) ------
    def _room(self) -> memoryview | None:
        """The free part of the block being filled; None while ``max_in_flight``
        blocks are in the lanes (wait for the oldest, then ask again)."""
        if self._block is None:
            if len(self._in_flight) >= self._max_in_flight:
                return None
            self._block = self._pool.get()
            self._used = 0
        return memoryview(self._block)[self._used :]

    def _advance(self, n: int) -> None:
        """``n`` more bytes were put in the block; a full block goes to the lanes."""
        self._used += n
        if self._used == self._pool.block_size:
            self._dispatch()

    def _check_size(self, more: int) -> None:
        if self.total + more > self._max_size:
            raise too_large(self.total + more, self._max_size, self.staged.image_id)

    def _dispatch(self) -> None:
        block, n = self._block, self._used
        self._block, self._used = None, 0
        if block is None:
            return
        if n == 0:
            self._pool.put(block)
            return
        futures = tuple(lane.submit(work, block, n) for lane, work in self._lanes)
        self._in_flight.append((block, futures))

    def _release_oldest(self) -> None:
        block, _futures = self._in_flight.popleft()
        self._pool.put(block)

    async def _wait_oldest(self) -> None:
        # Removed only once done: on error or cancellation abort() still waits for it.
        await asyncio.gather(*(asyncio.wrap_future(f) for f in self._in_flight[0][1]))
        self._release_oldest()

    def _wait_oldest_sync(self) -> None:
        for f in self._in_flight[0][1]:
            f.result()
        self._release_oldest()

    async def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        """The next piece of the body (on the event loop)."""
        if not chunk:
            return
        self._check_size(len(chunk))
        self.total += len(chunk)
        with memoryview(chunk) as data:
            done = 0
            while done < len(data):
                room = self._room()
                if room is None:
                    await self._wait_oldest()
                    continue
                with room:
                    n = min(len(room), len(data) - done)
                    room[:n] = data[done : done + n]
                self._advance(n)
                done += n

    def fill(self, read_into: Callable[[memoryview], int], length: int) -> None:
        """Read exactly ``length`` more bytes with ``read_into(buffer) -> count``
        (blocking; in a receiver thread). ``read_into`` raises when the data stops."""
        self._check_size(length)
        left = length
        while left > 0:
            room = self._room()
            if room is None:
                self._wait_oldest_sync()
                continue
            with room, room[: min(len(room), left)] as target:
                n = read_into(target)
            self.total += n
            self._advance(n)
            left -= n

    async def finish(self) -> UploadResult:
        """Process what is buffered and return the hashes and the inspection."""
        self._dispatch()
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
            tree=self._tree.finish(),
        )

    def abort(self) -> None:
        """Stop the lanes and wait (briefly) until no thread uses the descriptor.

        Synchronous on purpose: it must also hold when the request task is cancelled,
        so the caller can close and unlink the staging file safely afterwards. Must not
        run while another thread is filling (stop the receiver first).
        """
        futures = [f for _block, block_futures in self._in_flight for f in block_futures]
        for f in futures:
            f.cancel()  # not started yet: never runs
        concurrent.futures.wait(futures)
        while self._in_flight:
            self._release_oldest()
        if self._block is not None:
            self._pool.put(self._block)
            self._block = None
        self._close_lanes()

    def _close_lanes(self) -> None:
        for lane, _work in self._lanes:
            lane.shutdown(wait=True)
