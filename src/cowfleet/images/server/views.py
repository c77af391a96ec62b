"""Image records rendered as Glance v2 JSON."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from fastapi.responses import JSONResponse

from cowfleet.hashtree import LEAF_SIZE_PROPERTY, ROOT_PROPERTY
from cowfleet.images.server.catalog import ImageRecord

SCHEMA_PATH = "/v2/schemas/image"
# Properties only the server sets (read-only for clients, see validate.READ_ONLY).
SERVER_PROPERTIES = frozenset({ROOT_PROPERTY, LEAF_SIZE_PROPERTY})


def isotime(dt: datetime) -> str:
    """``2026-11-23T22:40:00Z`` (seconds, Z) like Glance."""
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def image_json(rec: ImageRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": rec.id,
        "name": rec.name,
        "status": rec.status,
        "disk_format": rec.disk_format,
        "container_format": rec.container_format,
        "visibility": rec.visibility,
        "size": rec.size,
        "virtual_size": rec.virtual_size,
        "checksum": rec.checksum,
        "os_hash_algo": rec.os_hash_algo,
        "os_hash_value": rec.os_hash_value,
        "min_disk": rec.min_disk,
        "min_ram": rec.min_ram,
        "protected": rec.protected,
        "owner": rec.owner,
        "tags": list(rec.tags),
        "created_at": isotime(rec.created_at),
        "updated_at": isotime(rec.updated_at),
        "self": f"/v2/images/{rec.id}",
        "file": f"/v2/images/{rec.id}/file",
        "schema": SCHEMA_PATH,
    }
    if rec.tree_sha256 is not None and rec.tree_leaf_size is not None:
        out[ROOT_PROPERTY] = rec.tree_sha256
        out[LEAF_SIZE_PROPERTY] = str(rec.tree_leaf_size)
    for key, value in rec.properties.items():
        # Free-form properties never stand in for the server's (one set before they
        # were read-only could otherwise claim a tree the image does not have).
        if key not in SERVER_PROPERTIES:
            out.setdefault(key, value)
    return out


class ImageResponse(JSONResponse):
    """JSON of image records. Text stored before invalid text was refused (a lone
    surrogate cannot be encoded as UTF-8) goes out as ``\\u`` escapes, still valid
    JSON, so that such an image can be listed, shown, fixed and deleted."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            text = json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
            return text.encode("ascii")
