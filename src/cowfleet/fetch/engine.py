"""The fetch engine: one resumable, verifying download of an image into a sink.

Everything that moves image bytes to a node goes through :func:`fetch`: ``cowfleet
cache fetch`` and provisioning (the ``_base`` sink, :mod:`cowfleet.cache.basesink`),
``cowfleet image download`` (a user's file, :mod:`cowfleet.fetch.tofile`), and later a
peer's stream. The engine owns what they share:

- **resume**: every attempt asks the source for the bytes the sink does not have yet
  (``Range``); a sink that kept bytes from an earlier run is re-read first (re-hashed,
  re-inspected); an answer of the whole file to a ranged request starts over at 0;
  a digest mismatch after resuming an earlier run's bytes starts over once;
- **checkpoints**: with a verifier that checks pieces on their own (the hash tree,
  :class:`~cowfleet.digest.Resumable`), a fetch that stops with bytes kept asks the
  sink to make them durable and record how many passed (:class:`Checkpoint`); the next
  run re-reads only from there (the inspector gets just the regions it asks for below
  it). A whole-image digest needs every byte again, so it never skips;
- **retry** under one :class:`~cowfleet.fetch.retry.RetryPolicy` (per-stall retries,
  backoff with jitter, an overall deadline);
- **verify** with a pluggable :class:`~cowfleet.digest.Verifier` (whole-image digest
  or hash tree), and run the streaming format inspector when the sink wants it;
- **overlap**: three threads joined by bounded queues. A receiver reads the body into
  reused buffers (:class:`~cowfleet.fetch.buffers.BufferPool`); the caller's thread
  hashes; a writer inspects and writes, then gives the buffer back. hashlib, socket
  reads and ``pwrite`` release the GIL on big buffers, so on two cores hashing runs
  beside receiving and writing. Memory is bounded by the pool.

A sink (:class:`Sink`) is sans-network: it is told where bytes go and when they are
complete; a source (:data:`OpenStream`) is sans-disk.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from cowfleet.digest import Resumable, Verifier, VerifierFactory
from cowfleet.errors import BackendUnavailableError, IntegrityError, RemoteError
from cowfleet.fetch.buffers import BufferPool, PoolClosed
from cowfleet.fetch.retry import TRANSIENT, Budget, DeadlinePassed
from cowfleet.formats.inspection import Inspection
from cowfleet.formats.probes import TAIL_SIZE

log = logging.getLogger(__name__)

CHUNK_SIZE = 2 * 1024 * 1024
POOL_BUFFERS = 12  # chunk buffers per attempt: bounds a fetch's memory (24 MiB)
QUEUE_DEPTH = 4  # chunks waiting for the hasher, and for the writer
_MAX_REGION_READS = 64  # reads of the inspector's regions below a checkpoint

# (bytes done, total bytes or None)
Progress = Callable[[int, int | None], None]


class InspectorLike(Protocol):
    @property
    def position(self) -> int: ...

    def feed(self, chunk: bytes | memoryview) -> None: ...

    def feed_at(self, offset: int, chunk: bytes | memoryview) -> None: ...

    def next_needed(self) -> tuple[int, int] | None: ...

    def finish(self, total_size: int | None = None) -> Inspection: ...


@dataclass(frozen=True)
class Checkpoint:
    """The first ``offset`` bytes a sink keeps passed the verifier named ``key`` (a
    :attr:`~cowfleet.digest.Resumable.key`) and are durable."""

    key: str
    offset: int


class StreamLike(Protocol):
    """One answer of the source: ``status`` 200 (from byte 0) or 206 (from ``offset``)."""

    status: int
    offset: int
    total_size: int | None

    def iter_chunks(self, chunk_size: int = ...) -> Iterator[bytes] | Iterator[memoryview]: ...


# offset -> the answer for the bytes from there; the pool may be used for the body.
OpenStream = Callable[[int, BufferPool], AbstractContextManager[StreamLike]]


class Sink(Protocol):
    """Where a fetch puts its bytes (a ``_base`` entry, a user's file, a peer's stream)."""

    display: str  # for messages
    inspector_factory: Callable[[], InspectorLike] | None  # run the format inspector?

    def kept(self) -> int:
        """Bytes an earlier run left, to resume after (0: none)."""
        ...

    def read_kept(self, offset: int, size: int) -> bytes:
        """Up to ``size`` kept bytes from ``offset`` (to re-verify them)."""
        ...

    def checkpoint(self) -> Checkpoint | None:
        """What an earlier run recorded of its kept bytes (None: re-read them all)."""
        ...

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        """The fetch stops with bytes kept: make the first ``checkpoint.offset`` durable,
        then record ``checkpoint`` for the next run (a sink may keep none)."""
        ...

    def write(self, offset: int, chunk: bytes | memoryview) -> None:
        """Put ``chunk`` at ``offset`` (called in order, from one thread)."""
        ...

    def restart(self) -> None:
        """Forget every byte written: the fetch starts over at 0."""
        ...

    def cut(self, size: int) -> None:
        """Forget the kept bytes from ``size`` on (before the fetch writes any)."""
        ...

    def commit(self, size: int) -> None:
        """Every byte is written and verified: make ``size`` bytes durable."""
        ...


@dataclass(frozen=True)
class Want:
    """What the fetched bytes must be."""

    image_id: str
    size: int | None  # None: whatever the source sends (checked by the verifier alone)
    verifier: VerifierFactory


@dataclass(frozen=True)
class Fetched:
    inspection: Inspection | None
    attempts: int
    restarts: int  # starts over at byte 0 (Range ignored, resumed bytes did not verify)
    resumed_from: int  # bytes kept from an earlier run
    verified_with: str
    skipped: int = 0  # of those, bytes not re-read (below the earlier run's checkpoint)


class ShortRead(BackendUnavailableError):
    """The body ended before the declared size (retried by resuming)."""


class SourceSwitch(BackendUnavailableError):
    """The source failed and another takes over at the same offset, at once (no backoff):
    raised by a several-source :data:`OpenStream` (:mod:`cowfleet.fetch.sources`)."""


_END = object()


@dataclass
class _Failed:
    exc: BaseException


class _Writer:
    """The writer thread: inspects and writes chunks in order, gives buffers back."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.inspector: InspectorLike | None = None
        self.written = 0
        self._q: queue.Queue[tuple[int, bytes | memoryview, BufferPool | None] | None] = (
            queue.Queue(maxsize=QUEUE_DEPTH)
        )
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cowfleet-fetch-wr", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                offset, chunk, pool = item
                try:
                    if self._error is None:
                        if self.inspector is not None:
                            self.inspector.feed(chunk)
                        self.sink.write(offset, chunk)
                        self.written = offset + len(chunk)
                finally:
                    if pool is not None:
                        pool.give(chunk)
            except BaseException as exc:  # handed to the caller
                self._error = exc
            finally:
                self._q.task_done()

    def submit(self, offset: int, chunk: bytes | memoryview, pool: BufferPool | None) -> None:
        if self._error is not None:
            self._raise()
        self._q.put((offset, chunk, pool))

    def flush(self) -> None:
        """Wait until every submitted chunk is written; raise a write error."""
        self._q.join()
        if self._error is not None:
            self._raise()

    def _raise(self) -> None:
        exc, self._error = self._error, None
        assert exc is not None
        raise exc

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()


