"""Downloads in progress that other nodes may read as they land ("streaming through").

A fetch fed by :class:`cowfleet.fetch.sources.Sources` writes only bytes of hash-tree
leaves that passed their check, in order. :class:`TrackingSink` wraps its ``.part``
sink and records how far those bytes have landed on disk; :class:`LiveFetches` (one per
node agent process) maps an image id to its :class:`LiveFetch`, which a peer reader
(:mod:`cowfleet.node.peers`) waits on. The entry keeps its own descriptor of the
``.part`` (a ``dup``), so the rename into ``_base`` at the end changes nothing for a
reader; the descriptor is closed once the fetch has ended and its last reader is gone.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator

from cowfleet.errors import BackendUnavailableError, NotFoundError, TimeoutError_
from cowfleet.fetch.engine import Checkpoint, InspectorLike, Sink

FETCHING, DONE, FAILED = "fetching", "done", "failed"


class LiveFetch:
    """One download in progress: how many checked bytes have landed in its file."""

    def __init__(
        self,
        image_id: str,
        size: int,
        fd: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.image_id = image_id
        self.size = size
        self._fd = fd
        self._clock = clock
        self._cond = threading.Condition()
        self.landed = 0
        self.generation = 0  # bumped when the file starts over
        self.state = FETCHING
        self._readers = 0
        self.source = "origin"  # who sends its bytes now: "origin" or a peer's hostname

    # -- the writer's side ----------------------------------------------------
    def advance(self, end: int) -> None:
        with self._cond:
            if end > self.landed:
                self.landed = end
                self._cond.notify_all()

    def reset(self) -> None:
        with self._cond:
            self.landed = 0
            self.generation += 1
            self._cond.notify_all()

    def end(self, ok: bool) -> None:
        with self._cond:
            self.state = DONE if ok and self.landed >= self.size else FAILED
            self._cond.notify_all()
            self._close_if_idle()

    # -- a reader's side -------------------------------------------------------
    def open_reader(self) -> None:
        with self._cond:
            if self.state == FAILED or self._fd < 0:
                raise NotFoundError(f"image {self.image_id}: its download stopped")
            self._readers += 1

    def close_reader(self) -> None:
        with self._cond:
            self._readers -= 1
            self._close_if_idle()

    def _close_if_idle(self) -> None:
        if self.state != FETCHING and self._readers <= 0 and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def read(self, offset: int, size: int, timeout: float) -> bytes:
        """Up to ``size`` bytes from ``offset`` once they have landed; waits at most
        ``timeout`` seconds for the first of them (TimeoutError_), raises
        BackendUnavailableError when the download failed."""
        deadline = self._clock() + timeout
        with self._cond:
            while True:
                if self.state == FAILED:
                    raise BackendUnavailableError(f"image {self.image_id}: the download failed")
                if self.landed > offset:
                    break
                left = deadline - self._clock()
                if left <= 0:
                    raise TimeoutError_(
                        f"image {self.image_id}: byte {offset} did not land within {timeout}s"
                    )
                self._cond.wait(left)
            n = min(size, self.landed - offset)
            generation = self.generation
        data = os.pread(self._fd, n, offset)
        if len(data) < n:  # trailing zero blocks not written yet (holes past the end)
            data += bytes(n - len(data))
        with self._cond:
            if self.generation != generation or self.state == FAILED:
                raise BackendUnavailableError(f"image {self.image_id}: the download started over")
        return data


class LiveFetches:
    """The node's downloads in progress, by image id (thread-safe)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._live: dict[str, LiveFetch] = {}
        self._expected: dict[str, int] = {}
        self._clock = clock

    @contextlib.contextmanager
    def expect(self, image_id: str) -> Iterator[None]:
        """While this runs, ``image_id`` is on its way here (a peer asking for it waits
        a little for its download to start, rather than being told 404 at once)."""
        with self._lock:
            self._expected[image_id] = self._expected.get(image_id, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._expected[image_id] - 1
                if left:
                    self._expected[image_id] = left
                else:
                    del self._expected[image_id]

    def expected(self, image_id: str) -> bool:
        with self._lock:
            return image_id in self._expected

    def begin(self, image_id: str, size: int, fd: int) -> LiveFetch:
        entry = LiveFetch(image_id, size, os.dup(fd), clock=self._clock)
        with self._lock:
            old = self._live.get(image_id)
            self._live[image_id] = entry
        if old is not None:
            old.end(False)
        return entry

    def end(self, entry: LiveFetch, ok: bool) -> None:
        with self._lock:
            if self._live.get(entry.image_id) is entry:
                del self._live[entry.image_id]
        entry.end(ok)

    def get(self, image_id: str) -> LiveFetch | None:
        with self._lock:
            return self._live.get(image_id)


class TrackingSink:
    """A sink that tells its :class:`LiveFetch` how far checked bytes have landed."""

    def __init__(self, inner: Sink, entry: LiveFetch) -> None:
        self.inner = inner
        self.entry = entry
        self.display = inner.display
        self.inspector_factory: Callable[[], InspectorLike] | None = inner.inspector_factory

    def kept(self) -> int:
        return self.inner.kept()

    def read_kept(self, offset: int, size: int) -> bytes:
        return self.inner.read_kept(offset, size)

    def checkpoint(self) -> Checkpoint | None:
        return self.inner.checkpoint()

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        self.inner.save_checkpoint(checkpoint)

    def cut(self, size: int) -> None:
        self.entry.reset()  # readers wait again; the next write says how far bytes stand
        self.inner.cut(size)

    def write(self, offset: int, chunk: bytes | memoryview) -> None:
        self.inner.write(offset, chunk)
        # Bytes before ``offset`` were kept and re-verified, or written before.
        self.entry.advance(offset + len(chunk))

    def restart(self) -> None:
        self.entry.reset()
        self.inner.restart()

    def commit(self, size: int) -> None:
        self.inner.commit(size)
        self.entry.advance(size)
