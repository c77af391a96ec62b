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
    """Up to ``count`` buffers of ``size`` bytes, taken and given back in any order.

    A buffer is allocated when first needed, not up front: zero-filling them all costs
    milliseconds per MiB at the start of every attempt, and a small image or a fast
    writer never needs them all.
    """

    def __init__(self, count: int, size: int) -> None:
        self.size = size
        self.count = count
        self._free: list[bytearray] = []
        self._all: list[bytearray] = []  # every buffer allocated so far
        self._cond = threading.Condition()
        self._closed = False

    @property
    def allocated(self) -> int:
        """Buffers allocated so far (at most ``count``)."""
        return len(self._all)

    def take(self, timeout: float | None = None) -> bytearray:
        """A free buffer; waits for one (raises :class:`PoolClosed` once closed)."""
        with self._cond:
            if not self._free and len(self._all) < self.count and not self._closed:
                buf = bytearray(self.size)
                self._all.append(buf)
                return buf
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
            if isinstance(buf, bytearray):
                with self._cond:
                    if not any(buf is b for b in self._all):
                        return
                    self._free.append(buf)
                    self._cond.notify()

    def close(self) -> None:
        """Wake every taker with :class:`PoolClosed`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
