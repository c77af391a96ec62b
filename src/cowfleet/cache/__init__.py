"""The node image cache: `_base`, fetched once per node, verified, crash-safe.

Import-light on purpose (50 processes may start at once): nothing here pulls
in httpx, fastapi, sqlalchemy or rich; the image client is imported only when
a download is actually needed.
"""

from __future__ import annotations

from cowfleet.cache.cache import CachedBase, CachedSet, ImageCache
from cowfleet.cache.layout import base_name, base_path
from cowfleet.cache.lock import base_lock

__all__ = ["CachedBase", "CachedSet", "ImageCache", "base_lock", "base_name", "base_path"]
