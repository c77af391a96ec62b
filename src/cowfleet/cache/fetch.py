"""Moving bytes from the image service into a :class:`StreamSink`.

Two threads: a receiver reads the HTTP body (``DownloadStream.iter_chunks``)
into a small bounded queue; the caller's thread hashes, inspects and writes
(hashlib and ``pwrite`` release the GIL on big buffers, so on two cores the
network and the disk overlap). The queue bounds memory: ``QUEUE_DEPTH``
chunks of ``CHUNK_SIZE``.

:func:`download_into` adds resumption: every attempt asks for the bytes the
sink does not have yet (``Range``), transient failures are retried with
exponential backoff inside an overall deadline, and a 200 answer to a ranged
request (a server without Range support) restarts the sink from byte 0.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from cowfleet.cache.sink import StreamSink
from cowfleet.errors import (
    BackendUnavailableError,
    IntegrityError,
    RemoteError,
    TimeoutError_,
)

log = logging.getLogger(__name__)

CHUNK_SIZE = 2 * 1024 * 1024
QUEUE_DEPTH = 8
BACKOFF_MAX = 30.0


class StreamLike(Protocol):
    status: int
    offset: int
    total_size: int | None

    def iter_chunks(self, chunk_size: int = ...) -> Iterator[bytes] | Iterator[memoryview]: ...


class DownloaderLike(Protocol):
    def open_download(self, image_id: str, *, offset: int = 0) -> AbstractContextManager[Any]: ...


class DeadlinePassed(TimeoutError_):
    """The overall fetch deadline passed (never retried)."""


class ShortRead(BackendUnavailableError):
    """The body ended before the declared size (retried by resuming)."""


_END = object()


@dataclass
class _Failed:
    exc: BaseException


def pump(
    chunks: Iterator[bytes] | Iterator[memoryview],
    sink: StreamSink,
    *,
    deadline: float,
    clock: Callable[[], float] = time.monotonic,
    depth: int = QUEUE_DEPTH,
) -> None:
    """Feed every chunk of ``chunks`` to ``sink``, reading in a second thread."""
    q: queue.Queue[object] = queue.Queue(maxsize=depth)
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
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer thread
            put(_Failed(exc))

    thread = threading.Thread(target=receive, name="cowfleet-fetch-rx", daemon=True)
    thread.start()
    ok = False
    try:
        while True:
            remaining = deadline - clock()
            if remaining <= 0:
                raise DeadlinePassed("image download deadline passed")
            try:
                item = q.get(timeout=remaining)
            except queue.Empty:
                raise DeadlinePassed(
                    "image download deadline passed while waiting for data"
                ) from None
            if item is _END:
                ok = True
                break
            if isinstance(item, _Failed):
                raise item.exc
            assert isinstance(item, bytes | memoryview)
            sink.feed(item)
    finally:
        stop.set()
        if ok:
            thread.join()
        else:
            while True:  # unblock a receiver waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    break


def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [BackendUnavailableError, TimeoutError_, ConnectionError]
    try:  # a client that lets httpx errors through is still retried
        import httpx

        types.append(httpx.TransportError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


@dataclass
class DownloadStats:
    attempts: int = 0
    restarts: int = 0  # server ignored Range
    resumed_from: int = 0
    bytes_received: int = 0


def _check_answer(stream: StreamLike, sink: StreamSink, stats: DownloadStats) -> None:
    total = stream.total_size
    if total is not None and total != sink.expected_size:
        more = total > sink.expected_size
        raise IntegrityError(
            f"image {sink.image_id}: the service offers {total} bytes but the image "
            f"declares {sink.expected_size}"
            + (" (more bytes than declared)" if more else " (truncated)"),
            image_id=sink.image_id,
        )
    if stream.status == 206:
        if stream.offset != sink.offset:
            raise RemoteError(
                f"image {sink.image_id}: asked for bytes from {sink.offset}, "
                f"got a range from {stream.offset}",
                status=206,
            )
    elif stream.status == 200:
        if sink.offset:
            log.warning(
                "image %s: the service ignored the Range request; fetching from byte 0",
                sink.image_id,
            )
            stats.restarts += 1
            sink.restart()
    else:
        raise RemoteError(
            f"image {sink.image_id}: unexpected status {stream.status} for its data",
            status=stream.status,
        )


def download_into(
    sink: StreamSink,
    client: DownloaderLike,
    *,
    retries: int,
    deadline: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    backoff: float = 0.5,
    chunk_size: int = CHUNK_SIZE,
) -> DownloadStats:
    """Fill ``sink`` up to its expected size, resuming and retrying; see module doc."""
    stats = DownloadStats(resumed_from=sink.offset)
    transient = _transient_types()
    delay = backoff
    failures = 0
    while not sink.is_complete():
        stats.attempts += 1
        start = sink.offset
        try:
            with client.open_download(sink.image_id, offset=sink.offset) as stream:
                _check_answer(stream, sink, stats)
                pump(stream.iter_chunks(chunk_size), sink, deadline=deadline, clock=clock)
            if not sink.is_complete():
                raise ShortRead(
                    f"image {sink.image_id}: the body ended at byte {sink.offset} of "
                    f"{sink.expected_size}"
                )
        except DeadlinePassed:
            raise
        except transient as exc:
            stats.bytes_received += max(0, sink.offset - start)
            if sink.offset > start:
                failures = 0  # progress was made: the budget is per stall, not per image
                delay = backoff
            failures += 1
            if failures > retries:
                if isinstance(exc, ShortRead):
                    raise IntegrityError(
                        f"image {sink.image_id}: truncated download, got {sink.offset} of "
                        f"{sink.expected_size} bytes after {stats.attempts} attempts",
                        image_id=sink.image_id,
                    ) from exc
                if isinstance(exc, TimeoutError_ | BackendUnavailableError):
                    raise
                raise BackendUnavailableError(
                    f"image {sink.image_id}: download failed: {exc}", image_id=sink.image_id
                ) from exc
            if clock() + delay > deadline:
                raise DeadlinePassed(
                    f"image {sink.image_id}: download deadline passed after "
                    f"{stats.attempts} attempts ({exc})"
                ) from exc
            log.warning(
                "image %s: attempt %d failed at byte %d (%s); retrying in %.1fs",
                sink.image_id,
                stats.attempts,
                sink.offset,
                exc,
                delay,
            )
            sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)
        else:
            stats.bytes_received += sink.offset - start
    return stats
