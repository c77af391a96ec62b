"""Upload bodies for ``PUT /v2/images/{id}/file`` that can be sent again.

A request that fails on a kept-alive connection the server had already closed is
sent once more (see :func:`cowfleet.images.http.send`); its body must then start
over. :func:`upload_body` picks the body for what the caller gives:

- a seekable file (a regular file, ``BytesIO``): :class:`FileBody`, rewound by
  seeking back to where it stood when the upload began;
- anything else (a pipe, stdin, an iterable of bytes): :class:`StreamBody`, which
  keeps what it has handed out until :data:`REPLAY_LIMIT` bytes, so a failure that
  early (a stale connection fails on its first writes) can still be replayed.

A body of unknown length goes out chunked, in chunks of at most
:data:`STREAM_CHUNK` bytes: uWSGI refuses larger chunks by default
(``chunked-input-limit``, 1 MB), and Glance then answers 500.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterable, Iterator
from typing import IO, Any

from cowfleet.errors import LocalIOError, ValidationError
from cowfleet.fetch.engine import Progress

FILE_CHUNK = 4 * 1024 * 1024  # read size for a body of known length (Content-Length)
STREAM_CHUNK = 512 * 1024  # largest chunk of a chunked body (below uWSGI's 1 MB limit)
REPLAY_LIMIT = 4 * 1024 * 1024  # a one-pass body is replayable until this much was sent


class _Counted:
    """Size checks and progress shared by both bodies (counts restart on rewind)."""

    def __init__(self, size: int | None, progress: Progress | None) -> None:
        self.size = size
        self._progress = progress

    def _count(self, blocks: Iterator[bytes]) -> Iterator[bytes]:
        done = 0
        for block in blocks:
            done += len(block)
            if self.size is not None and done > self.size:
                raise ValidationError(f"upload data is longer than the declared {self.size} bytes")
            yield block
            if self._progress is not None:
                self._progress(done, self.size)
        if self.size is not None and done < self.size:
            raise ValidationError(f"upload data ended at {done} of the declared {self.size} bytes")


class FileBody(_Counted):
    """A seekable binary file from its current position; :meth:`rewind` seeks back."""

    def __init__(self, fh: IO[bytes], size: int | None, progress: Progress | None = None) -> None:
        super().__init__(size, progress)
        self._fh = fh
        # Without a length the body goes out chunked: keep each chunk under the limit.
        self._block = FILE_CHUNK if size is not None else STREAM_CHUNK
        try:
            self._start = fh.tell()
        except (OSError, ValueError) as exc:
            raise LocalIOError(f"cannot read upload data: {exc}") from exc

    def __iter__(self) -> Iterator[bytes]:
        return self._count(_read_blocks(self._fh, self._block))

    def rewind(self) -> bool:
        try:
            self._fh.seek(self._start)
        except (OSError, ValueError):
            return False
        return True


class StreamBody(_Counted):
    """A one-pass source (pipe, iterable) in chunks of at most :data:`STREAM_CHUNK`
    bytes; replayable while no more than :data:`REPLAY_LIMIT` bytes were sent."""

    def __init__(
        self, source: Iterator[bytes], size: int | None, progress: Progress | None = None
    ) -> None:
        super().__init__(size, progress)
        self._source = source
        self._kept: list[bytes] | None = []  # None once more than REPLAY_LIMIT was sent
        self._kept_bytes = 0
        self._replay = False

    def __iter__(self) -> Iterator[bytes]:
        return self._count(self._blocks())

    def _blocks(self) -> Iterator[bytes]:
        if self._replay and self._kept is not None:
            yield from list(self._kept)
        self._replay = False
        for block in self._source:
            if self._kept is not None:
                self._kept_bytes += len(block)
                if self._kept_bytes > REPLAY_LIMIT:
                    self._kept = None
                else:
                    self._kept.append(block)
            yield block

    def rewind(self) -> bool:
        if self._kept is None:
            return False
        self._replay = True
        return True


def upload_body(
    data: IO[bytes] | Iterable[bytes] | bytes,
    size: int | None,
    progress: Progress | None,
) -> tuple[FileBody | StreamBody, int | None]:
    """The body for ``data`` and its size (that of a regular file's rest when not given)."""
    if isinstance(data, bytes | bytearray | memoryview):
        data = io.BytesIO(data)
        size = len(data.getbuffer()) if size is None else size
    if hasattr(data, "read"):
        fh: Any = data
        if size is None:
            size = remaining_size(fh)
        if _seekable(fh):
            return FileBody(fh, size, progress), size
        return StreamBody(_read_blocks(fh, STREAM_CHUNK), size, progress), size
    return StreamBody(_sliced(data), size, progress), size


def remaining_size(fh: IO[bytes]) -> int | None:
    """Bytes from the current position to the end of a regular file, else None."""
    try:
        st = os.fstat(fh.fileno())
        pos = fh.tell()
    except (OSError, ValueError, AttributeError):
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return max(0, st.st_size - pos)


def _seekable(fh: Any) -> bool:
    try:
        return bool(fh.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def _read_blocks(fh: Any, block_size: int) -> Iterator[bytes]:
    while True:
        try:
            block = fh.read(block_size)
        except OSError as exc:
            raise LocalIOError(f"cannot read upload data: {exc}") from exc
        if not block:
            return
        yield block if isinstance(block, bytes) else bytes(block)


def _sliced(blocks: Iterable[bytes]) -> Iterator[bytes]:
    """The caller's blocks, cut to at most :data:`STREAM_CHUNK` bytes each."""
    for block in blocks:
        if len(block) <= STREAM_CHUNK:
            if block:
                yield block if isinstance(block, bytes) else bytes(block)
            continue
        view = memoryview(block)
        for i in range(0, len(view), STREAM_CHUNK):
            yield bytes(view[i : i + STREAM_CHUNK])
