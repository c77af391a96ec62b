"""Image lookups shared by concurrent builds.

A burst of builds of one image (``max_count=50``) would ask the image service for the
same record 50 times at once. :class:`SharedLookups` lets concurrent lookups of one
reference share the request already in flight: the answer is never older than that
request, and nothing is cached once it returns.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from cowfleet.compute.provision import ImageLike, ImageLookup


class SharedLookups:
    """An :class:`ImageLookup` whose concurrent identical lookups share one request."""

    def __init__(self, images: ImageLookup) -> None:
        self.images = images
        self._lock = threading.Lock()
        self._inflight: dict[tuple[str, str], Future[Any]] = {}
        self.requests = 0  # lookups actually sent (for tests)

    def find(self, name_or_id: str) -> ImageLike:
        return self._shared("find", name_or_id, self.images.find)

    def get(self, image_id: str) -> ImageLike:
        return self._shared("get", image_id, self.images.get)

    def _shared(self, kind: str, ref: str, call: Callable[[str], ImageLike]) -> ImageLike:
        key = (kind, ref)
        with self._lock:
            future = self._inflight.get(key)
            owner = future is None
            if future is None:
                future = self._inflight[key] = Future()
                self.requests += 1
        if not owner:
            result: ImageLike = future.result()
            return result
        try:
            image = call(ref)
        except BaseException as exc:
            future.set_exception(exc)
            raise
        else:
            future.set_result(image)
            return image
        finally:
            with self._lock:
                self._inflight.pop(key, None)