class _Run:
    """The state of one fetch across its attempts."""

    def __init__(self, sink: Sink, want: Want, progress: Progress | None) -> None:
        self.sink = sink
        self.want = want
        self.progress = progress
        self.writer = _Writer(sink)
        self.verifier: Verifier = want.verifier()
        self.offset = 0  # bytes hashed (and handed to the writer)
        self.skipped = 0  # kept bytes taken from the sink's checkpoint, not re-read
        self.restarts = 0
        self._reset_inspector()

    def _reset_inspector(self) -> None:
        factory = self.sink.inspector_factory
        self.writer.inspector = factory() if factory is not None else None

    def absorb_kept(self) -> int:
        """Re-verify (and re-inspect) what an earlier run left in the sink, from its
        checkpoint when the verifier can take one."""
        kept = self.sink.kept()
        size = self.want.size
        if kept and (size is None or kept > size):
            log.warning("%s is longer than the image; starting over", self.sink.display)
            self.restart()
            return 0
        checkpoint = self.sink.checkpoint() if kept else None
        verifier = self.verifier
        if kept and isinstance(verifier, Resumable):
            whole = verifier.whole(kept)
            if whole < kept:  # a torn last piece: fetched again rather than re-read
                self.sink.cut(whole)
                kept = whole
            if checkpoint is not None and checkpoint.key == verifier.key:
                self.offset = verifier.skip(min(checkpoint.offset, kept))
                self.skipped = self.offset
                self._inspect_below(self.offset)
        while self.offset < kept:
            data = self.sink.read_kept(self.offset, min(CHUNK_SIZE * 2, kept - self.offset))
            if not data:
                break
            try:
                self.verifier.update(data)
            except IntegrityError as exc:  # a verifier that checks pieces (a hash tree)
                log.warning(
                    "%s: kept bytes do not verify (%s); starting over", self.sink.display, exc
                )
                self.restart()
                return 0
            inspector = self.writer.inspector
            if inspector is not None:
                inspector.feed(data)
            self.offset += len(data)
        self.writer.written = self.offset
        return self.offset

    def _inspect_below(self, offset: int) -> None:
        """Feed the inspector what it asks for of the first ``offset`` kept bytes (its
        regions and the bytes just before ``offset``), not all of them."""
        inspector = self.writer.inspector
        if inspector is None or not offset:
            return
        for _ in range(_MAX_REGION_READS):
            need = inspector.next_needed()
            if need is None or need[0] >= offset:
                break
            start, length = need
            data = self.sink.read_kept(start, min(length, offset - start))
            if not data:
                break
            inspector.feed_at(start, data)
        start = max(inspector.position, offset - TAIL_SIZE)
        if start < offset:
            inspector.feed_at(start, self.sink.read_kept(start, offset - start))

    def save_checkpoint(self) -> None:
        """Record the bytes kept that passed a resumable verifier (see the module doc)."""
        verifier = self.verifier
        if not isinstance(verifier, Resumable):
            return
        done = min(verifier.verified, self.writer.written)
        if done > 0:
            self.sink.save_checkpoint(Checkpoint(verifier.key, done))

    def restart(self) -> None:
        self.writer.flush()
        self.sink.restart()
        self.verifier = self.want.verifier()
        self._reset_inspector()
        self.offset = 0
        self.skipped = 0
        self.writer.written = 0
        self.restarts += 1

    def feed(self, chunk: bytes | memoryview, pool: BufferPool | None) -> None:
        n = len(chunk)
        size = self.want.size
        if size is not None and self.offset + n > size:
            raise IntegrityError(
                f"image {self.want.image_id}: the service sent more than the declared {size} bytes",
                image_id=self.want.image_id,
                expected=size,
            )
        self.verifier.update(chunk)
        # The writer is the chunk's last user: it gives the buffer back.
        self.writer.submit(self.offset, chunk, pool)
        self.offset += n
        if self.progress is not None:
            self.progress(self.offset, size)

    def check_answer(self, stream: StreamLike) -> None:
        want, iid = self.want, self.want.image_id
        total = stream.total_size
        if total is not None and want.size is not None and total != want.size:
            more = total > want.size
            raise IntegrityError(
                f"image {iid}: the service offers {total} bytes but the image declares "
                f"{want.size}" + (" (more bytes than declared)" if more else " (truncated)"),
                image_id=iid,
            )
        if stream.status == 206:
            if stream.offset != self.offset:
                raise RemoteError(
                    f"image {iid}: asked for bytes from {self.offset}, "
                    f"got a range from {stream.offset}",
                    status=206,
                )
        elif stream.status == 200:
            if self.offset:
                log.warning(
                    "image %s: the service ignored the Range request; fetching from byte 0", iid
                )
                self.restart()
        else:
            raise RemoteError(
                f"image {iid}: unexpected status {stream.status} for its data",
                status=stream.status,
            )

    def complete(self) -> bool:
        return self.want.size is not None and self.offset >= self.want.size


