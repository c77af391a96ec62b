"""JSON-patch (``application/openstack-images-v2.1-json-patch``) on an image record.

Sans-I/O: :func:`apply_patch` takes the current record and the decoded body and
returns the new writable fields and property map, all or nothing. Glance's rules:
``add`` sets (or overwrites) an attribute or property; ``replace`` needs the property
to exist (409 otherwise); ``remove`` deletes a property (409 if absent) and refuses base
attributes (403); read-only and reserved names are 403; anything malformed is 400.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cowfleet.errors import ConflictError
from cowfleet.images.server.catalog import ImageRecord
from cowfleet.images.server.errors import bad_request, forbidden
from cowfleet.images.server.validate import (
    BASE,
    SETTABLE,
    check_field,
    check_key,
    check_property,
    check_tags,
)

PATCH_MEDIA_TYPES = (
    "application/openstack-images-v2.1-json-patch",
    "application/openstack-images-v2.0-json-patch",
)
OPS = ("add", "replace", "remove")


@dataclass(frozen=True)
class PatchResult:
    fields: dict[str, Any]
    properties: dict[str, str]
    tags: tuple[str, ...] | None


def parse_pointer(path: Any) -> str:
    """``/name`` -> ``name``; JSON-pointer escapes (``~1``, ``~0``) decoded; one level only."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise bad_request(f"path must be a JSON pointer such as '/name', not {path!r}")
    parts = path[1:].split("/")
    if len(parts) != 1 or not parts[0]:
        raise bad_request(f"path {path!r} must name one top-level attribute")
    return parts[0].replace("~1", "/").replace("~0", "~")


def apply_patch(rec: ImageRecord, body: Any, *, owner_writable: bool = False) -> PatchResult:
    """The new fields, properties and tags; ``owner_writable`` (admins) lets ``owner`` change."""
    if not isinstance(body, list):
        raise bad_request("a JSON-patch body must be a JSON list of operations")
    fields: dict[str, Any] = {}
    props = dict(rec.properties)
    tags: tuple[str, ...] | None = None
    for i, op in enumerate(body):
        if not isinstance(op, Mapping):
            raise bad_request(f"operation {i} is not a JSON object")
        kind = op.get("op")
        if kind not in OPS:
            raise bad_request(f"operation {i}: op must be one of {', '.join(OPS)}, not {kind!r}")
        extra = set(op) - {"op", "path", "value"}
        if extra:
            raise bad_request(f"operation {i}: unexpected member(s) {', '.join(sorted(extra))}")
        key = parse_pointer(op.get("path"))
        check_key(key)
        if kind == "remove":
            if "value" in op:
                raise bad_request(f"operation {i}: remove takes no value")
            if key in BASE:
                raise forbidden(f"Property {key} may not be removed.")
            if key not in props:
                raise ConflictError(f"Property {key} does not exist.", http_status=409)
            del props[key]
            continue
        if "value" not in op:
            raise bad_request(f"operation {i}: {kind} needs a value")
        value = op["value"]
        if key == "tags":
            tags = check_tags(value)
        elif key in SETTABLE or (key == "owner" and owner_writable):
            fields[key] = check_field(key, value)
        elif key in BASE:  # id, owner: fixed after create
            raise forbidden(f"Attribute '{key}' is read-only.")
        elif kind == "replace" and key not in props:
            raise ConflictError(f"Property {key} does not exist.", http_status=409)
        else:
            props[key] = check_property(key, value)
    return PatchResult(fields, props, tags)
