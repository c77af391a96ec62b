"""The embedded Glance v2-compatible image server.

Modules by responsibility: :mod:`.settings` (the values it runs with), :mod:`.catalog`
(image records in SQLAlchemy), :mod:`.store` (image bytes on disk), :mod:`.upload` (the
one streaming pass that hashes, inspects and stages an upload), :mod:`.download`
(file responses with Range support), :mod:`.patch` (JSON-patch on image records),
:mod:`.schemas` (request/response models, hence the OpenAPI schema), :mod:`.auth`
(the ``X-Auth-Token`` check), :mod:`.api` (the routes) and :mod:`.app` (the factory).
"""

from __future__ import annotations

from cowfleet.images.server.app import create_app
from cowfleet.images.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]