def _pump(
    chunks: Iterator[bytes] | Iterator[memoryview],
    run: _Run,
    pool: BufferPool,
    budget: Budget,
) -> None:
    """Feed every chunk to ``run``, receiving in a second thread."""
    q: queue.Queue[object] = queue.Queue(maxsize=QUEUE_DEPTH)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def receive() -> None:
        try:
            for chunk in chunks:
                if not put(chunk):
                    pool.give(chunk)
                    return
            put(_END)
        except PoolClosed:
            return
        except BaseException as exc:  # handed to the hashing thread
            put(_Failed(exc))

    thread = threading.Thread(target=receive, name="cowfleet-fetch-rx", daemon=True)
    thread.start()
    what = f"download image {run.want.image_id}"
    ok = False
    try:
        while True:
            budget.check(what)
            remaining = budget.remaining()
            try:
                item = q.get(timeout=remaining)
            except queue.Empty:
                raise DeadlinePassed(f"{what}: deadline passed while waiting for data") from None
            if item is _END:
                ok = True
                break
            if isinstance(item, _Failed):
                ok = True  # the receiver is done
                raise item.exc
            assert isinstance(item, bytes | memoryview)
            run.feed(item, pool)
    finally:
        stop.set()
        if ok:
            thread.join()
        else:
            pool.close()  # wakes a receiver waiting for a buffer
            while True:  # and one waiting on a full queue
                try:
                    pool.give(q.get_nowait())
                except queue.Empty:
                    break


