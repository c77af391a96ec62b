"""Image records rendered as Glance v2 JSON."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from fastapi.responses import JSONResponse

from cowfleet.images.server.catalog import ImageRecord

SCHEMA_PATH = "/v2/schemas/image"


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
    for key, value in rec.properties.items():
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
