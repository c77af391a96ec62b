"""Reused chunk buffers for one fetch.

A fresh multi-MiB ``bytes`` per chunk costs page faults (glibc maps and unmaps big
blocks) on every chunk. A transport that can read into caller buffers (see
:mod:`cowfleet.images.transport`) takes them from the fetch's :class:`BufferPool`,
handed over in the request's ``cowfleet.buffers`` extension; the fetch gives each one
back once its last user (the writer) is done. ``take`` blocks while every buffer is
in flight, which also bounds the memory of a fetch to ``count * size``.
"""

from __future__ import annotations

import threading

EXTENSION = "cowfleet.buffers"  # httpx request extension carrying the pool


class PoolClosed(Exception):
    """The fetch that owns the pool stopped: no more buffers."""


class BufferPool:
    """``count`` buffers of ``size`` bytes, taken and given back in any order."""

    def __init__(self, count: int, size: int) -> None:
        self.size = size
        self._free = [bytearray(size) for _ in range(count)]
        self._all = tuple(self._free)
        self._cond = threading.Condition()
        self._closed = False

    def take(self, timeout: float | None = None) -> bytearray:
        """A free buffer; waits for one (raises :class:`PoolClosed` once closed)."""
        with self._cond:
            while not self._free:
                if self._closed:
                    raise PoolClosed("the fetch stopped")
                if not self._cond.wait(timeout):
                    raise TimeoutError("no free buffer")
            if self._closed:
                raise PoolClosed("the fetch stopped")
            return self._free.pop()

    def give(self, chunk: object) -> None:
        """Give back the buffer under ``chunk`` (a memoryview of one of ours); anything
        else is ignored."""
        if isinstance(chunk, memoryview):
            buf = chunk.obj
            if isinstance(buf, bytearray) and any(buf is b for b in self._all):
                with self._cond:
                    self._free.append(buf)
                    self._cond.notify()

    def close(self) -> None:
        """Wake every taker with :class:`PoolClosed`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