def fetch(
    open_stream: OpenStream,
    sink: Sink,
    want: Want,
    budget: Budget,
    *,
    progress: Progress | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> Fetched:
    """Fill ``sink`` with the verified bytes of ``want``, resuming and retrying (see the
    module doc). Raises the error tree: :class:`IntegrityError` for bytes that are not
    the image's, the transport's error once the retries or the deadline are spent."""
    run = _Run(sink, want, progress)
    iid = want.image_id
    what = f"download image {iid}"
    try:
        resumed_from = run.absorb_kept()
        if resumed_from:
            log.info(
                "image %s: resuming %s at byte %d (%d bytes re-read)",
                iid,
                sink.display,
                resumed_from,
                resumed_from - run.skipped,
            )
        retry_resumed = resumed_from > 0
        while True:
            while True:
                budget.attempts += 1
                start = run.offset
                pool = BufferPool(POOL_BUFFERS, chunk_size)
                try:
                    with open_stream(run.offset, pool) as stream:
                        run.check_answer(stream)
                        _pump(stream.iter_chunks(chunk_size), run, pool, budget)
                    run.writer.flush()
                    if want.size is not None and run.offset < want.size:
                        raise ShortRead(
                            f"image {iid}: the body ended at byte {run.offset} of {want.size}"
                        )
                    break
                except DeadlinePassed:
                    raise
                except TRANSIENT as exc:
                    run.writer.flush()  # what arrived before the failure is kept
                    if isinstance(exc, SourceSwitch):
                        log.warning("image %s: %s; resuming at byte %d", iid, exc, run.offset)
                        continue
                    try:
                        budget.failed(exc, progressed=run.offset > start, what=what)
                    except ShortRead as short:
                        raise IntegrityError(
                            f"image {iid}: truncated download, got {run.offset} of "
                            f"{want.size} bytes after {budget.attempts} attempts",
                            image_id=iid,
                        ) from short
            try:
                run.verifier.verify()
            except IntegrityError:
                if not retry_resumed:
                    raise
                # The kept bytes may be another image's or a torn write: start over once.
                log.warning(
                    "image %s: %s mismatch after resuming an earlier run; fetching again from 0",
                    iid,
                    run.verifier.name,
                )
                retry_resumed = False
                run.restart()
                continue
            break
        inspector = run.writer.inspector
        inspection = inspector.finish(run.offset) if inspector is not None else None
        sink.commit(run.offset)
        return Fetched(
            inspection=inspection,
            attempts=budget.attempts,
            restarts=run.restarts,
            resumed_from=resumed_from,
            verified_with=run.verifier.name,
            skipped=run.skipped,
        )
    except BaseException:
        with contextlib.suppress(Exception):  # best effort: the next run re-reads instead
            run.writer.flush()
            run.save_checkpoint()
        raise
    finally:
        with contextlib.suppress(BaseException):  # already failing, or reported above
            run.writer.flush()
        run.writer.close()
